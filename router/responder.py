"""A request's choices' outputs -> an OpenAI response body, or a server-sent-event stream of chunks.

A stream that fails after it started (its 200 is already sent) ends with `data: {"error": {...}}` and then
`data: [DONE]`, so clients never wait on a broken stream. The plain case (one choice, text only, no per-chunk
usage) renders each chunk from a template (`_fast_chunk`); everything else goes through the pydantic models.
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

from router.choices import ChoiceResult, best, collect, merged
from router.errors import APIError
from router.generation import Output
from router.job import GenerationJob, RequestPlan
from router.logprobs import TokenText, chat_logprobs, completion_logprobs, concat, echo_logprobs
from router.prompt_logprobs import PromptLogprobs, prompt_logprobs
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
from router.tool_stream import ToolCallStream
from router.tools import parse_output

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
encode_string = json.encoder.encode_basestring  # type: ignore[attr-defined]  # str -> its JSON (C, no escaping of non-ASCII)
CLIENT_GONE = 499  # nginx's status for a client that closed the connection first
Run = Callable[[GenerationJob], AsyncIterator[Output]]


def sse_event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Responder(ABC):
    """Formats one request's outputs; `status` is the outcome once the response is done (for metrics)."""

    def __init__(self, plan: RequestPlan, model: str, texts: TokenText) -> None:
        self.plan = plan
        self.model = model
        self.texts = texts
        self.include_usage = plan.include_usage
        self.want_logprobs = plan.logprobs is not None
        self.want_prompt_logprobs = plan.prompt_logprobs is not None
        self._started: set[int] = set()  # streaming: choices whose first chunk went out (it carries their prompt's)
        self.created = now()
        self.status = 200

    def usage(self, jobs: list[GenerationJob] | None = None) -> UsageInfo:
        """Every prompt once, every choice's tokens (or just these jobs': continuous usage of one choice)."""
        prompt = self.plan.num_prompt_tokens if jobs is None else sum(len(j.prompt_ids) for j in jobs)
        completion = sum(j.num_output_tokens for j in (self.plan.jobs if jobs is None else jobs))
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    _rich = False  # chunks carry more than text (tool-call deltas): never the templated path

    @property
    def _plain(self) -> bool:
        """Whether every chunk is text + finish reason of choice 0: the templated path."""
        return len(self.plan.jobs) == 1 and not self.want_logprobs and not self.plan.continuous_usage \
            and not self._rich and not self.want_prompt_logprobs

    async def collect(self, run: Run) -> dict[str, Any]:
        """The whole response body."""
        results = best(await collect(self.plan.jobs, run), self.plan.best_of, self.plan.n)
        return self._response(results).model_dump(mode="json")

    async def sse(self, run: Run, on_end: Callable[[int], None] | None = None) -> AsyncIterator[str]:
        """`data: {chunk}` events ending with `data: [DONE]`; closing this closes (and so aborts) every choice.
        `on_end(status)` is called once the stream is over, however it ended."""
        try:
            try:
                for chunk in self._opening():
                    yield self._event(chunk)
                if self._plain:  # the per-token path: one choice, text only, from a template (see _template)
                    async with contextlib.aclosing(run(self.plan.jobs[0])) as plain:  # type: ignore[type-var]
                        fast = self._fast_chunk
                        async for out in plain:
                            yield fast(out)
                else:
                    async with contextlib.aclosing(merged(self.plan.jobs, run)) as outputs:  # type: ignore[type-var]
                        async for job, out in outputs:
                            chunk = self._chunk(job, out)
                            if chunk is not None:
                                yield self._event(chunk)
                if self.include_usage:
                    yield self._event(self._usage_chunk())
            except APIError as e:
                log.warning("%s: stream failed: %s", self.plan.request_id, e.message)
                self.status = e.status
                yield sse_event(e.body())
            except (asyncio.CancelledError, GeneratorExit):
                self.status = CLIENT_GONE
                raise
            except Exception:
                log.exception("%s: stream failed", self.plan.request_id)
                self.status = 500
                yield sse_event(APIError(500, "internal router error").body())
            yield DONE
        finally:
            if on_end is not None:
                on_end(self.status)

    def _event(self, chunk: BaseModel) -> str:
        exclude = None if self.include_usage else {"usage"}
        return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"

    def _chunk_usage(self, job: GenerationJob) -> UsageInfo | None:
        return self.usage([job]) if self.plan.continuous_usage else None

    def _fast_chunk(self, out: Output) -> str:
        """The event `_event(_chunk(job, out))` would give for an output without logprobs, with no model built:
        the template's text slot and finish reason filled in (tests/test_router.py checks both give the same)."""
        head, tail = self._template
        finish = "null" if out.finish_reason is None else encode_string(out.finish_reason)
        return f"{head}{self._text_slot(out.text)}{tail[0]}{finish}{tail[1]}"

    @functools.cached_property
    def _template(self) -> tuple[str, tuple[str, str]]:
        """The chunk's JSON around its text and its finish reason, rendered once per request."""
        marker_text, marker_finish = "\x00TEXT\x00", "\x00FINISH\x00"
        chunk = self._chunk(self.plan.jobs[0], Output([], [], marker_text, marker_finish))
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
    def _chunk(self, job: GenerationJob, out: Output) -> BaseModel | None: ...

    @abstractmethod
    def _usage_chunk(self) -> BaseModel: ...

    @abstractmethod
    def _response(self, results: list[ChoiceResult]) -> BaseModel: ...

    def _echo(self, job: GenerationJob) -> str:
        return self.plan.echo[job.index // self.plan.best_of]

    def _prompt_logprobs(self, job: GenerationJob) -> PromptLogprobs | None:
        """vLLM's prompt_logprobs of the job's prompt; None when not asked for (or never received)."""
        if not self.want_prompt_logprobs or job.prompt_logprobs is None:
            return None
        return prompt_logprobs(self.texts.text, job.prompt_ids, job.prompt_logprobs)

    def _first(self, job: GenerationJob) -> bool:
        """Whether this is the choice's first chunk (streaming); it is then counted as sent."""
        first = job.index not in self._started
        self._started.add(job.index)
        return first

    def _index(self, rank: int, job: GenerationJob) -> int:
        """A returned choice's index: prompt * n + its rank among the prompt's returned choices."""
        return job.index // self.plan.best_of * self.plan.n + rank % self.plan.n


class CompletionResponder(Responder):
    """`/v1/completions`: object text_completion, legacy logprobs; echo prepends the prompt (with echo and logprobs,
    the logprobs cover the prompt's tokens first, and a stream echoes the prompt in each choice's first chunk)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}  # per choice: text_offset of its next token

    def _logprobs(self, job: GenerationJob, out: Output, with_prompt: bool) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        offset, head = self._offsets.get(job.index, 0), None
        if with_prompt and self.plan.echo_logprobs:  # the echoed prompt's tokens come first, from offset 0
            head = echo_logprobs(self.texts, job.prompt_ids, job.prompt_logprobs or [], self.plan.logprobs or 0)
            offset = sum(len(t) for t in head.tokens)
        lp = completion_logprobs(self.texts, out.token_ids, out.logprobs, offset)
        self._offsets[job.index] = offset + sum(len(t) for t in lp.tokens)
        return lp if head is None else concat(head, lp)

    def _opening(self) -> list[BaseModel]:
        if self.plan.echo_logprobs:  # the prompt goes out with its logprobs, in each choice's first chunk
            return []
        return [CompletionResponse(id=self.plan.request_id, created=self.created, model=self.model,
                                   choices=[CompletionChoice(index=job.index, text=self._echo(job))])
                for job in self.plan.jobs if self._echo(job)]

    def _chunk(self, job: GenerationJob, out: Output) -> BaseModel | None:
        first = self._first(job) if self.want_prompt_logprobs else False
        text = self._echo(job) + out.text if first and self.plan.echo_logprobs else out.text
        choice = CompletionChoice(index=job.index, text=text, logprobs=self._logprobs(job, out, first),
                                  finish_reason=out.finish_reason,
                                  prompt_logprobs=self._prompt_logprobs(job) if first else None)
        return CompletionResponse(id=self.plan.request_id, created=self.created, model=self.model, choices=[choice],
                                  usage=self._chunk_usage(job))

    def _usage_chunk(self) -> BaseModel:
        return CompletionResponse(id=self.plan.request_id, created=self.created, model=self.model, choices=[],
                                  usage=self.usage())

    def _response(self, results: list[ChoiceResult]) -> BaseModel:
        choices = []
        for rank, r in enumerate(results):
            out = r.merged
            choices.append(CompletionChoice(index=self._index(rank, r.job), text=self._echo(r.job) + out.text,
                                            logprobs=self._logprobs(r.job, out, True), finish_reason=out.finish_reason,
                                            prompt_logprobs=self._prompt_logprobs(r.job)))
        return CompletionResponse(id=self.plan.request_id, created=self.created, model=self.model, choices=choices,
                                  usage=self.usage())


class ChatResponder(Responder):
    """`/v1/chat/completions`: a role delta first, then content (or tool-call) deltas; logprobs.content per token."""

    _text_is_string = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tools = self.plan.tools
        self._tool_streams = ({job.index: ToolCallStream(tools) for job in self.plan.jobs}
                              if tools is not None and tools.parses else {})
        self._rich = bool(self._tool_streams)

    def _text_marker(self, marker: str) -> str:
        return '{"content":' + encode_string(marker) + "}"

    def _text_slot(self, text: str) -> str:
        return '{"content":' + encode_string(text) + "}" if text else "{}"

    def _logprobs(self, out: Output) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        return ChatLogprobs(content=chat_logprobs(self.texts, out.token_ids, out.logprobs))

    def _opening(self) -> list[BaseModel]:
        choices = [ChatChunkChoice(index=job.index, delta=DeltaMessage(role="assistant", content=self._echo(job)))
                   for job in self.plan.jobs]
        return [ChatCompletionChunk(id=self.plan.request_id, created=self.created, model=self.model, choices=[c])
                for c in choices]

    def _chunk(self, job: GenerationJob, out: Output) -> BaseModel | None:
        finish, tools = out.finish_reason, self._tool_streams.get(job.index)
        if tools is None:
            delta = DeltaMessage(content=out.text) if out.text else DeltaMessage()
        else:
            content, calls = tools.push(out.text)
            if finish is not None:
                more, last = tools.finish()
                content, calls = content + more, calls + last
                finish = self._finish_reason(finish, tools.num_calls)
            delta = DeltaMessage(content=content or None, tool_calls=calls or None)
            if not (content or calls or finish or out.logprobs or self._owes_prompt_logprobs(job)):
                return None
        first = self._first(job) if self.want_prompt_logprobs else False
        choice = ChatChunkChoice(index=job.index, delta=delta, logprobs=self._logprobs(out), finish_reason=finish)
        return ChatCompletionChunk(id=self.plan.request_id, created=self.created, model=self.model, choices=[choice],
                                   usage=self._chunk_usage(job),
                                   prompt_logprobs=self._prompt_logprobs(job) if first else None)

    def _owes_prompt_logprobs(self, job: GenerationJob) -> bool:
        return self.want_prompt_logprobs and job.index not in self._started

    def _finish_reason(self, finish: str, num_calls: int) -> str:
        """tool_calls when the model called tools by its own choice (auto) or was made to (required); a named
        tool_choice keeps stop, as OpenAI does."""
        tools = self.plan.tools
        return "tool_calls" if num_calls and tools is not None and tools.mode in ("auto", "required") else finish

    def _usage_chunk(self) -> BaseModel:
        return ChatCompletionChunk(id=self.plan.request_id, created=self.created, model=self.model, choices=[],
                                   usage=self.usage())

    def _message(self, job: GenerationJob, out: Output) -> tuple[ChatResponseMessage, str | None]:
        tools, finish = self.plan.tools, out.finish_reason
        if tools is None or not tools.parses:
            return ChatResponseMessage(content=self._echo(job) + out.text), finish
        content, calls = parse_output(out.text, tools)
        if finish is not None:
            finish = self._finish_reason(finish, len(calls))
        echo = self._echo(job)
        return ChatResponseMessage(content=echo + content if content is not None else echo or None,
                                   tool_calls=calls), finish

    def _response(self, results: list[ChoiceResult]) -> BaseModel:
        choices = []
        for rank, r in enumerate(results):
            out = r.merged
            message, finish = self._message(r.job, out)
            choices.append(ChatChoice(index=self._index(rank, r.job), message=message, logprobs=self._logprobs(out),
                                      finish_reason=finish))
        return ChatCompletionResponse(id=self.plan.request_id, created=self.created, model=self.model,
                                      choices=choices, usage=self.usage(),
                                      prompt_logprobs=self._prompt_logprobs(self.plan.jobs[0]))
