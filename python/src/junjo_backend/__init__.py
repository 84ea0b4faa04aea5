"""junjo-backend: the Python backend's gRPC layer for junjo-server."""

__version__ = "0.1.0"
