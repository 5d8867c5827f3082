"""Launching the next decode step before this step's tokens reach the host.

A decode step on a GPU is the device working while the host waits, then the host working (reading the
tokens, updating requests, scheduling, staging inputs, launching the CUDA graph) while the device idles:
0.5 ms at batch 1 and about 1 ms at batch 64 on an H100 with the Llama-3-8B shape, 8-15% of the step.

The engine hides that idle time by guessing. Right after queueing step N, and before waiting for its
tokens, it queues step N+1 for the requests that will surely still be decoding, feeding each its token of
step N straight from the device. The scheduler never sees the guess: when step N+1 is scheduled for real,
the engine takes the queued work if the schedule asks for nothing else (each request one token at the
position the guess used, every one of them in the guess), and otherwise drops it and launches the step as
usual. Outputs are therefore exactly the scheduler's; a wrong guess only wastes device time.

Who is in the guess: every request of step N that samples, unless step N can end it by length (max_tokens,
the context limit). No guess when step N has a prompt chunk that does not sample, when requests verify
drafts, when a request uses penalties (they count tokens the host has not seen) or when the head of the
waiting queue fits the free blocks and the batch limits now (the next schedule would admit it); a queue that
cannot move keeps the guesses going. A request that stops on a stop token is in the guess
and simply missing from the next schedule: the rest of the guess is still taken. A request that joins with
one token to decode (a decode worker's pulled request) does not make the guess wasted either: the queued step
is taken for the guessed rows, the joining request is left out of this step and computed in the next guess
(its token is on the host), one step later than without overlap. A joining request is in the next guess or
there is no next guess, so it is postponed once at most.

Blocks. The guess writes the KV of each of its requests at one position past the computed ones, in a block
allocated before launch (the block the scheduler would allocate next). When such a request finishes, is
aborted or is preempted while the guess may still run, its blocks return to the pool with a write pending.
Kernels on the same stream are ordered after it, but a KV transfer into a reused block (NIXL's copy engines)
is not; so the engine waits for the guess to finish (`fence`) before it hands control back with such
blocks free. That costs the overlap of one step, only on steps where a guessed request ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import LaunchedStep, ModelRunner
from engine.request import Request, RequestStatus
from engine.sampler import has_penalty
from engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class Lookahead:
    """A decode step queued before the previous step's tokens were read."""

    step: LaunchedStep
    requests: list[Request]  # one row each, in row order
    starts: list[int]  # the position each row computes: the request's token count when the guess was made
    done: torch.cuda.Event | None  # recorded after the step's kernels (None off CUDA: already done)

    def take(self, out: SchedulerOutput) -> tuple[LaunchedStep, list[int]] | None:
        """The queued work as `out`'s step if every guessed row `out` schedules is exactly as guessed, with the
        indices of `out.scheduled` to postpone: requests joining with one known token to decode (a pulled
        request), which the next guess computes instead of this step being launched anew. None: launch `out`."""
        row_of = {id(r): i for i, r in enumerate(self.requests)}
        rows, joining = [], []
        for j, s in enumerate(out.scheduled):
            i = row_of.get(id(s.request))
            if s.num_spec_tokens or not s.samples or s.num_new_tokens != 1:
                return None
            if i is None:
                if has_penalty(s.request.params):
                    return None
                joining.append(j)
            elif s.request.num_computed_tokens != self.starts[i]:
                return None  # preempted and rescheduled, or otherwise not where the guess computed
            else:
                rows.append(i)
        return (self.step.select(rows), joining) if rows else None

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
    if scheduler.num_spec_tokens or scheduler.may_admit():
        return []
    rows = []
    for i, s in enumerate(out.scheduled):
        r = s.request
        if not s.samples or s.num_spec_tokens or has_penalty(r.params):
            return []
        ends = len(r.output_token_ids) + 1 >= r.params.max_tokens or r.num_tokens + 1 >= scheduler.max_model_len
        if not ends:
            rows.append(i)
    return rows


def launch_lookahead(runner: ModelRunner, kv: KVCacheManager, scheduler: Scheduler, out: SchedulerOutput,
                     launched: LaunchedStep, joining: list[Request]) -> Lookahead | None:
    """Queue the guessed next step after `launched` (the step of `out`), or None when there is no guess or a
    guessed request's next KV slot has no block. `joining` (postponed from this step, their next token known on
    the host) go into the guess after the guessed rows, at the position they would have computed now."""
    rows = guess_rows(out, scheduler)
    if not rows or launched.samples is None:
        return None
    requests = [out.scheduled[i].request for i in rows]
    for r in requests:  # the slot of position num_tokens, as the next schedule would allocate it
        if not kv.allocate(r.request_id, r.num_tokens + 1):
            return None
    step = runner.launch_decode(requests, launched.input_ids_for(rows), kv, joining)
    done = None
    if runner.device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
    starts = [r.num_tokens for r in requests] + [r.num_computed_tokens for r in joining]
    return Lookahead(step, requests + joining, starts, done)
