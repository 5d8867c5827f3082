"""Phase-free continuous batching.

Every request has `num_tokens` (prompt + output so far) and
`num_computed_tokens` (tokens whose KV sits in its blocks). A step gives each
running request, then waiting ones in arrival order, up to
`num_tokens - num_computed_tokens` new tokens from a shared token budget. A
request whose computed tokens catch up samples one token. That one rule covers
prompt prefill (many tokens), chunked prefill (budget smaller than the prompt),
decode (one token), KV that arrived from elsewhere (computed starts high) and
recompute after preemption (computed reset to 0) and prefix-cache hits
(computed starts at the cached prefix's length when a request is admitted).

When blocks run out, the most recently admitted running request is preempted:
its blocks are freed, its computed count reset, and it returns to the front of
the waiting queue (recompute; its output tokens are kept).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import FinishReason, Request, RequestStatus
from engine.sampler import SampleResult


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step brings the request's computed tokens up to its known tokens."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """The contract from the scheduler to the model runner."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides, each step, which requests compute how many tokens."""

    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself: nothing after it is running either
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = 0
            if req.num_computed_tokens == 0 and not self.kv.has(req.request_id):
                hit = req.num_computed_tokens = self.kv.match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
                if hit:  # give the shared prefix back; it is matched again when the request fits
                    self.kv.free(req.request_id)
                    req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, samples: list[SampleResult | None]) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests that finished this step."""
        finished = []
        for sched, sample in zip(out.scheduled, samples, strict=True):
            req = sched.request
            req.num_computed_tokens += sched.num_new_tokens
            self.kv.cache_full_blocks(req)
            if sample is None or req.is_finished:
                continue
            req.output_token_ids.append(sample.token_id)
            if sample.logprob is not None:
                req.logprobs.append((sample.logprob, sample.top_logprobs or []))
            reason = self._stop_reason(req, sample.token_id)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            req.stop_reason = token
            return FinishReason.STOP
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Take the request out of the queues; free its blocks unless it keeps them for a remote pull."""
        if req.is_finished:
            return
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.keep_blocks_on_finish:
            self.kv.free(req.request_id)
