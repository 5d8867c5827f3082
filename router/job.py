"""An OpenAI request -> a `RequestPlan`: its prompts, tokenized and checked, and one `GenerationJob` per choice.

A request with p prompts and n choices each (best_of candidates when best_of > n) makes p * best_of jobs. Job j
of a prompt is that prompt's choice j: its seed is seed + j and, after the first, it forks the first one's
prompt KV (`params.fork_from`, engine/fork.py), so a prompt is computed once whatever n is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.request import SamplingParams
from engine.tokenizer import Tokenizer
from proto import disagg_pb2
from router.config import RouterConfig
from router.errors import APIError, bad_request, context_length_error
from router.params import checked_ids, for_choice, sampling_params, text_options
from router.protocol import ChatCompletionRequest, CompletionRequest, GenerationRequest
from router.registry import WorkerRegistry
from router.structured import grammar_of
from router.text import TextOptions
from router.tools import ToolPlan, conversation, plan_tools, template_speaks_tools

log = logging.getLogger(__name__)


@dataclass
class GenerationJob:
    """One choice, tokenized and checked, ready for the workers (one engine request)."""

    request_id: str  # cmpl-... / chatcmpl-... (choice i of n > 1: with -i); also the id on the workers
    prompt_ids: list[int]  # the whole prompt, chat template applied
    params: SamplingParams  # stop strings are applied by the router, the rest by the workers
    arrival: float  # time.monotonic() when the request arrived
    output_ids: list[int] = field(default_factory=list)  # tokens streamed to the client so far
    index: int = 0  # which of the request's choices (prompt * best_of + sample)
    text: TextOptions = field(default_factory=TextOptions)
    leader: GenerationJob | None = None  # the choice whose prompt KV this one forks (params.fork_from)
    placed: asyncio.Event = field(default_factory=asyncio.Event)  # set once a decode worker has this job (or it
    # ended without one): its siblings then go to `placed_on`, where its prompt KV is
    placed_on: str | None = None
    # params.prompt_logprobs: the first complete set a worker sent (one entry per prompt token after the first)
    prompt_logprobs: list[disagg_pb2.TokenLogprob] | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def wire_params(self) -> SamplingParams:
        """The parameters to send a worker now: prompt logprobs only until one has sent them (the decode after a
        prefill, or a migration, need not compute them again, and may then use its prefix cache)."""
        if self.prompt_logprobs is None:
            return self.params
        return dataclasses.replace(self.params, prompt_logprobs=None)

    def keep_prompt_logprobs(self, entries: Sequence[disagg_pb2.TokenLogprob]) -> None:
        """Keep the prompt logprobs that came with an output, if they are the first complete set (a worker sends
        them with its first output when it computed the prompt; a one-token prompt has none to send)."""
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None \
                and len(entries) == len(self.prompt_ids) - 1:
            self.prompt_logprobs = list(entries)


@dataclass
class RequestPlan:
    """One HTTP request: its jobs and what the response needs to know about them."""

    request_id: str
    jobs: list[GenerationJob]  # prompt p's candidates are jobs[p * best_of : (p + 1) * best_of]
    prompts: list[list[int]]
    n: int  # choices returned per prompt
    best_of: int  # candidates generated per prompt (the n with the highest cumulative logprob are returned)
    echo: list[str]  # per prompt: text every choice of it starts with ("" without echo)
    logprobs: int | None  # what the client asked for (None: no logprobs in the response)
    prompt_logprobs: int | None = None  # asked for (or implied by echo with logprobs): in the response
    echo_logprobs: bool = False  # completions echo with logprobs: the legacy logprobs cover the prompt too
    tools: ToolPlan | None = None
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class JobBuilder:
    """Tokenizes and validates requests; every problem is an `APIError` with the status the client should see."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, workers: WorkerRegistry) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = workers

    def completion(self, req: CompletionRequest, arrival: float) -> RequestPlan:
        self._check_common(req)
        if req.suffix is not None:
            raise bad_request("suffix is not supported", param="suffix")
        echo_logprobs = bool(req.echo) and req.logprobs is not None
        if echo_logprobs and req.prompt_logprobs is None:  # vLLM's rule: echo with logprobs scores the prompt too
            req = req.model_copy(update={"prompt_logprobs": req.logprobs})
        prompts = [self._prompt_ids(p) for p in req.prompts]
        echo = [("" if not req.echo else p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False))
                for p in req.prompts]
        plan = self._plan("cmpl", req, prompts, echo, req.max_tokens, req.logprobs, arrival, None)
        plan.echo_logprobs = echo_logprobs
        return plan

    def chat(self, req: ChatCompletionRequest, arrival: float) -> RequestPlan:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        tools = plan_tools(req)
        ids = self.tokenizer.encode(self._render(req, tools), add_special_tokens=bool(req.add_special_tokens))
        last = req.messages[-1]
        echo = last.text if req.echo and last.role == "assistant" else ""
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._plan("chatcmpl", req, [ids], [echo], req.requested_max_tokens, logprobs, arrival, tools)

    def _render(self, req: ChatCompletionRequest, tools: ToolPlan | None) -> str:
        native = template_speaks_tools(self.tokenizer)
        messages = conversation(req, tools, native)
        kwargs = dict(req.chat_template_kwargs or {})
        if native and tools is not None and tools.mode != "none":
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools.tools]
        cont = bool(req.continue_final_message)
        if cont and req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              param="continue_final_message")
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=not cont and
                                                        req.add_generation_prompt is not False, **kwargs)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        if cont:  # cut after the final message's text, leaving it open (as transformers does)
            final = req.messages[-1].text.strip()
            prompt = prompt[: prompt.rfind(final) + len(final)] if final and final in prompt else prompt
        return prompt

    def max_model_len(self) -> int:
        """The context length to enforce: the configured one, else the smallest any worker reported."""
        n = self.config.max_model_len or self.workers.max_model_len()
        if n is None:
            raise APIError(503, "no worker has reported its context length yet", code="no_healthy_worker")
        return n

    def _check_common(self, req: GenerationRequest) -> None:
        if req.model != self.config.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        n, limit = req.n if req.n is not None else 1, self.config.max_n
        if not 1 <= n <= limit:
            raise bad_request(f"n must be between 1 and {limit} (router.max_n), got {n}", param="n")
        best_of = req.best_of if req.best_of is not None else n
        if not n <= best_of <= limit:
            raise bad_request(f"best_of must be between n ({n}) and {limit} (router.max_n), got {best_of}",
                              param="best_of")
        if req.stream and best_of > n:
            raise bad_request("best_of > n cannot be streamed", param="best_of")

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        ids = checked_ids(self.tokenizer, prompt, "prompt") if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        return ids

    def _truncated(self, req: GenerationRequest, ids: list[int]) -> list[int]:
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        if k == -1:
            k = self.max_model_len() - 1
        if k < 1:
            raise bad_request(f"truncate_prompt_tokens must be -1 or at least 1, got {k}",
                              param="truncate_prompt_tokens")
        return ids[-k:]

    def _plan(self, prefix: str, req: GenerationRequest, prompts: list[list[int]], echo: list[str],
              max_tokens: int | None, logprobs: int | None, arrival: float, tools: ToolPlan | None) -> RequestPlan:
        n = req.n or 1
        best_of = req.best_of or n
        prompts = [self._truncated(req, p) for p in prompts]
        grammar = grammar_of(req, tools.grammar() if tools else None)
        # Ranking best_of candidates needs each token's logprob: asked of the workers even when not shown.
        wire_logprobs = logprobs if logprobs is not None or best_of == n else 0
        rid = f"{prefix}-{uuid.uuid4().hex}"
        jobs: list[GenerationJob] = []
        for p, ids in enumerate(prompts):
            params = sampling_params(req, self.tokenizer, self._max_tokens(len(ids), max_tokens), wire_logprobs,
                                     grammar)
            jobs += self._choices(rid if len(prompts) == 1 else f"{rid}-{p}", ids, params, best_of,
                                  arrival, text_options(req, params), p * best_of)
        return RequestPlan(rid, jobs, prompts, n, best_of, echo, logprobs, req.prompt_logprobs, False, tools,
                           bool(req.stream), req.include_usage, req.continuous_usage)

    @staticmethod
    def _choices(base: str, ids: list[int], params: SamplingParams, count: int, arrival: float, text: TextOptions,
                 first_index: int) -> list[GenerationJob]:
        leader = GenerationJob(base if count == 1 else f"{base}-0", ids, params, arrival, index=first_index,
                               text=text)
        out = [leader]
        for j in range(1, count):
            out.append(GenerationJob(f"{base}-{j}", ids, for_choice(params, j, leader.request_id), arrival,
                                     index=first_index + j, text=text, leader=leader))
        return out

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        if requested is not None and requested < 1:
            raise bad_request(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        limit = self.max_model_len()
        if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
            raise context_length_error(limit, prompt_len, requested)
        return requested if requested is not None else limit - prompt_len
