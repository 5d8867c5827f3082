"""The streamed response: Server-Sent Events whose body chunks go straight to the HTTP server.

A token's event is the router's most frequent write (one per streamed token). Through Starlette's
`StreamingResponse` each chunk's `send` passes the wrappers every middleware layer puts around `send` (error
handling, exception handling, telemetry: each checks the message type to learn whether the response started or
ended). `RawSend`, the outermost ASGI layer, keeps the server's own `send` in the scope; `SSEResponse` sends the
response start and its end through the wrapped `send`, so every layer still sees the response begin and finish,
and the chunks in between through the server's. Disconnects are handled as `StreamingResponse` handles them (the
task that listens for `http.disconnect` cancels the stream, closing its generator, which aborts the request).
"""

from __future__ import annotations

from collections.abc import AsyncIterable

from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

RAW_SEND = "disagg.raw_send"  # scope key: the server's send, set by RawSend


class RawSend:
    """Outermost ASGI layer: records the server's `send` in the scope of every HTTP request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


class SSEResponse(StreamingResponse):
    """`text/event-stream` from an async iterable of str events; body chunks skip the middleware wrappers."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterable[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(events, headers=headers)
        self._raw: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._raw = scope.get(RAW_SEND)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        raw = self._raw or send
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.body_iterator:
            await raw({"type": "http.response.body", "body": event.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
