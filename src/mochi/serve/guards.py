"""The checks in front of the app: on the request line and headers before any body is read, then on a
JSON body (read whole, at most ``max_body`` bytes) before the app sees it.

``RequestGuard`` (ASGI middleware, outermost) refuses, in this order:
  400  a Host that is not a loopback name, when the server has no token (DNS rebinding; see ``host_refusal``);
  401  a state-changing request (any method but GET, HEAD, OPTIONS) without the bearer token, when the server
       has one: so an unauthenticated client cannot make the server read, buffer or parse a body;
  405  a method no route serves at the path, with ``Allow`` listing every method some route there serves
       (Starlette's router names only the first route's, so ``/api/jobs/{id}`` said "GET" to a POST though
       DELETE is served too);
  415  a POST, PUT or PATCH (or a request of another method with a body) whose Content-Type is not
       application/json. Browsers send other types (text/plain, forms, a Blob without a type,
       ``navigator.sendBeacon``) cross-site without a CORS preflight; FastAPI before 0.132 parsed such bodies
       as JSON, so this check, not FastAPI's, is what stops a page elsewhere from starting jobs;
  413  a body larger than ``max_body`` bytes: a declared Content-Length at once, a chunked body as soon as
       it passes the limit (at most ``max_body`` bytes are ever held);
  422  a JSON body (to a served path) that is not UTF-8: bytes that do not decode, or a NUL byte (UTF-16 or
       UTF-32, which FastAPI's json.loads(bytes) would read; RFC 8259 asks for UTF-8).
A route taking another type (a video upload) is named in ``uploads``: path prefix → (accepted media types,
largest body); such a route streams its body and enforces that limit itself for chunked bodies. The
types browsers send cross-site without a preflight (``CORS_SAFELISTED``) are never
accepted, whatever ``uploads`` says.
HEAD is served wherever GET is: the request runs as a GET and only its head is sent (FastAPI routes, unlike
Starlette's, do not add HEAD, so monitors' ``curl -I`` got 405), and OPTIONS answers 204 with ``Allow``.
It adds to every response ``X-Frame-Options: DENY`` and ``Content-Security-Policy: frame-ancestors 'none'``
(no other site may frame the page and trick clicks on it), and ``X-Content-Type-Options: nosniff``.
Replies are ``ErrorBody`` JSON (``mochi.serve.errors``).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import anyio
from starlette.routing import Match

from mochi.serve.errors import error_json
from mochi.serve.server import is_loopback

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

# A job request is a few kilobytes (two 4000-character prompts, \u-escaped, are under 50 kB).
DEFAULT_MAX_BODY = 1 << 20
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# What a <form> or a no-cors fetch can send cross-site without a CORS preflight (the Fetch standard).
CORS_SAFELISTED = ("", "text/plain", "multipart/form-data", "application/x-www-form-urlencoded")
BODY_METHODS = ("POST", "PUT", "PATCH")
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
]
Uploads = dict[str, tuple[tuple[str, ...], int]]
AUTH_CHALLENGE = [(b"www-authenticate", b'Bearer realm="mochi"')]


def host_refusal(headers: dict[bytes, bytes]) -> str | None:
    """Why a request to a server without a token is refused for its Host header, or None when it is served.

    Without a token the server trusts whoever can reach it, which on loopback means this machine. A page
    elsewhere can still reach it through DNS rebinding (its own name resolving to 127.0.0.1); such a
    request is recognised by its foreign Host header.
    """
    host = headers.get(b"host", b"").decode("latin-1")
    name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
    if is_loopback(name):
        return None
    return f"host {name[:100]!r} is not this machine; without a token only loopback is served"


def bearer_ok(headers: dict[bytes, bytes], token: str) -> bool:
    """Whether the Authorization header carries ``token`` (compared in constant time)."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(given.strip(), token.encode())


def media_type(headers: dict[bytes, bytes]) -> str:
    return headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()


async def reply(
    send: Send, status: int, detail: str, headers: list | None = None, errors: list | None = None
) -> None:
    """Send an ErrorBody reply and close the connection (the unread body is never drained)."""
    body = error_json(detail, errors)
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(b"connection", b"close"), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def served_methods(scope: Scope) -> set[str] | None:
    """The methods the app's routes serve at the request's path, or None when no route matches it (the
    router's 404) or one takes any method (a mount)."""
    router = getattr(scope.get("app"), "router", None)
    methods: set[str] = set()
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        if getattr(route, "methods", None) is None:
            return None
        methods |= set(route.methods)
    return methods or None


def allowed_methods(served: set[str]) -> set[str]:
    """What a path answers: its routes' methods, HEAD wherever GET is, and OPTIONS."""
    return served | {"HEAD", "OPTIONS"} if "GET" in served else served | {"OPTIONS"}


def allow_header(served: set[str]) -> list[tuple[bytes, bytes]]:
    return [(b"allow", ", ".join(sorted(allowed_methods(served))).encode())]


