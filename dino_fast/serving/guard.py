"""The ASGI middleware in front of every request: the API key, the body limits, the metrics.

Refused before the application runs: a request without the API key (401, when the server has
one; ``/`` and ``/health`` stay open), a ``Content-Length`` above the body limit (413). While the
body streams in, ``receive`` raises :class:`BodyTooLarge` past the limit (a chunked body
declares no length) and :class:`BodyTimeout` when the client sends nothing for
``body_timeout_s``: the route answers them (413, 408), so a client that stops sending holds
nothing for long. Every answered request is counted in :class:`Metrics`.
"""
import asyncio
import hmac
import json
import time

OPEN_PATHS = ("/", "/health")


class BodyTooLarge(Exception):
    """The request body went past the server's limit."""


class BodyTimeout(Exception):
    """The client sent no part of the body for the timeout."""


async def send_error(send, status: int, message: str):
    """Answer with ``{"error": message}`` and ``status``."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Wrap an ASGI ``app`` with the checks above; ``api_key`` None leaves it open."""

    def __init__(self, app, metrics, max_body_bytes: int, body_timeout_s: float,
                 api_key: str | None = None):
        self.app, self.metrics = app, metrics
        self.max_body, self.body_timeout = max_body_bytes, body_timeout_s
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal:
                await send_error(counted_send, *refusal)
            else:
                await self.app(scope, self.limited(receive), counted_send)
        finally:
            self.metrics.observe_request(scope["path"], status[0], time.perf_counter() - start)

    def refusal(self, scope) -> tuple[int, str] | None:
        """``(status, message)`` when the request is refused from its headers alone."""
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            return 401, ("missing or wrong API key: send it as the X-API-Key header (the "
                         "server reads it from DINO_FAST_API_KEY)")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return 400, f"invalid Content-Length {length.decode(errors='replace')!r}"
        if int(length) > self.max_body:
            return 413, (f"request body of {int(length)} bytes is over the limit of "
                         f"{self.max_body} bytes (--max_body_mb)")
        return None

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(
            b"Bearer ")
        return hmac.compare_digest(given, self.api_key)

    def limited(self, receive):
        """``receive`` that raises :class:`BodyTooLarge` or :class:`BodyTimeout`."""
        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # later calls wait for the disconnect: no timeout on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except TimeoutError:
                raise BodyTimeout(f"the client sent no data for {self.body_timeout:g} s "
                                  "(--body_timeout_s); request dropped") from None
            body_done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(f"request body over the limit of {self.max_body} bytes "
                                   "(--max_body_mb)")
            return message
        return limited_receive
