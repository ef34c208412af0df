"""Service addresses: the one parser and formatter of `HOST:PORT` / `[v6]:PORT` used by every server,
client and config."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    """(host, port) -> 'HOST:PORT', bracketing an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
