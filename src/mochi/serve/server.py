"""Running the app: the binding rule, and uvicorn.

A server reachable from other machines runs generations (and so spends the GPU) for anyone who can reach
it, so binding to any address other than loopback needs a bearer token; without one the server refuses
to start. ``check_options`` refuses the other bad values of `mochi serve` before any model is loaded.

uvicorn (0.54) times out idle kept-alive connections but never a request that is still arriving: a client
sending its headers or body a byte at a time holds a connection (and a task) for ever.
``slow_request_protocol`` gives each request ``REQUEST_TIMEOUT`` seconds to arrive whole (an upload's body:
that long between its pieces), then answers 408 and closes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import math
import socket
from collections.abc import Callable
from pathlib import Path

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
MIN_TOKEN_CHARS = 16
# Seconds a request (line, headers and body: a job request is a few kB) may take to arrive.
REQUEST_TIMEOUT = 30.0


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
    if token is not None and len(token.strip()) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"--token has {len(token.strip())} characters; a bearer token needs at least {MIN_TOKEN_CHARS} "
            "(a long random string, e.g. from `openssl rand -hex 24`)"
        )
    if token is not None and (bad := next((c for c in token if not "!" <= c <= "~"), None)) is not None:
        # HTTP headers carry bytes that clients and servers decode differently beyond ASCII (latin-1 or
        # UTF-8), and whitespace splits the header, so such a token could never be presented reliably.
        raise ValueError(
            f"--token holds {bad!r} at position {token.index(bad)}; a bearer token must be visible ASCII "
            "characters (letters, digits, punctuation; no spaces), e.g. from `openssl rand -hex 24`"
        )
    if not is_loopback(host) and token is None:
        raise ValueError(
            f"--host {host} exposes the server beyond this machine, which needs a bearer token: pass "
            "--token TOKEN (or set MOCHI_SERVE_TOKEN), or bind to 127.0.0.1"
        )


def check_port(host: str, port: int) -> None:
    """Refuse (ValueError) a port out of range or already taken, before any model is loaded."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must be in 0..65535 (7860 is the default)")
    try:  # bracketed as run() binds it: --host [::1] was refused here ("Name or service not known")
        with socket.create_server((host.strip("[]"), port), family=_family(host)):
            pass
    except OSError as e:
        # Only a taken port is the port's fault: a name that does not resolve (a resolver's error: a negative
        # errno, create_server re-raises it as a plain OSError), or an address this machine does not have,
        # was told to pick another --port.
        not_here = e.errno is not None and (e.errno < 0 or e.errno == errno.EADDRNOTAVAIL)
        hint = "an address of this machine, e.g. 127.0.0.1" if not_here else "another --port"
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick {hint}") from e


def check_options(out_dir: str, queue_size: int, fps: float) -> None:
    """Refuse (ValueError) values of `mochi serve` that would fail only later (every job, or after loading
    the model); create ``out_dir`` so that an unwritable one is found now."""
    if queue_size < 1:
        raise ValueError(
            f"--queue-size {queue_size} must be at least 1 (jobs that may wait; 8 is the default)"
        )
    if not (math.isfinite(fps) and 0.1 <= fps <= 240):  # 0.1: the least rate a video is written at
        nearest = 0.1 if not fps > 240 else 240
        raise ValueError(
            f"--fps {fps} must be a number from 0.1 to 240; nearest valid: {nearest:g} (Mochi's videos are "
            "30 fps)"
        )
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out-dir {out_dir!r} is a file, not a folder; name a folder (it is created)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir!r} cannot be created: {e.strerror or e}") from None


def slow_request_protocol(
    timeout: float = REQUEST_TIMEOUT, streamed: tuple[str, ...] = ("/api/uploads",)
) -> type:
    """uvicorn's h11 protocol, answering 408 and closing when a request has not fully arrived ``timeout``
    seconds after its connection opened (or after the previous response on a kept-alive connection).

    The body of a request to a ``streamed`` path (an upload of up to 512 MiB) may take as long as it keeps
    arriving: there ``timeout`` counts from the last bytes received, not from the start."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from mochi.serve.errors import error_json

    body = error_json(f"the request did not arrive within {timeout:g} s")
    timed_out = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    timed_out += b"content-length: %d\r\n\r\n%s" % (len(body), body)

    class SlowRequestTimeout(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
            self._request_timer = self.loop.call_later(timeout, self._expire)

        def _expire(self) -> None:
            if self.transport.is_closing() or self.conn.their_state is h11.DONE:
                return  # arrived whole (a slow response is not the client's fault)
            if self.conn.their_state is h11.IDLE:
                answer = bool(self.conn.trailing_data[0])  # none: nothing sent, closed without a word
            else:  # the body is still arriving; answer unless the app already has
                answer = self.cycle is None or not self.cycle.response_started
            if answer:
                self.transport.write(timed_out)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            cycle, receiving = self.cycle, self.conn.their_state is h11.SEND_BODY
            if cycle is not None and receiving and cycle.scope["path"].startswith(streamed):
                self._arm()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
            super().connection_lost(exc)

    return SlowRequestTimeout


def url(host: str, port: int) -> str:
    """The address a browser opens: an IPv6 host in brackets (``http://[::1]:7860/``)."""
    bare = host.strip("[]")
    return f"http://[{bare}]:{port}/" if ":" in bare else f"http://{bare}:{port}/"


def run(
    app: object,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
    stopping: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` with uvicorn until interrupted (the caller ran ``check_binding`` and ``check_port``).
    ``ready(url)`` is told the address once the socket listens (port 0: the one the system chose);
    ``stopping()`` is called as the shutdown begins, before uvicorn waits for open connections to end."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn waits up to timeout_graceful_shutdown for every response to end: an event stream (every
            # open page holds one) ends only once told, so a Ctrl-C took 5 s and logged a CancelledError.
            if stopping is not None:
                stopping()
            await super().shutdown(sockets)

    sock = socket.create_server((host.strip("[]"), port), family=_family(host))
    try:
        if ready is not None:
            ready(url(host, sock.getsockname()[1]))
        config = uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=5,
            http=slow_request_protocol(),
            timeout_keep_alive=5,
        )
        Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET
