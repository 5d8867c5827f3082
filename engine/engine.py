"""The engine core: requests in, token deltas out, one `step()` at a time. No networking, no text."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig, SpeculativeConfig
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.lookahead import Lookahead, Match, SplitStep, launch_lookahead
from engine.model_runner import DTYPES, LaunchedStep, ModelRunner, num_kv_blocks
from engine.request import FinishReason, InvalidRequestError, Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec_decode import build_proposer

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters since start: what the engine actually computed."""

    prompt_tokens_computed: int = 0  # prompt positions run through the model (recomputes count again)
    generation_tokens: int = 0  # tokens sampled
    steps: int = 0
    preemptions: int = 0
    sampling_request_steps: int = 0  # (request, step) pairs that gave the request new tokens
    spec_steps: int = 0  # steps in which the target verified draft tokens
    spec_verifications: int = 0  # (request, step) pairs that verified at least one draft token
    spec_proposed_tokens: int = 0  # draft tokens the target verified
    spec_accepted_tokens: int = 0  # of which it accepted
    lookahead_steps: int = 0  # steps queued before the previous step's tokens were read (engine/lookahead.py)
    lookahead_taken: int = 0  # of which the next schedule took (the rest were dropped: wasted device time)
    lookahead_postponed: int = 0  # joining requests left to the next guess instead of dropping the queued step
    lookahead_beside: int = 0  # taken steps whose other rows (prompt chunks) were launched beside the queued one

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any proposal)."""
        return self.spec_accepted_tokens / self.spec_proposed_tokens if self.spec_proposed_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """New tokens a request gets per step that gives it any: 1 without speculation, up to k + 1 with it."""
        return self.generation_tokens / self.sampling_request_steps if self.sampling_request_steps else 0.0

    @property
    def mean_tokens_per_verification(self) -> float:
        """Tokens per (request, step) that verified drafts: 1 + accepted drafts, before stop truncation."""
        return 1 + self.spec_accepted_tokens / self.spec_verifications if self.spec_verifications else 0.0


class LLMEngine:
    """Owns the model runner, the KV cache manager and the scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        probe = _probe_model_config(config)
        num_blocks = num_kv_blocks(probe, config.cache, DTYPES[config.dtype])
        self.max_model_len = min(config.max_model_len or probe.max_position_embeddings, probe.max_position_embeddings)
        self.runner = ModelRunner(config, self.device, num_blocks, self.max_model_len)
        self.model_config = self.runner.model_config
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.overlap = config.overlap_steps if config.overlap_steps is not None else self.device.type == "cuda"
        self.lookahead: Lookahead | None = None
        self.set_speculative(config.speculative)

    def set_speculative(self, spec: SpeculativeConfig | None) -> None:
        """Turn speculative decoding on, off or to another proposer, keeping the loaded target model.
        Only while no request is in flight."""
        if self.has_unfinished():
            raise RuntimeError("cannot change speculative decoding while requests are in flight")
        self.config = dataclasses.replace(self.config, speculative=spec)
        self.lookahead = None
        self.proposer = build_proposer(self.config, self.runner, self.kv.num_blocks, self.max_model_len)
        self.scheduler.num_spec_tokens = spec.num_speculative_tokens if self.proposer is not None and spec else 0
        self.runner.prepare_speculation(self.scheduler.num_spec_tokens)

    # ---- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {n + params.max_tokens} "
                f"were requested ({n} in the prompt, {params.max_tokens} for the completion)")
        need = cdiv(n + params.max_tokens, self.kv.block_size)
        if need > self.kv.num_blocks:
            raise InvalidRequestError(f"request needs {need} KV blocks but the cache only has {self.kv.num_blocks}")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    keep_blocks_on_finish: bool = False, output_token_ids: list[int] | None = None,
                    num_computed_tokens: int = 0) -> Request:
        """Queue a request. A request resuming elsewhere-started work passes the tokens already sampled and
        how many tokens' KV already sits in the blocks held under its id (a decode worker after a pull)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        if self.kv.has(request_id) and num_computed_tokens == 0:
            raise InvalidRequestError(f"request id {request_id!r} still holds KV blocks")
        self.validate(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, arrival_time=time.monotonic(),
                      keep_blocks_on_finish=keep_blocks_on_finish)
        req.output_token_ids.extend(output_token_ids or [])
        req.num_computed_tokens = num_computed_tokens
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None or req.is_finished:
            return False
        req.keep_blocks_on_finish = False
        if self.lookahead is not None and any(r is req for r in self.lookahead.requests):
            self.lookahead.fence()  # its blocks go back to the pool now: no queued write may land in them later
        self.scheduler.finish(req, FinishReason.ABORT)
        if self.proposer is not None:
            self.proposer.remove(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        out = self.scheduler.schedule()
        self.stats.preemptions += len(out.preempted)
        if out.is_empty:
            return []
        draft_probs = None
        if self.proposer is not None:
            draft_probs = self.proposer.propose(out, self.kv)
            self.scheduler.apply_proposals(out)
        launched = self._launch(out, draft_probs)
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            if start < len(r.prompt_token_ids):
                self.stats.prompt_tokens_computed += min(start + s.num_new_tokens, len(r.prompt_token_ids)) - start
        samples = launched.wait()
        self.scheduler.update(out, samples)
        self.stats.steps += 1
        self._count_spec(out)
        results = []
        for s in out.scheduled:
            r, n = s.request, s.num_output_tokens
            self.stats.generation_tokens += n
            self.stats.sampling_request_steps += n > 0
            finished = r.status == RequestStatus.FINISHED
            if n or finished:
                results.append(StepOutput(r.request_id, r.output_token_ids[-n:] if n else [], finished,
                                          r.finish_reason.value if r.finish_reason else None, r.stop_reason,
                                          r.logprobs[-s.num_logprobs:] if s.num_logprobs else []))
            if finished:
                self.requests.pop(r.request_id, None)
                if self.proposer is not None:
                    self.proposer.remove(r.request_id)
        if self.lookahead is not None and self.lookahead.holds_ended_request():
            self.lookahead.fence()  # see engine/lookahead.py: blocks freed under a queued write
        return results

    def _launch(self, out: SchedulerOutput, draft_probs: dict[str, torch.Tensor] | None
                ) -> LaunchedStep | SplitStep:
        """Queue this step (or take the one queued ahead for it), then, with overlap on, queue a guess of the
        next one before anything waits for this one's tokens. Rows postponed into that guess leave `out`."""
        match = self.lookahead.match(out) if self.lookahead is not None else None
        joining: list[Request] = []
        if match is None:
            launched: LaunchedStep | SplitStep = self.runner.launch(out, self.kv, draft_probs)
        else:
            launched, joining = self._take(out, match)
        self.lookahead = None
        if self.overlap:
            self.lookahead = launch_lookahead(self.runner, self.kv, self.scheduler, out, launched, joining)
            self.stats.lookahead_steps += self.lookahead is not None
        return launched

    def _take(self, out: SchedulerOutput, m: Match) -> tuple[LaunchedStep | SplitStep, list[Request]]:
        """The queued step as `out`'s, with `m.beside` launched after it; `m.joining` leave `out` (postponed)."""
        assert self.lookahead is not None
        guess = self.lookahead.step.select([i for _, i in m.guessed])
        joining = [out.scheduled[j].request for j in m.joining]
        self.stats.lookahead_taken += 1
        self.stats.lookahead_postponed += len(joining)
        launched: LaunchedStep | SplitStep = guess
        if m.beside:
            self.stats.lookahead_beside += 1
            side = self.runner.launch(SchedulerOutput([out.scheduled[j] for j in m.beside]), self.kv)
            where = {j: (0, k) for k, (j, _) in enumerate(m.guessed)} | {j: (1, k) for k, j in enumerate(m.beside)}
            launched = SplitStep((guess, side), [where[j] for j in sorted(where)])
        if m.joining:
            later = set(m.joining)
            out.scheduled = [s for j, s in enumerate(out.scheduled) if j not in later]
        return launched, joining

    def _count_spec(self, out: SchedulerOutput) -> None:
        verified = [s for s in out.scheduled if s.num_spec_tokens]
        if verified:
            self.stats.spec_steps += 1
            self.stats.spec_verifications += len(verified)
            self.stats.spec_proposed_tokens += sum(s.num_spec_tokens for s in verified)
            self.stats.spec_accepted_tokens += sum(s.num_accepted_tokens for s in verified)


def _probe_model_config(config: EngineConfig):  # noqa: ANN202 - ModelConfig
    from engine.loader import load_model_config, resolve_source

    if config.load_format == "dummy":
        return config.dummy_model
    fmt, path = resolve_source(config.model, config.load_format)
    return load_model_config(fmt, path)
