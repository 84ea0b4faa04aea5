"""The `junjo-backend` command line: `serve`, `api-keys`, `spans tail`."""