async def head_of_get(app: Callable, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve a HEAD request as the GET it stands for, sending the response's head and no body. The GET
    stops once its head is sent (an event stream would otherwise run on)."""
    with anyio.CancelScope() as scope_of_get:

        async def head_only(message: dict) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                scope_of_get.cancel()

        await app({**scope, "method": "GET"}, receive, head_only)


class RequestGuard:
    """ASGI middleware: the checks of this module's docstring. ``token``: the server's bearer token, or None
    (then only loopback Host names are served). ``max_body``: the largest JSON body accepted, bytes.
    ``uploads``: path prefix → (media types, largest body in bytes) for routes taking other bodies."""

    def __init__(
        self,
        app: Callable,
        *,
        token: str | None,
        max_body: int = DEFAULT_MAX_BODY,
        uploads: Uploads | None = None,
    ) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.uploads = dict(uploads or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.token is None and host_refusal(dict(scope["headers"])):
            await send({"type": "websocket.close", "code": 1008})  # policy violation: the same rule as HTTP
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        served = served_methods(scope)  # once per request: it matches the path against every route
        refusal, receive = await self._check(scope, receive, served)
        if refusal is not None:
            await reply(send_secured, *refusal)
            return
        if served is not None and scope["method"] == "OPTIONS" and "OPTIONS" not in served:
            head = {"type": "http.response.start", "status": 204, "headers": allow_header(served)}
            await send_secured(head)
            await send_secured({"type": "http.response.body", "body": b""})
        elif served is not None and scope["method"] == "HEAD" and "HEAD" not in served and "GET" in served:
            await head_of_get(self.app, scope, receive, send_secured)
        else:
            await self.app(scope, receive, send_secured)

    async def _check(
        self, scope: Scope, receive: Receive, served: set[str] | None
    ) -> tuple[tuple | None, Receive]:
        headers = dict(scope["headers"])
        method = scope["method"].upper()
        if self.token is None and (why := host_refusal(headers)) is not None:
            return (400, why), receive
        if method not in SAFE_METHODS and self.token is not None and not bearer_ok(headers, self.token):
            return (401, "missing or wrong bearer token", AUTH_CHALLENGE), receive
        if served is not None and method not in allowed_methods(served):
            allow = allow_header(served)
            why = f"{method[:20]} is not served at {scope['path'][:100]}; it takes {allow[0][1].decode()}"
            return (405, why, allow), receive
        if method in SAFE_METHODS:
            return None, receive
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        has_body = chunked or (length is not None and length.strip() not in (b"", b"0"))
        path = scope["path"]
        upload = next((rule for prefix, rule in self.uploads.items() if path.startswith(prefix)), None)
        accepted, limit = upload or (("application/json",), self.max_body)
        given = media_type(headers)
        if (method in BODY_METHODS or has_body) and (
            not _accepts(given, accepted) or given in CORS_SAFELISTED
        ):
            wanted = " or ".join(a + "*" if a.endswith("/") else a for a in accepted)
            return (
                415,
                f"Content-Type {given[:100] or 'none'!r} refused: send the body as {wanted}",
            ), receive
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return (413, _too_large(f"{int(length)} bytes", limit)), receive
        if upload is None and served is not None and (method in BODY_METHODS or has_body):
            # Read whole (JSON bodies are small): to hold a chunked one to the limit, and to take JSON as
            # UTF-8 only (RFC 8259), which FastAPI's json.loads(bytes) did not: it read UTF-16 and UTF-32.
            refusal, receive, body = await _buffered(receive, limit)
            return refusal or _not_utf8(body), receive
        # An upload route streams its body to disk and stops at its own limit: holding up to that many
        # bytes in memory here would defeat it.
        return None, receive


def _too_large(size: str, limit: int) -> str:
    return f"request body of {size} refused: at most {limit} bytes are accepted"


async def _buffered(receive: Receive, limit: int) -> tuple[tuple | None, Receive, bytes]:
    """Read a body up to ``limit`` bytes (413 beyond), then hand it on as one message; also the bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left; let the app see it
            return None, _replay([message], receive), b""
        size += len(message.get("body", b""))
        if size > limit:
            return (413, _too_large(f"more than {limit} bytes", limit)), receive, b""
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            body = b"".join(chunks)
            return None, _replay([{"type": "http.request", "body": body}], receive), body


def _not_utf8(body: bytes) -> tuple[int, str, None, list[dict]] | None:
    """422 for a JSON body that is not UTF-8: bytes that do not decode, or a NUL byte (no JSON text holds
    one raw: UTF-16 or UTF-32, which json.loads would have read)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        why = f"not UTF-8 (byte {body[e.start]:#04x} at offset {e.start}); send JSON as UTF-8"
    else:
        if (at := body.find(b"\x00")) < 0:
            return None
        why = f"not UTF-8 (a NUL byte at offset {at}: UTF-16 or UTF-32?); send JSON as UTF-8"
    return 422, f"body: {why}", None, [{"field": "body", "message": why}]


def _replay(messages: list[dict], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> dict:
        return pending.pop(0) if pending else await receive()

    return replayed


def _accepts(given: str, accepted: tuple[str, ...]) -> bool:
    """Whether media type ``given`` is one of ``accepted``, where an entry ending in "/" ("video/") takes any
    subtype of it."""
    return any(
        given == a or (a.endswith("/") and given.startswith(a) and len(given) > len(a)) for a in accepted
    )
