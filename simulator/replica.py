"""One worker's engine, simulated: continuous batching by the engine's rule, step times from the cost model.

The scheduling rule is engine/scheduler.py's: every step, running requests first (each decoding row one token,
each prompt in progress the next chunk), then waiting ones in arrival order, from a token budget of
`max_num_batched_tokens`, admitting while `max_num_seqs` allows and the KV blocks hold them; when blocks run out
the most recently admitted decoding request is preempted (its blocks freed, its tokens recomputed later).

Decoding rows are kept by a step counter rather than one by one: a row that joined at counter `j` with `g` tokens
has `g + (counter - j)` now, and a heap says when the next row finishes. So a step costs O(prompt chunks), not
O(batch). When a replica has nothing but decoding rows it runs all steps up to the next finish as one event
(`fast_forward`); anything that arrives meanwhile cuts the run at the end of the step in progress, where the
engine would pick it up. With overlapped steps (`overlap`, engine/lookahead.py: a GPU engine queues each decode
step before reading the last one's tokens) a pulled request that joins while a queued step is in flight, with no
prompt chunk to launch beside it, sits that step out and decodes from the one after. KV blocks of decoding rows
are counted at their join exactly and grow by one per `block_size` tokens generated (summed over the rows, so
within a block per row of the exact count).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Protocol

from engine.config import SchedulerConfig
from simulator.cost_model import CostModel, chunk_pairs, run_ms, steps_within
from simulator.device import SharedDevice
from simulator.events import EventLoop
from simulator.request import SimRequest

SEGMENTS_KEPT = 8192  # step-time segments kept before the ones no running row needs are dropped


class Listener(Protocol):
    """What a replica tells the cluster."""

    def on_first_token(self, req: SimRequest, replica: Replica, t: float) -> None: ...
    def on_second_token(self, req: SimRequest, t: float) -> None: ...
    def on_finish(self, req: SimRequest, replica: Replica, t: float) -> None: ...
    def on_steps(self, first_ms: float, last_ms: float, rows: int, steps: int, skip: int) -> None: ...


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Replica:
    """A prefill (`role` prefill: hands off after the first token, its KV leased until pulled) or decode worker."""

    def __init__(self, name: str, role: str, cost: CostModel, sched: SchedulerConfig, num_blocks: int, block_size: int,
                 loop: EventLoop, listener: Listener, fast_forward: bool = True, device: SharedDevice | None = None,
                 overlap: bool = False) -> None:
        self.name, self.role, self.cost, self.loop, self.listener = name, role, cost, loop, listener
        self.max_tokens, self.max_seqs = sched.max_num_batched_tokens, sched.max_num_seqs
        self.num_blocks, self.bs = num_blocks, block_size
        self.device, self.overlap = device, overlap
        self.fast_forward = fast_forward and device is None
        self.waiting: deque[SimRequest] = deque()  # not admitted yet, arrival order (preempted ones in front)
        self.partial: list[SimRequest] = []  # admitted, computing prompt tokens (chunked), admission order
        self.decoding: dict[int, SimRequest] = {}  # decoding rows, admission order (the last is preempted first)
        self._finish: list[tuple[int, int, int, SimRequest]] = []  # (finish step, seq, epoch, request)
        self._seq = itertools.count()
        self.new_rows: list[SimRequest] = []  # joined the decode set since the last step started
        self.deferred: list[SimRequest] = []  # pulled rows left out of the queued step: they join at the next one
        self.step_count = 0  # decode steps done (each decoding row gained one token per step)
        self.dec_ctx = 0  # sum of the decoding rows' computed tokens
        self.join_ctx = 0  # ... as they were when they joined
        self.join_blocks = 0  # sum of the decoding rows' blocks when they joined
        self.other_blocks = 0  # blocks of prompts in progress, receiving and leased requests
        self.queued_tokens = 0  # prompt tokens not computed yet, over waiting and in-progress requests
        self.receiving = 0  # requests whose KV is being pulled in
        self.leased = 0  # prefill role: finished prompts whose KV waits to be pulled
        self.segs: list[float] = []  # ms of each step segment (a fast-forwarded run is one segment: its last step)
        self.seg_base = 0  # index of segs[0] since the replica started
        self.busy = False
        self._version = 0  # of the pending step-end event; a cut run schedules a new one
        # the step (or run of k steps) in flight: (k, batch, mean context, start, prompt chunks, rows getting their
        # second token, first step ms, ms added per later step)
        self._run: tuple[int, int, float, float, list[tuple[SimRequest, int]], list[SimRequest], float, float] | None = None
        self.steps = 0  # engine steps run (a fast-forwarded run of k counts k)
        self._between: list[Callable[[], None]] = []  # to run where the step in flight ends (between_steps)

    # ---- what comes in ------------------------------------------------------------------------------------------
    def add(self, req: SimRequest) -> None:
        """A prompt to compute here: a prefill, a decode worker prefilling locally, or a recompute."""
        req.computed, req.blocks = 0, 0
        self.waiting.append(req)
        self.queued_tokens += req.prompt
        self._kick()

    def reserve(self, req: SimRequest) -> bool:
        """Blocks for a pulled prompt's KV (engine.receive_kv); False (nothing held) when they are short."""
        n = self.hold(req.prompt)
        req.blocks = n
        return n > 0

    def hold(self, tokens: int) -> int:
        """Reserve blocks for `tokens` tokens of KV to be received (a pull; `pulled` ends it): how many, 0 when they
        are short (nothing held). A layer-wise stream holds them while the prompt is still on its prefill replica,
        so the count stays off the request until the pull ends."""
        n = cdiv(tokens, self.bs)
        if self.used_blocks() + n > self.num_blocks:
            return 0
        self.other_blocks += n
        self.receiving += 1
        return n

    def pulled(self, req: SimRequest) -> None:
        """The pull ended: the request waits to join the batch with its prompt computed (kv_received)."""
        self.receiving -= 1
        req.computed = req.prompt
        self.waiting.append(req)
        self._kick()

    def release(self, req: SimRequest) -> None:
        """Prefill role: the request's lease ends (its KV was pulled, or nobody will pull it)."""
        self.other_blocks -= req.lease_blocks
        req.lease_blocks = 0
        self.leased -= 1
        if self.waiting and not self.busy:
            self._kick()  # a prompt that found no free blocks may fit now

    # ---- what the router and planner read --------------------------------------------------------------------
    def used_blocks(self) -> float:
        return self.other_blocks + self.join_blocks + (self.dec_ctx - self.join_ctx) / self.bs

    def load_stats(self) -> dict[str, float]:
        """The figures of a Load report (engine/stats.py EngineLoad names) the policies and the planner read."""
        used = self.used_blocks()
        return {"num_waiting": len(self.waiting),
                "num_running": len(self.partial) + len(self.decoding) + len(self.deferred),
                "num_receiving_kv": self.receiving, "leased_requests": self.leased,
                "queued_prefill_tokens": self.queued_tokens, "kv_blocks_total": self.num_blocks,
                "kv_blocks_free": self.num_blocks - used, "kv_usage": used / self.num_blocks}

    def idle(self) -> bool:
        return not (self.busy or self.waiting or self.partial or self.decoding or self.deferred or self.receiving
                    or self.leased)

    def since_join(self, req: SimRequest) -> list[float]:
        """Step segments (ms) from the request's first decode step on."""
        return self.segs[max(0, req.seg_index - self.seg_base):]

    # ---- stepping ----------------------------------------------------------------------------------------------
    def between_steps(self, fn: Callable[[], None]) -> None:
        """Run `fn` where the worker's loop runs what it is handed (worker/async_engine.py run_between_steps, as a
        decode worker reserves a pull's blocks): now when idle, else where the step in flight ends."""
        if not self.busy:
            fn()
            return
        self._between.append(fn)
        self._cut()

    def _kick(self) -> None:
        """New work: start a step if idle; cut a fast-forwarded run at the end of the step in progress."""
        if not self.busy:
            self._start(self.loop.now)
            return
        self._cut()

    def _cut(self) -> None:
        run = self._run
        if run is None or run[0] <= 1:
            return
        k, t0, first, slope = run[0], run[3], run[6], run[7]
        done = steps_within(first, slope, (self.loop.now - t0) * 1e3)
        if done + 1 < k:
            self._run = (done + 1, *run[1:])
            self.schedule_end(t0 + run_ms(first, slope, done + 1) / 1e3)

    def _start(self, t: float) -> None:
        deferred, self.deferred = self.deferred, []
        for req in deferred:  # the step queued now holds them (their token is on the host)
            self._join(req)
        if self.waiting or self.partial:
            self._step(t)
        elif self.decoding:
            self._decode_run(t)
        else:
            self.busy, self._run = False, None

    def _launch(self, t: float, first: float, slope: float, k: int, batch: int, context: float,
                chunks: list[tuple[SimRequest, int]]) -> None:
        """Run k steps from t: the first takes `first` ms, each later one `slope` ms more (alone)."""
        fresh = [r for r in self.new_rows if r.t_second < 0]
        self.new_rows = []
        for r in fresh:
            if r.marks is not None:
                r.marks["join_start"] = t
        self.busy = True
        self._run = (k, batch, context, t, chunks, fresh, first, slope)
        if self.device is not None:  # one step (no fast-forward), its end moved as co-runners start and stop
            self.device.start(self, first, bool(chunks), batch, sum(n for _, n in chunks))
            return
        for r in fresh:  # rows that joined since the last launch get their second token when the first step ends
            self.listener.on_second_token(r, t + first / 1e3)
        self.schedule_end(t + run_ms(first, slope, k) / 1e3)

    def schedule_end(self, t: float) -> None:
        """The step (or run) in flight ends at `t`; an end scheduled before is void."""
        self._version += 1
        self.loop.at(t, self._end, self._version)

    def _step(self, t: float) -> None:
        """One step by the engine's rule (prompt chunks, rows that just joined, or blocks to win back)."""
        while self.decoding and self.used_blocks() + len(self.decoding) / self.bs > self.num_blocks:
            self._preempt_newest()
        budget = self.max_tokens - len(self.decoding)
        chunks: list[tuple[SimRequest, int]] = []
        tokens, pairs = 0, 0.0
        for req in self.partial:
            if budget <= 0:
                break
            n = min(req.need, budget)
            if not self._grow(req, n, preempt=True):
                break
            chunks.append((req, n))
            tokens, pairs, budget = tokens + n, pairs + chunk_pairs(n, req.computed), budget - n
        guess = self.overlap and bool(self.decoding)  # a step for these rows is queued already
        tokens, pairs, pulled = self._admit(chunks, budget, tokens, pairs)
        if guess and not chunks:
            self.deferred.extend(pulled)  # nothing to launch beside the queued step: they wait for the next
        else:
            for req in pulled:
                self._join(req)
        batch = len(self.decoding)
        if not chunks:
            if batch:
                self._decode_run(t)  # only pulled requests joined: a decode run
            else:
                self.busy, self._run = False, None  # nothing fits (blocks held by transfers and leases): wait
            return
        context = self.dec_ctx / batch if batch else 0.0
        self._launch(t, self.cost.step_ms(tokens, pairs, batch, context, len(chunks)), 0.0, 1, batch, context, chunks)

    def _admit(self, chunks: list[tuple[SimRequest, int]], budget: int, tokens: int, pairs: float
               ) -> tuple[int, float, list[SimRequest]]:
        """Waiting requests into the step, in order, while budget, max_num_seqs and free blocks allow; pulled ones
        (KV received: they join as decoding rows) are returned for the caller to join."""
        pulled: list[SimRequest] = []
        while self.waiting and budget > 0 and \
                len(self.partial) + len(self.decoding) + len(self.deferred) + len(pulled) < self.max_seqs:
            req = self.waiting[0]
            if req.need == 1 and req.computed > 0:
                pulled.append(self.waiting.popleft())
                budget -= 1
                continue
            n = min(req.need, budget)
            if not self._grow(req, n, preempt=False):
                break
            self.waiting.popleft()
            self.partial.append(req)
            chunks.append((req, n))
            tokens, pairs, budget = tokens + n, pairs + chunk_pairs(n, req.computed), budget - n
        return tokens, pairs, pulled

    def _grow(self, req: SimRequest, n: int, preempt: bool) -> bool:
        """Blocks for `req`'s next `n` tokens; a running prompt may preempt decoding rows for them."""
        extra = cdiv(req.computed + n, self.bs) - req.blocks
        while self.used_blocks() + extra > self.num_blocks:
            if not (preempt and self.decoding):
                return False
            self._preempt_newest()
        req.blocks += extra
        self.other_blocks += extra
        return True

    def _decode_run(self, t: float) -> None:
        """Decoding rows only: every step up to the next finish (or until blocks run short) as one event."""
        while len(self.decoding) > 1 and self.used_blocks() + len(self.decoding) / self.bs > self.num_blocks:
            self._preempt_newest()
        batch = len(self.decoding)
        while self._finish and self._finish[0][2] != self._finish[0][3].epoch:
            heapq.heappop(self._finish)  # stale: the row was preempted since
        k = max(1, self._finish[0][0] - self.step_count) if self._finish else 1
        room = max(1, int((self.num_blocks - self.used_blocks()) * self.bs / batch))
        k = min(k, room) if self.fast_forward and not self.deferred else 1
        context = self.dec_ctx / batch
        self._launch(t, *self.cost.decode_at(batch, context), k, batch, context, [])

    def _end(self, version: int) -> None:
        """A step (or a fast-forwarded run of k) ended: tokens to the rows and chunks, finished rows out."""
        if version != self._version or self._run is None:
            return  # a cut run's old end
        t = self.loop.now
        k, batch, _, t0, chunks, fresh, first, slope = self._run
        if self.device is not None:  # the step as it ran beside its co-runners
            self.device.finish(self)
            first = (t - t0) * 1e3
            for r in fresh:
                self.listener.on_second_token(r, t)
        self.step_count += k
        self.dec_ctx += batch * k
        self.steps += k
        last = first + slope * (k - 1)
        self.listener.on_steps(first, last, batch, k, len(fresh))
        self._append_segment(last)
        for req, n in chunks:
            self.queued_tokens -= min(n, max(0, req.prompt - req.computed))
            req.computed += n
            if req.need == 0:
                req.generated += 1
                self._sampled(req, t)
        while self._finish and self._finish[0][0] <= self.step_count:
            _, _, epoch, req = heapq.heappop(self._finish)
            if epoch == req.epoch and req.rid in self.decoding:
                self._leave(req)
                self.listener.on_finish(req, self, t)
        todo, self._between = self._between, []
        for fn in todo:
            fn()
        self._start(t)

    def _append_segment(self, ms: float) -> None:
        self.segs.append(ms)
        if len(self.segs) > SEGMENTS_KEPT:
            low = min((r.seg_index for r in self.decoding.values()), default=self.seg_base + len(self.segs))
            cut = min(low - self.seg_base, len(self.segs) - 1)
            if cut > 0:
                del self.segs[:cut]
                self.seg_base += cut

    def _sampled(self, req: SimRequest, t: float) -> None:
        """A prompt (or a recompute) finished computing and sampled a token."""
        self.partial.remove(req)
        if self.role == "prefill":
            self.leased += 1  # its blocks stay until the decode side has pulled them (release)
            req.lease_blocks, req.blocks = req.blocks, 0
            self.listener.on_first_token(req, self, t)
            return
        first = req.t_first < 0
        if first:
            self.listener.on_first_token(req, self, t)
        if req.generated >= req.output:
            self.other_blocks -= req.blocks
            req.blocks = 0
            self.listener.on_finish(req, self, t)
            return
        self._join(req)

    def _join(self, req: SimRequest) -> None:
        """Into the decode set: one token a step from the next step on."""
        self.other_blocks -= req.blocks
        req.join_blocks, req.join_step, req.join_generated, req.join_context = (req.blocks, self.step_count,
                                                                                req.generated, req.computed)
        req.blocks = 0
        self.join_blocks += req.join_blocks
        self.join_ctx += req.computed
        self.dec_ctx += req.computed
        req.epoch += 1
        req.seg_index = self.seg_base + len(self.segs)
        heapq.heappush(self._finish, (self.step_count + req.output - req.generated, next(self._seq), req.epoch, req))
        self.decoding[req.rid] = req
        self.new_rows.append(req)

    def _leave(self, req: SimRequest) -> None:
        """Out of the decode set, its counts made explicit and its blocks freed."""
        steps = self.step_count - req.join_step
        req.generated, req.computed = req.join_generated + steps, req.join_context + steps
        self.dec_ctx -= req.computed
        self.join_ctx -= req.join_context
        self.join_blocks -= req.join_blocks
        del self.decoding[req.rid]

    def _preempt_newest(self) -> None:
        """Blocks ran out: the most recently admitted row gives its blocks back and is recomputed later."""
        req = next(reversed(self.decoding.values()))
        self._leave(req)
        if req in self.new_rows:
            self.new_rows.remove(req)
        req.computed, req.blocks = 0, 0
        req.recomputes += 1
        req.epoch += 1
        self.waiting.appendleft(req)
        self.queued_tokens += req.prompt
