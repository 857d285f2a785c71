"""Running the app: the binding rule, and uvicorn.

A server reachable from other machines runs generations (and so spends the GPU) for anyone who can reach
it, so binding to any address other than loopback needs a bearer token; without one the server refuses
to start.
"""

from __future__ import annotations

import ipaddress
import socket

LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, :: and every other address or name."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Refuse (ValueError) to serve on a non-loopback ``host`` without a token."""
    if token is not None and not token.strip():
        raise ValueError("--token is empty; give a long random string, e.g. from `openssl rand -hex 24`")
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"--host {host} exposes the server beyond this machine, which needs a bearer token: pass "
            "--token TOKEN (or set MOCHI_SERVE_TOKEN), or bind to 127.0.0.1"
        )


def check_port(host: str, port: int) -> None:
    """Refuse (ValueError) a port out of range or already taken, before any model is loaded."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must be in 0..65535 (7860 is the default)")
    try:
        with socket.create_server((host, port), family=_family(host)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from e


def run(app: object, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (the caller ran ``check_binding`` and ``check_port``)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET
