"""How far each prefill-role request's KV is written, layer by layer: what layer-wise streaming reads.

A decode worker can pull a prompt's KV while the prefill worker still computes it, a layer group at a time
(decode_worker/kv_pull.py). It needs to know, for every layer, how many leading prompt tokens have their KV of
that layer written. The engine learns it from forward hooks on the decoder layers: when layer l of a step's
forward has run, every prefill-role request of that step has its KV of layer l written up to the end of its
chunk. On the CPU the hook runs when the layer has computed; on a GPU it runs when the layer's kernels are
queued, so it records a CUDA event there and the progress counts once the event has completed.

Only requests with a lease (prefill role) are tracked; a step without one costs a hook call per layer that returns
at once (CUDA graph replays, the decode steps on a GPU, call no hooks at all). Threads: hooks run on the engine's
step thread; `layer_tokens` is read from any thread (each entry is a plain int, written once per layer per step,
never torn).

The queued CUDA events are drained at the start of every step as well as by readers: without layer-wise streaming
nobody reads, and a prefill worker queued one event per layer per prompt step for as long as it ran. So at most
the events of the steps still on the device (one or two) are held.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import nn

from engine.scheduler import SchedulerOutput


class LayerProgress:
    """Per tracked request: tokens whose KV is written, per layer."""

    def __init__(self, num_layers: int, device: torch.device,
                 new_event: Callable[[], torch.cuda.Event] | None = None) -> None:
        self.num_layers = num_layers
        self.cuda = device.type == "cuda" or new_event is not None
        self._new_event = new_event or torch.cuda.Event  # a test passes its own to run the device path on a CPU
        self._done: dict[str, list[int]] = {}
        self._step: list[tuple[str, int]] = []  # (request id, tokens computed once this step's forward has run)
        self._queued: deque[tuple[torch.cuda.Event, int, list[tuple[str, int]]]] = deque()  # CUDA: not yet landed
        self._attached = False
        self._drain = threading.Lock()  # several readers may drain the queued events at once

    def attach(self, layers: Sequence[nn.Module]) -> None:
        """Hook every decoder layer (once)."""
        if self._attached:
            return
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda _m, _args, _out, i=i: self._layer_ran(i))
        self._attached = True

    def begin(self, out: SchedulerOutput) -> None:
        """Before a step's forward: note where each tracked request of the step will be once it has run."""
        self._step = []
        self._drain_landed()
        for s in out.scheduled:
            r = s.request
            if r.lease_s is None:
                continue
            if r.request_id not in self._done:  # admitted now: a prefix-cache hit is computed for every layer
                self._done[r.request_id] = [r.num_computed_tokens] * self.num_layers
            self._step.append((r.request_id, min(r.num_computed_tokens + s.num_new_tokens, r.num_prompt_tokens)))

    def end(self) -> None:
        self._step = []

    def _layer_ran(self, layer: int) -> None:
        if not self._step:
            return
        if self.cuda:
            event = self._new_event()
            event.record()
            self._queued.append((event, layer, list(self._step)))
        else:
            self._apply(layer, self._step)

    def _apply(self, layer: int, targets: list[tuple[str, int]]) -> None:
        for rid, tokens in targets:
            done = self._done.get(rid)
            if done is not None and tokens > done[layer]:
                done[layer] = tokens

    def layer_tokens(self, request_id: str) -> tuple[int, ...] | None:
        """Per layer, the leading tokens of the request whose KV is written; None if it is not tracked."""
        self._drain_landed()
        done = self._done.get(request_id)
        return None if done is None else tuple(done)

    def _drain_landed(self) -> None:
        """Apply the queued events that have completed, in order (events on one stream complete in order)."""
        with self._drain:
            while self._queued and self._queued[0][0].query():
                _, layer, targets = self._queued.popleft()
                self._apply(layer, targets)

    @property
    def num_queued(self) -> int:
        """CUDA events recorded and not yet seen completed."""
        return len(self._queued)

    def forget(self, request_id: str) -> None:
        """The request ended, handed off (its lease reports it complete) or was preempted (it starts over)."""
        self._done.pop(request_id, None)
