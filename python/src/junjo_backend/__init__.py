"""junjo-backend: the Python backend's gRPC layer for junjo-server."""

from importlib.metadata import version

# The version is defined once, in pyproject.toml; the installed metadata carries it.
__version__ = version("junjo-backend")
