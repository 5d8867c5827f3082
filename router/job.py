"""An OpenAI request -> a `GenerationJob`: prompt token ids plus checked sampling parameters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields

from engine.request import InvalidRequestError, SamplingParams
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.errors import APIError, bad_request, context_length_error
from router.protocol import ChatCompletionRequest, CompletionRequest
from router.registry import WorkerRegistry

# SamplingParams fields an OpenAI request carries under the same name are copied by name; these are derived.
_DERIVED = frozenset({"max_tokens", "logprobs", "stop", "stop_token_ids"})
# Longest first, so an engine error message is attributed to the most specific field it starts with.
_PARAM_NAMES = sorted((f.name for f in fields(SamplingParams)), key=len, reverse=True)


@dataclass
class GenerationJob:
    """One request, tokenized and checked, ready for the workers."""

    request_id: str  # cmpl-... / chatcmpl-...; also the id on the workers
    prompt_ids: list[int]  # the whole prompt, chat template applied
    params: SamplingParams  # stop strings are applied by the router, the rest by the workers
    arrival: float  # time.monotonic() when the request arrived
    output_ids: list[int] = field(default_factory=list)  # tokens streamed to the client so far

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)


class JobBuilder:
    """Tokenizes and validates requests; every problem is an `APIError` with the status the client should see."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, workers: WorkerRegistry) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.workers = workers

    def completion(self, req: CompletionRequest, arrival: float) -> GenerationJob:
        self._check_common(req.model, req.n)
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
            ids = self._checked_ids(list(req.prompt), "prompt")  # type: ignore[arg-type]
        else:
            text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            ids = self.tokenizer.encode(str(text))
        if not ids:
            raise bad_request("prompt must not be empty", param="prompt")
        return self._job("cmpl", req, ids, req.max_tokens, req.logprobs, arrival)

    def chat(self, req: ChatCompletionRequest, arrival: float) -> GenerationJob:
        self._check_common(req.model, req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        try:
            prompt = self.tokenizer.apply_chat_template([m.for_template() for m in req.messages],
                                                        add_generation_prompt=True)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._job("chatcmpl", req, ids, req.requested_max_tokens, logprobs, arrival)

    def max_model_len(self) -> int:
        """The context length to enforce: the configured one, else the smallest any worker reported."""
        n = self.config.max_model_len or self.workers.max_model_len()
        if n is None:
            raise APIError(503, "no worker has reported its context length yet", code="no_healthy_worker")
        return n

    def _check_common(self, model: str, n: int | None) -> None:
        if model != self.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if n not in (None, 1):
            raise bad_request(f"n must be 1 (several choices per request are not supported), got {n}", param="n")

    def _checked_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"{param} holds token ids outside the vocabulary (size {vocab}): {bad[:5]}", param=param)
        return ids

    def _job(self, prefix: str, req: CompletionRequest | ChatCompletionRequest, ids: list[int],
             max_tokens: int | None, logprobs: int | None, arrival: float) -> GenerationJob:
        params = self._params(req, self._max_tokens(len(ids), max_tokens), logprobs)
        return GenerationJob(f"{prefix}-{uuid.uuid4().hex}", ids, params, arrival)

    def _max_tokens(self, prompt_len: int, requested: int | None) -> int:
        if requested is not None and requested < 1:
            raise bad_request(f"max_tokens must be at least 1, got {requested}", param="max_tokens")
        limit = self.max_model_len()
        if prompt_len >= limit or (requested is not None and prompt_len + requested > limit):
            raise context_length_error(limit, prompt_len, requested)
        return requested if requested is not None else limit - prompt_len

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
                ) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        stop_ids = tuple(self._checked_ids(list(req.stop_token_ids or ()), "stop_token_ids"))
        if req.seed is not None and not -(2**63) <= req.seed < 2**63:
            raise bad_request("seed must fit in a signed 64-bit integer", param="seed")
        given = {name: value for name in _PARAM_NAMES
                 if name not in _DERIVED and (value := getattr(req, name, None)) is not None}
        try:
            return SamplingParams(**given, max_tokens=max_tokens, stop_token_ids=stop_ids, stop=stop, logprobs=logprobs)
        except InvalidRequestError as e:
            param = next((f for f in _PARAM_NAMES if str(e).startswith(f)), None)
            if param == "logprobs" and isinstance(req, ChatCompletionRequest):
                param = "top_logprobs"
            raise bad_request(str(e), param=param) from None
