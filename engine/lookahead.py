"""Launching the next decode step before this step's tokens reach the host.

A decode step on a GPU is the device working while the host waits, then the host working (reading the
tokens, updating requests, scheduling, staging inputs, launching the CUDA graph) while the device idles:
0.5 ms at batch 1 and about 1 ms at batch 64 on an H100 with the Llama-3-8B shape, 8-15% of the step.

The engine hides that idle time by guessing. Right after queueing step N, and before waiting for its
tokens, it queues step N+1 for the requests that will surely still be decoding, feeding each its token of
step N straight from the device. The scheduler never sees the guess: when step N+1 is scheduled for real,
the engine takes the queued work if every guessed request the schedule asks for is asked for exactly as
guessed (one token, at the position the guess used), and otherwise drops it and launches the step as usual.
Outputs are therefore exactly the scheduler's; a wrong guess only wastes device time.

Who is in the guess: every request of step N that samples, unless step N can end it by length (max_tokens, the
context limit) or by a handoff (a prefill-role request ends at its first token: guessing it cost a prefill worker
a wasted decode pass and its wait, 5-12 ms, after every prompt step on an H100). No guess when requests verify
drafts or use penalties, a grammar or a bad word of several tokens (their next logits depend on tokens the host
has not seen: engine.sampler.needs_history). A request that stops on a stop token is in the guess and simply
missing from the next schedule: the rest of the guess is still taken. What else the schedule asks for does not
waste the guess either. Prompt chunks (a new request admitted, a long prompt going on) are launched right after
the queued step, as a second forward of the same step (`SplitStep`), as SGLang runs prefill and decode batches
apart; the cost is reading the weights twice in that step, against a whole decode pass for dropping the guess. A
request that joins with one token to decode and nothing else to launch beside (a decode worker's pulled request)
is left out of this step and computed in the next guess (its token is on the host), one step later than without
overlap; it is in the next guess or there is no next guess, so it is postponed once at most.

Blocks. A step's `wait()` returns once the step's own kernels have finished (its sampled tokens' copy, or an
event after a forward that samples nothing), so when `step()` returns, the queued guess is the only GPU work
that may still write KV. The guess writes the KV of each of its requests at one position past the computed
ones, in a block allocated before launch (the block the scheduler would allocate next). When such a request finishes, is
aborted or is preempted while the guess may still run, its blocks return to the pool with a write pending.
Kernels on the same stream are ordered after it, but a KV transfer into a reused block (NIXL's copy engines,
cuda_ipc's own stream) is not; so the engine waits for the guess to finish (`fence`) before it hands control back with such
blocks free. That costs the overlap of one step, only on steps where a guessed request ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import LaunchedStep, ModelRunner
from engine.request import Request, RequestStatus
from engine.sampler import DeviceSamples, SampleResult, needs_history, row_tensor
from engine.scheduler import Scheduler, SchedulerOutput
from engine.stats import EngineStats


@dataclass
class Match:
    """How a schedule uses the queued step; each list holds indices of `out.scheduled`."""

    guessed: list[tuple[int, int]]  # (scheduled index, guess row): computed by the queued step
    joining: list[int]  # one known token to decode: left out of this step, computed by the next guess
    beside: list[int]  # everything else (prompt chunks): launched now, after the queued step


@dataclass
class SplitStep:
    """One scheduled step run as two launches, the queued guess and the rows launched beside it; the same
    contract as LaunchedStep for the engine and the next guess."""

    parts: tuple[LaunchedStep, LaunchedStep]
    where: list[tuple[int, int]]  # per scheduled request: (part, its index among that part's requests)

    @property
    def samples(self) -> DeviceSamples | None:
        return self.parts[0].samples  # the guess always samples on the device

    def wait(self) -> list[list[SampleResult] | None]:
        per_part = [p.wait() for p in self.parts]
        return [per_part[p][k] for p, k in self.where]

    def input_ids_for(self, requests: list[int]) -> torch.Tensor:
        pieces, order = [], []
        for part in (0, 1):
            mine = [(n, self.where[j][1]) for n, j in enumerate(requests) if self.where[j][0] == part]
            if mine:
                pieces.append(self.parts[part].input_ids_for([k for _, k in mine]))
                order += [n for n, _ in mine]
        ids = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if order == sorted(order):
            return ids
        back = sorted(range(len(order)), key=order.__getitem__)  # position in `ids` of the n-th request
        return ids[row_tensor(back, ids.device, torch.long)]


@dataclass
class QueuedStep:
    """A decode step queued before the previous step's tokens were read: the guess."""

    step: LaunchedStep
    requests: list[Request]  # one row each, in row order
    starts: list[int]  # the position each row computes: the request's token count when the guess was made
    done: torch.cuda.Event | None  # recorded after the step's kernels (None off CUDA: already done)

    def match(self, out: SchedulerOutput) -> Match | None:
        """How `out` can use the queued step: None (launch `out` anew) unless some guessed row is scheduled and
        every scheduled guessed row is exactly as guessed. Other scheduled requests go beside the queued step,
        or, with one known token to decode and nothing else beside, into the next guess."""
        row_of = {id(r): i for i, r in enumerate(self.requests)}
        m = Match([], [], [])
        for j, s in enumerate(out.scheduled):
            i = row_of.get(id(s.request))
            if s.num_spec_tokens:
                return None
            if i is None:
                one_token = s.num_new_tokens == 1 and s.samples and not needs_history(s.request.params)
                (m.joining if one_token else m.beside).append(j)
            elif not s.samples or s.num_new_tokens != 1 or s.request.num_computed_tokens != self.starts[i]:
                return None  # preempted and rescheduled, or otherwise not where the guess computed
            else:
                m.guessed.append((j, i))
        if m.beside and m.joining:  # a launch beside happens anyway: no reason to make them wait a step
            m.beside, m.joining = sorted(m.beside + m.joining), []
        return m if m.guessed else None

    def holds_ended_request(self) -> bool:
        """Whether a guessed request is no longer running: its blocks may be free while the guess writes them."""
        return any(r.status != RequestStatus.RUNNING for r in self.requests)

    def fence(self) -> None:
        """Wait until the queued step has finished on the device."""
        if self.done is not None:
            self.done.synchronize()


