"""What every HTTP response of the fleet says about itself, and how much a request may send.

Responses carry secrets (device secrets shown once, site WiFi passwords and claim keys, the
gateways' key listings): none may be kept by a proxy or a browser cache. The API is JSON for
programs, never a page to frame or sniff. A request body is bounded, so a client cannot make
the service buffer gigabytes (the largest legitimate body is a bulk CSV of 1 MiB), except where
a path is given a limit of its own (a release upload, which is streamed to disk).
"""

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

MAX_BODY_BYTES = 2 * 1024 * 1024  # twice the bulk CSV limit (provisioning.BULK_MAX_BYTES)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


class HttpHygiene:
    """ASGI middleware: the headers above on every response, and 413 past MAX_BODY_BYTES, or
    past the limit `body_limits` gives the request's path (by Content-Length when given, else
    by counting what arrives)."""

    def __init__(self, app: App, *, max_body: int = MAX_BODY_BYTES,
                 body_limits: Mapping[str, int] | None = None,
                 pages: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_body = max_body
        self.body_limits = dict(body_limits or {})
        # Paths of console forms: their route answers a Content-Length past the limit with
        # the form page (a browser would show this JSON to a person); a body that goes on past
        # the limit as it arrives is still cut off here.
        self.pages = pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_body = self.body_limits.get(scope.get("path", ""), self.max_body)
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if (declared is not None and declared.isdigit() and int(declared) > max_body
                and scope.get("path", "") not in self.pages):
            await self._too_large(send, max_body)
            return
        received = 0
        too_large = False  # the body passed the limit: the app hears a disconnect
        answered = False

        async def counted() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def with_headers(message: Message) -> None:
            nonlocal answered
            if too_large:  # whatever the app makes of the cut body, the answer is 413
                if not answered:
                    answered = True
                    await self._too_large(send, max_body)
                return
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        try:
            await self.app(scope, counted, with_headers)
        except Exception:
            if not too_large:
                raise
            # The app gave up on the cut body (Starlette's ClientDisconnect): answered below.
        if too_large and not answered:
            answered = True
            await self._too_large(send, max_body)

    async def _too_large(self, send: Send, max_body: int) -> None:
        body = (b'{"detail":"the request body is larger than %d bytes"}' % max_body)
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})
