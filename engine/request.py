"""A request's sampling parameters, state and token counters.

The scheduler is phase-free: a request knows `num_tokens` (prompt + output so
far) and has computed KV for `num_computed_tokens` of them. Each step lets the
second catch up to the first; when it has, the step's logits give the next token.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class InvalidRequestError(ValueError):
    """The request cannot be served as asked (bad parameter, too long, cannot fit)."""


# One prompt token's record (params.prompt_logprobs): (its logprob given the tokens before it, its rank among the
# vocabulary (1: the most likely), [(token, logprob), ...] the k most likely tokens at that position).
PromptLogprob = tuple[float, int, list[tuple[int, float]]]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int = 16  # most new tokens to generate
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability
    seed: int | None = None  # per-request seed: same seed, same tokens, whatever the batch
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (CTRL style)
    frequency_penalty: float = 0.0  # subtract penalty x count of the token in the output
    presence_penalty: float = 0.0  # subtract penalty once if the token is in the output
    stop_token_ids: tuple[int, ...] = ()  # extra tokens that end generation
    stop: tuple[str, ...] = ()  # strings that end generation (not included in the text)
    ignore_eos: bool = False  # keep going past EOS (fixed output lengths for benchmarks)
    logprobs: int | None = None  # return the chosen token's logprob plus this many top alternatives
    skip_special_tokens: bool = True  # leave special tokens out of the detokenized text
    min_tokens: int = 0  # EOS and stop tokens are banned (and stop strings not checked) before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by id
    allowed_token_ids: tuple[int, ...] = ()  # only these tokens may be sampled; empty: every token
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never generated (the last token is banned
    # where the output already ends with the ones before it)
    structured_output: str = ""  # a grammar the output must follow, engine.grammar's wire form; "": none
    fork_from: str = ""  # n > 1: a sibling request with the same prompt whose prompt KV this one shares instead of
    # computing it (engine/fork.py); "" or a request this engine does not hold: computed as usual
    prompt_logprobs: int | None = None  # each prompt token's logprob (after the first), its rank and this many top
    # alternatives, returned with the first output (engine/prompt_logprobs.py); the prompt is then computed whole

    def __post_init__(self) -> None:
        for name in ("stop_token_ids", "allowed_token_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in self.bad_words_ids))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= -1, f"top_k must be -1, 0 or positive, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias), "logit_bias values must be in [-100, 100]"),
            (all(t >= 0 for t, _ in self.logit_bias), "logit_bias keys must be token ids >= 0"),
            (all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids),
             "allowed_token_ids must be token ids >= 0"),
            (all(w and all(isinstance(t, int) and t >= 0 for t in w) for w in self.bad_words_ids),
             "bad_words_ids must be non-empty sequences of token ids"),
            (isinstance(self.structured_output, str), "structured_output must be a string"),
            (isinstance(self.fork_from, str), "fork_from must be a string"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def token_ids_in_vocab(self) -> tuple[int, ...]:
        """Every token id the parameters name (checked against the model's vocabulary by the engine)."""
        return (*self.stop_token_ids, *self.allowed_token_ids, *(t for t, _ in self.logit_bias),
                *(t for w in self.bad_words_ids for t in w))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Like the constructor, but an unknown option is an `InvalidRequestError` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidRequestError(f"unknown sampling option(s): {', '.join(unknown)}")
        return cls(**kwargs)


class RequestStatus(enum.Enum):
    RECEIVING_KV = "receiving_kv"  # blocks reserved, its KV arriving from another worker (engine/remote_kv.py)
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    HANDOFF = "handoff"  # prefill role: first token sampled, KV leased to the worker that decodes the rest


@dataclass
class Request:
    """One sequence inside the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in this request's blocks. Starts above 0 when the KV
    # arrived from elsewhere (decode role) or from the prefix cache.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Per-token logprob records: (chosen token logprob, [(token, logprob), ...]).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Prefill role: after its first token the request hands off (unless that token ends it) and its KV
    # blocks are leased to a puller for this many seconds. None: an ordinary request.
    lease_s: float | None = None
    # Speculative decoding: draft tokens proposed for this step, verified by the target model. They are
    # not part of output_token_ids (nor num_tokens) until accepted; the scheduler clears them after each step.
    spec_token_ids: list[int] = field(default_factory=list)
    # Structured output (params.structured_output): the grammar matcher, advanced by every token appended to the
    # output (engine.grammar.GrammarState); None without a grammar.
    grammar: Any = None
    # params.prompt_logprobs: the records of prompt tokens 1, 2, ... computed so far (position p's logits give token
    # p + 1's), in order; handed out (and cleared) with the request's first output, after which none is computed.
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and not given them yet: every prompt position must be computed here (no
        prefix-cache match, no fork of a sibling's prompt KV)."""
        return self.params.prompt_logprobs is not None and not self.prompt_logprobs_sent

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


def check_stop(req: Request, token: int, eos_token_ids: tuple[int, ...], max_model_len: int) -> FinishReason | None:
    """The stop rule, applied after `token` was appended to the request's output. Every engine role uses it: a
    prefill worker's first token ends a request by the same rule as a decode worker's last."""
    p = req.params
    stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)
    if stop_token and len(req.output_token_ids) > p.min_tokens:  # stop tokens count from output index min_tokens
        req.stop_reason = token
        return FinishReason.STOP
    if req.grammar is not None and req.grammar.is_terminated():  # the grammar is complete: nothing may follow
        req.stop_reason = token
        return FinishReason.STOP
    if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