def guess_rows(out: SchedulerOutput, scheduler: Scheduler) -> list[int]:
    """Indices of `out.scheduled` that will decode one token next step whatever they sample now; [] for no
    guess (the next schedule cannot be predicted)."""
    if scheduler.num_spec_tokens:
        return []
    rows = []
    for i, s in enumerate(out.scheduled):
        r = s.request
        if s.num_spec_tokens or needs_history(r.params):  # penalties, a grammar: they need the host's tokens
            return []
        if not s.samples:
            continue  # a prompt chunk: it goes on beside the guess
        # A prefill-role request (a lease) hands its KV off at its first token: guessing it would queue a whole
        # decode pass that only delays the handoff (the engine fences it before the lease is answered).
        ends = (r.lease_s is not None or len(r.output_token_ids) + 1 >= r.params.max_tokens
                or r.num_tokens + 1 >= scheduler.max_model_len)
        if not ends:
            rows.append(i)
    return rows


class Lookahead:
    """Launches every step of the engine; with overlap on, also queues the guess of the next one and takes it
    when the next schedule matches it. The only place where steps overlap (see the module docstring)."""

    def __init__(self, runner: ModelRunner, kv: KVCacheManager, scheduler: Scheduler, stats: EngineStats,
                 enabled: bool) -> None:
        self.runner, self.kv, self.scheduler, self.stats, self.enabled = runner, kv, scheduler, stats, enabled
        self.queued: QueuedStep | None = None

    def launch(self, out: SchedulerOutput, draft_probs: dict[str, torch.Tensor] | None = None
               ) -> LaunchedStep | SplitStep:
        """Queue `out` (or take the guess queued for it), then queue the guess of the next step before anything
        waits for this one's tokens. Rows postponed into that guess leave `out`."""
        match = self.queued.match(out) if self.queued is not None else None
        joining: list[Request] = []
        if match is None:
            launched: LaunchedStep | SplitStep = self.runner.launch(out, self.kv, draft_probs)
        else:
            launched, joining = self._take(out, match)
        self.queued = None
        if self.enabled:
            self.queued = self._queue_guess(out, launched, joining)
            self.stats.overlap_steps_queued += self.queued is not None
        return launched

    def after_step(self) -> None:
        """Before the engine hands control back: wait for the guess if a request in it ended this step."""
        if self.queued is not None and self.queued.holds_ended_request():
            self.queued.fence()

    def before_free(self, req: Request) -> None:
        """Before `req`'s blocks go back to the pool outside a step (an abort): wait for a guess that writes them."""
        if self.queued is not None and any(r is req for r in self.queued.requests):
            self.queued.fence()

    def drop(self) -> None:
        self.queued = None

    def _take(self, out: SchedulerOutput, m: Match) -> tuple[LaunchedStep | SplitStep, list[Request]]:
        """The queued step as `out`'s, with `m.beside` launched after it; `m.joining` leave `out` (postponed)."""
        assert self.queued is not None
        guess = self.queued.step.select([i for _, i in m.guessed])
        joining = [out.scheduled[j].request for j in m.joining]
        self.stats.overlap_steps_used += 1
        self.stats.overlap_joins_delayed += len(joining)
        launched: LaunchedStep | SplitStep = guess
        if m.beside:
            self.stats.overlap_steps_split += 1
            side = self.runner.launch(SchedulerOutput([out.scheduled[j] for j in m.beside]), self.kv)
            where = {j: (0, k) for k, (j, _) in enumerate(m.guessed)} | {j: (1, k) for k, j in enumerate(m.beside)}
            launched = SplitStep((guess, side), [where[j] for j in sorted(where)])
        if m.joining:
            later = set(m.joining)
            out.scheduled = [s for j, s in enumerate(out.scheduled) if j not in later]
        return launched, joining

    def _queue_guess(self, out: SchedulerOutput, launched: LaunchedStep | SplitStep, joining: list[Request]
                     ) -> QueuedStep | None:
        """Queue the guessed next step after `launched` (the step of `out`), or None when there is no guess or
        a guessed request's next KV slot has no block. `joining` (postponed from this step, their next token
        known on the host) go into the guess after the guessed rows, at the position they would have computed
        now."""
        rows = guess_rows(out, self.scheduler)
        if not rows or launched.samples is None:
            return None
        requests = [out.scheduled[i].request for i in rows]
        for r in requests:  # the slot of position num_tokens, as the next schedule would allocate it
            if not self.kv.allocate(r.request_id, r.num_tokens + 1):
                return None
        step = self.runner.launch_decode(requests, launched.input_ids_for(rows), self.kv, joining)
        done = None
        if self.runner.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        starts = [r.num_tokens for r in requests] + [r.num_computed_tokens for r in joining]
        return QueuedStep(step, requests + joining, starts, done)
