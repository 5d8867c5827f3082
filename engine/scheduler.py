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

Speculative decoding keeps the rule. A running request in decode (one token to
compute) is given up to k extra *draft slots*: positions after its last token,
with blocks allocated for them, but only from free blocks (speculation never
preempts anyone). The proposer then fills `request.spec_token_ids` (at most the
slots given; `apply_proposals` trims unused slots), the runner returns the
target's verdict: the accepted draft tokens plus one token from the target.
`update` appends them one by one with the usual stop checks and counts as
computed only positions whose input token is now part of the request; KV written
for rejected drafts sits above `num_computed_tokens` and is overwritten later.
A running request keeps its draft-slot blocks for its next step's drafts (they
always fit its next slots); they are freed when it finishes, is aborted or is
preempted, and reclaimed from every running request before anyone is preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.fork import PromptForks
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.request import FinishReason, Request, RequestStatus, check_stop
from engine.sampler import SampleResult


@dataclass
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens (drafts included)
    num_spec_tokens: int = 0  # of which draft tokens (request.spec_token_ids) to verify; slots until proposals are in
    num_accepted_tokens: int = 0  # draft tokens the target accepted (set by Scheduler.update)
    num_output_tokens: int = 0  # tokens appended to the request's output this step (set by Scheduler.update)
    num_logprobs: int = 0  # logprob records appended this step (set by Scheduler.update)

    @property
    def samples(self) -> bool:
        """True when this step brings the request's computed tokens up to its known tokens."""
        return self.request.num_computed_tokens + self.num_new_tokens - self.num_spec_tokens == self.request.num_tokens


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
        self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, eos_token_ids: tuple[int, ...],
        num_spec_tokens: int = 0, kv_window: int | None = None,
    ) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.kv = kv
        self.max_model_len = max_model_len
        self.num_spec_tokens = num_spec_tokens  # draft slots per decoding request per step (0: no speculation)
        # Every layer's sliding window (None: some layer attends to everything): blocks wholly before the window of
        # a request's next position are released while it runs, so a long conversation holds only its window.
        self.kv_window = kv_window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.forks: PromptForks | None = None  # n > 1: sibling requests share a prompt's KV (set by the engine)

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
                if self._reclaim_draft_blocks():
                    continue  # blocks held for drafts go back before anyone is preempted
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
        # Draft slots come second, from what every running request's own token left of budget and free blocks.
        for s in out.scheduled if self.num_spec_tokens else ():
            if budget <= 0:
                break
            if s.request.num_tokens - s.request.num_computed_tokens == 1:
                s.num_spec_tokens = self._draft_slots(s.request, budget)
                s.num_new_tokens += s.num_spec_tokens
                budget -= s.num_spec_tokens
        return budget

    def _reclaim_draft_blocks(self) -> bool:
        """Free running requests' blocks beyond their own tokens (kept from earlier steps' draft slots)."""
        freed = False
        for r in self.running:
            freed |= self._trim_blocks(r, cdiv(r.num_tokens, self.kv.block_size))
        return freed

    def _max_drafts(self, req: Request) -> int:
        """Draft tokens a decoding request could verify next: the bonus token must fit max_tokens and the context."""
        if not self.num_spec_tokens:
            return 0
        room = min(req.params.max_tokens - len(req.output_token_ids) - 1, self.max_model_len - req.num_tokens)
        return max(0, min(self.num_spec_tokens, room))

    def _draft_slots(self, req: Request, budget: int) -> int:
        """Draft slots for a decoding request whose own token is allocated: as many as fit the budget and the
        free blocks (never preempting for them)."""
        k = min(self._max_drafts(req), budget)
        while k > 0 and not self.kv.allocate(req.request_id, req.num_tokens + k):
            k -= 1
        return k

    def apply_proposals(self, out: SchedulerOutput) -> None:
        """Shrink each request's draft slots to the drafts its proposer actually put in `spec_token_ids`."""
        for s in out.scheduled:
            k = len(s.request.spec_token_ids)
            if k > s.num_spec_tokens:
                raise RuntimeError(f"{s.request.request_id}: {k} draft tokens proposed for {s.num_spec_tokens} slots")
            s.num_new_tokens -= s.num_spec_tokens - k
            s.num_spec_tokens = k

    def _next_waiting(self) -> Request | None:
        """The first waiting request, passing over those held back: until a sibling's prompt is computed (n > 1,
        engine/fork.py; they would compute it a second time), or until their grammar is compiled (engine/grammar.py)."""
        return next((r for r in self.waiting if not self._held_back(r)), None)

    def _held_back(self, req: Request) -> bool:
        return (req.grammar is not None and not req.grammar.ready()) or (self.forks is not None
                                                                         and self.forks.held_back(req))

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while budget > 0 and len(self.running) < self.config.max_num_seqs and (req := self._next_waiting()):
            hit = 0
            # A request that wants prompt logprobs computes every prompt position: no cached prefix, no fork.
            if req.num_computed_tokens == 0 and not self.kv.has(req.request_id) and not req.needs_prompt_logprobs:
                hit = req.num_computed_tokens = (self.forks.take(req) if self.forks else 0) or self.kv.match_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            # A prefill-role request takes its whole prompt's blocks at once: their ids are handed out before its
            # last chunk runs (layer-wise streaming, engine/kv_progress.py), so they must not change.
            need = max(req.num_computed_tokens + n, req.num_prompt_tokens if req.lease_s is not None else 0)
            if not self.kv.allocate(req.request_id, need):
                if hit:  # give the shared prefix back; it is matched again when the request fits
                    self.kv.free(req.request_id)
                    req.num_computed_tokens = 0
                break
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, samples: list[list[SampleResult] | SampleResult | None]) -> list[Request]:
        """Advance computed counts, append sampled tokens; returns requests that finished this step.

        `samples[i]` is None (no token this step), one token, or a verdict on drafts: the accepted draft tokens
        followed by one token of the target's. They are appended one at a time; nothing after a stop is kept.
        """
        finished = []
        for sched, sample in zip(out.scheduled, samples, strict=True):
            req = sched.request
            drafts = req.spec_token_ids
            if drafts:
                req.spec_token_ids = []
            tokens = () if sample is None else (sample,) if isinstance(sample, SampleResult) else sample
            if len(tokens) > sched.num_spec_tokens + 1:
                raise RuntimeError(f"{req.request_id}: {len(tokens)} tokens for {sched.num_spec_tokens} drafts")
            sched.num_accepted_tokens = max(0, len(tokens) - 1)
            # Positions whose input token is now known: the known tokens scheduled, plus one per accepted draft.
            computed = req.num_computed_tokens + sched.num_new_tokens - sched.num_spec_tokens + sched.num_accepted_tokens
            reason = None
            if req.status != RequestStatus.FINISHED:
                for i, t in enumerate(tokens):
                    assert i == len(tokens) - 1 or t.token_id == drafts[i], "accepted token is not the draft"
                    if req.grammar is not None and not req.grammar.accept(t.token_id):
                        reason = FinishReason.STOP  # no token was legal (engine/grammar.py): end, append nothing
                        break
                    req.output_token_ids.append(t.token_id)
                    sched.num_output_tokens += 1
                    if t.logprob is not None:
                        req.logprobs.append((t.logprob, t.top_logprobs or []))
                        sched.num_logprobs += 1
                    reason = check_stop(req, t.token_id, self.eos_token_ids, self.max_model_len)
                    if reason is None and req.lease_s is not None:
                        reason = FinishReason.HANDOFF  # prefill role: one token, then the KV moves on
                    if reason is not None:
                        break
            req.num_computed_tokens = min(computed, req.num_tokens)
            self.kv.cache_full_blocks(req)
            if self.kv_window is not None and req.lease_s is None:  # a leased request's KV moves on whole
                self.kv.drop_leading(req.request_id, (req.num_computed_tokens - self.kv_window + 1) // self.kv.block_size)
            if reason is not None:
                # a request that hands its KV off (prefill role) keeps only the blocks with computed tokens
                self._trim_blocks(req, cdiv(req.num_computed_tokens, self.kv.block_size))
                self.finish(req, reason)
                finished.append(req)
        return finished

    def _trim_blocks(self, req: Request, keep: int) -> bool:
        """Free the request's blocks after the first `keep` (they hold no computed token, so none is cached)."""
        assert keep * self.kv.block_size >= req.num_computed_tokens, "trimming a block with computed tokens"
        return self.kv.trim(req.request_id, keep)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Take the request out of the queues; free its blocks unless it hands them off (the engine leases them)."""
        if req.is_finished:
            return
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if reason != FinishReason.HANDOFF:
            self.kv.free(req.request_id)
