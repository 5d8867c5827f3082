"""router/sse.py: the stream's chunks go to the server's own send; its start and end pass every middleware."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from router.sse import RAW_SEND, RawSend, SSEResponse


async def events() -> AsyncIterator[str]:
    for i in range(3):
        yield f"data: {i}\n\n"


def test_chunks_skip_the_wrappers_and_start_and_end_do_not() -> None:
    server: list[dict[str, Any]] = []
    wrapped: list[str] = []

    async def server_send(message: dict[str, Any]) -> None:
        server.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)  # the client never leaves
        return {"type": "http.disconnect"}

    async def app(scope: dict[str, Any], rcv: Any, send: Any) -> None:  # a middleware that wraps send
        assert scope[RAW_SEND] is server_send

        async def wrapper(message: dict[str, Any]) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            wrapped.append(message["type"] + (" (last)" if last else ""))
            await send(message)

        await SSEResponse(events(), headers={"Cache-Control": "no-cache"})(scope, rcv, wrapper)

    asyncio.run(RawSend(app)({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, server_send))
    assert wrapped == ["http.response.start", "http.response.body (last)"]
    assert [m["type"] for m in server] == ["http.response.start"] + ["http.response.body"] * 4
    assert [m["body"] for m in server[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    headers = dict(server[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream") and headers[b"cache-control"] == b"no-cache"


def test_without_raw_send_in_the_scope_everything_goes_through_send() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    asyncio.run(SSEResponse(events())({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send))
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
