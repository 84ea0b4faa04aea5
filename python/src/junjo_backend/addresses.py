"""`host:port` addresses: parsing and writing one, binding one, and saying why it cannot be."""

from __future__ import annotations

import socket

MAX_PORT = 65535


def parse_address(value: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 hosts in brackets); ValueError says what is wrong."""
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError("expected HOST:PORT")
    if not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > MAX_PORT:
        raise ValueError(f"port {port} is out of range (0-{MAX_PORT})")
    return host.removeprefix("[").removesuffix("]"), port


def format_address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets: what `parse_address` reads back."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bound_socket(host: str, port: int, *, backlog: int | None = None) -> socket.socket:
    """A TCP socket bound to `host:port` (SO_REUSEADDR), listening when `backlog` is given.

    Raises `socket.gaierror` when `host` does not resolve, `OSError` when it cannot bind;
    a socket that failed is closed.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        if backlog is not None:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def listen_problem(address: str) -> str | None:
    """Why `address` cannot be listened on (the OS's words), or None when it can.

    grpc's own bind error says only "Failed to bind"; a plain socket bound and released
    names the cause (address in use, not an address of this host). Port 0 always can.
    """
    host, port = parse_address(address)
    if port == 0:
        return None
    try:
        bound_socket(host, port).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
