"""A generation's outputs -> an OpenAI response body, or a server-sent-event stream of chunks.

A stream that fails after it started (its 200 is already sent) ends with `data: {"error": {...}}` and then
`data: [DONE]`, so clients never wait on a broken stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel

from router.errors import APIError
from router.generation import Output
from router.job import GenerationJob
from router.logprobs import TokenText, chat_logprobs, completion_logprobs
from router.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
    now,
)

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
encode_string = json.encoder.encode_basestring  # type: ignore[attr-defined]  # str -> its JSON (C, no escaping of non-ASCII)
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first


def sse_event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Responder(ABC):
    """Formats one request's outputs; `status` is the outcome once the response is done (for metrics)."""

    def __init__(self, job: GenerationJob, model: str, texts: TokenText, include_usage: bool = False) -> None:
        self.job = job
        self.model = model
        self.texts = texts
        self.include_usage = include_usage
        self.want_logprobs = job.params.logprobs is not None
        self.created = now()
        self.status = 200

    def usage(self) -> UsageInfo:
        prompt, completion = len(self.job.prompt_ids), self.job.num_output_tokens
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def collect(self, outputs: AsyncIterator[Output]) -> dict[str, Any]:
        """The whole response body."""
        async with contextlib.aclosing(outputs):  # type: ignore[type-var]
            outs = [out async for out in outputs]
        return self._response(outs).model_dump(mode="json")

    async def sse(self, outputs: AsyncIterator[Output], on_end: Callable[[int], None] | None = None
                  ) -> AsyncIterator[str]:
        """`data: {chunk}` events ending with `data: [DONE]`; closing this closes (and so aborts) `outputs`.
        `on_end(status)` is called once the stream is over, however it ended."""
        try:
            try:
                async with contextlib.aclosing(outputs):  # type: ignore[type-var]
                    for chunk in self._opening():
                        yield self._event(chunk)
                    fast = self._fast_chunk if not self.want_logprobs else None
                    async for out in outputs:
                        if fast is not None:  # the per-token path: text only, from a template (see _template)
                            yield fast(out)
                            continue
                        chunk = self._chunk(out)
                        if chunk is not None:
                            yield self._event(chunk)
                if self.include_usage:
                    yield self._event(self._usage_chunk())
            except APIError as e:
                log.warning("%s: stream failed: %s", self.job.request_id, e.message)
                self.status = e.status
                yield sse_event(e.body())
            except (asyncio.CancelledError, GeneratorExit):
                self.status = CLIENT_GONE
                raise
            except Exception:
                log.exception("%s: stream failed", self.job.request_id)
                self.status = 500
                yield sse_event(APIError(500, "internal router error").body())
            yield DONE
        finally:
            if on_end is not None:
                on_end(self.status)

    def _event(self, chunk: BaseModel) -> str:
        exclude = None if self.include_usage else {"usage"}
        return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"

    def _fast_chunk(self, out: Output) -> str:
        """The event `_event(_chunk(out))` would give for an output without logprobs, with no model built: the
        template's text slot and finish reason filled in (tests/test_router.py checks both give the same)."""
        head, tail = self._template
        finish = "null" if out.finish_reason is None else encode_string(out.finish_reason)
        return f"{head}{self._text_slot(out.text)}{tail[0]}{finish}{tail[1]}"

    @functools.cached_property
    def _template(self) -> tuple[str, tuple[str, str]]:
        """The chunk's JSON around its text and its finish reason, rendered once per request."""
        marker_text, marker_finish = "\x00TEXT\x00", "\x00FINISH\x00"
        chunk = self._chunk(Output([], [], marker_text, marker_finish))
        assert chunk is not None
        event = self._event(chunk)
        head, rest = event.split(encode_string(marker_text) if self._text_is_string else self._text_marker(marker_text))
        middle, end = rest.split(encode_string(marker_finish))
        return head, (middle, end)

    _text_is_string = True

    def _text_slot(self, text: str) -> str:
        return encode_string(text)

    def _text_marker(self, marker: str) -> str:
        return encode_string(marker)

    def _opening(self) -> list[BaseModel]:
        return []

    @abstractmethod
    def _chunk(self, out: Output) -> BaseModel | None: ...

    @abstractmethod
    def _usage_chunk(self) -> BaseModel: ...

    @abstractmethod
    def _response(self, outs: list[Output]) -> BaseModel: ...


class CompletionResponder(Responder):
    """`/v1/completions`: object text_completion, legacy logprobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offset = 0  # text_offset of the next token

    def _logprobs(self, out: Output) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        lp = completion_logprobs(self.texts, out.token_ids, out.logprobs, self._offset)
        self._offset += sum(len(t) for t in lp.tokens)
        return lp

    def _chunk(self, out: Output) -> BaseModel | None:
        choice = CompletionChoice(text=out.text, logprobs=self._logprobs(out), finish_reason=out.finish_reason)
        return CompletionResponse(id=self.job.request_id, created=self.created, model=self.model, choices=[choice])

    def _usage_chunk(self) -> BaseModel:
        return CompletionResponse(id=self.job.request_id, created=self.created, model=self.model, choices=[],
                                  usage=self.usage())

    def _response(self, outs: list[Output]) -> BaseModel:
        merged = _merge(outs)
        choice = CompletionChoice(text=merged.text, logprobs=self._logprobs(merged), finish_reason=merged.finish_reason)
        return CompletionResponse(id=self.job.request_id, created=self.created, model=self.model, choices=[choice],
                                  usage=self.usage())


class ChatResponder(Responder):
    """`/v1/chat/completions`: a role delta first, then content deltas; logprobs.content per token."""

    _text_is_string = False

    def _text_marker(self, marker: str) -> str:
        return '{"content":' + encode_string(marker) + "}"

    def _text_slot(self, text: str) -> str:
        return '{"content":' + encode_string(text) + "}" if text else "{}"

    def _logprobs(self, out: Output) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(self.texts, out.token_ids, out.logprobs))

    def _opening(self) -> list[BaseModel]:
        choice = ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))
        return [ChatCompletionChunk(id=self.job.request_id, created=self.created, model=self.model, choices=[choice])]

    def _chunk(self, out: Output) -> BaseModel | None:
        delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
        choice = ChatChunkChoice(delta=delta, logprobs=self._logprobs(out), finish_reason=out.finish_reason)
        return ChatCompletionChunk(id=self.job.request_id, created=self.created, model=self.model, choices=[choice])

    def _usage_chunk(self) -> BaseModel:
        return ChatCompletionChunk(id=self.job.request_id, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def _response(self, outs: list[Output]) -> BaseModel:
        merged = _merge(outs)
        choice = ChatChoice(message=ChatResponseMessage(content=merged.text), logprobs=self._logprobs(merged),
                            finish_reason=merged.finish_reason)
        return ChatCompletionResponse(id=self.job.request_id, created=self.created, model=self.model,
                                      choices=[choice], usage=self.usage())


def _merge(outs: list[Output]) -> Output:
    return Output(
        token_ids=[t for o in outs for t in o.token_ids],
        logprobs=[lp for o in outs for lp in o.logprobs],
        text="".join(o.text for o in outs),
        finish_reason=outs[-1].finish_reason if outs else None,
    )
