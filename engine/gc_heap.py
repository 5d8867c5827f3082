"""The garbage collector of a serving process: its start-up heap frozen, every pause timed.

CPython's full collection walks every object the collector tracks, with every thread of the process stopped. A
worker's heap after start-up is mostly what never dies (modules, the model's Python objects, the tokenizer):
~235,000 objects in a SmolLM2 worker, whose full collection took 55-74 ms on a 2-core VM. A full collection runs
whenever the objects that survived two younger collections grew by a quarter since the last one, so a serving
process runs one every so often, and each pause lands on every stream it is serving: a decode worker's outputs wait
for it, and so does a router relaying them.

`freeze_heap` runs once start-up is over (a worker's warm-up done, a router's app started): it collects, then moves
every object alive into the permanent generation (`gc.freeze`), so later full collections walk only what serving
made. vLLM does the same after its warm-up. $DISAGG_GC_FREEZE=0 turns it off (to measure what it saves).

`GCPauses` times every collection. A `gc.callbacks` function runs inside whatever allocation set off the
collection, on any thread, possibly while that thread holds a lock (a metric's, a log handler's): it must take
none. So the callback only adds to plain counters (collections never overlap: they run under the GIL, one at a
time) and appends long pauses to a bounded deque; readers (a Load report, the router's /metrics, a step log)
take them from there on their own thread.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine.stats import stat

log = logging.getLogger(__name__)

FREEZE_ENV = "DISAGG_GC_FREEZE"
LONG_PAUSE_S = 0.005  # a pause this long or longer is kept with its time (`take_long`)
WARN_PAUSE_S = 0.1  # readers log a pause this long or longer as a warning


def freeze_heap(what: str) -> int:
    """Collect, then freeze every object alive into the permanent generation; returns how many are frozen now (0
    when $DISAGG_GC_FREEZE=0). Call once start-up is over: what is frozen is never collected, garbage or not."""
    if os.environ.get(FREEZE_ENV, "1") == "0":
        log.info("%s: heap not frozen ($%s=0)", what, FREEZE_ENV)
        return 0
    began = time.perf_counter()
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("%s: froze %d start-up objects in %.0f ms; full collections skip them from now on", what, n,
             (time.perf_counter() - began) * 1e3)
    return n


@dataclass
class GCStats:
    """A process's garbage collections since `GCPauses.start` (reported in a worker's Load like engine/stats.py's)."""

    gc_collections: int = stat("Garbage collections of the worker process since start")
    gc_full_collections: int = stat("Full (generation 2) garbage collections of the worker process since start")
    gc_pause_seconds: float = stat("Seconds the worker process spent stopped in garbage collections since start")
    gc_longest_pause_seconds: float = stat("The longest garbage-collection pause of the worker process since start")
    gc_frozen_objects: int = stat("Start-up objects frozen out of garbage collection (0: not frozen)")


@dataclass(frozen=True)
class Pause:
    """One collection that took at least LONG_PAUSE_S."""

    at: float  # time.time() when it began
    generation: int  # the oldest generation it collected (2: a full collection)
    seconds: float
    objects: int  # objects it collected (freed)


class GCPauses:
    """Times this process's garbage collections from `start` to `stop` (see the module's note on threads)."""

    def __init__(self, keep: int = 1024) -> None:
        self.stats = GCStats(gc_frozen_objects=gc.get_freeze_count())
        self._long: deque[Pause] = deque(maxlen=keep)  # appended in the callback; the oldest drop if none reads
        self._began = 0.0
        self._began_at = 0.0

    def start(self) -> GCPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began, self._began_at = time.perf_counter(), time.time()
            return
        seconds = time.perf_counter() - self._began
        s = self.stats
        s.gc_collections += 1
        s.gc_pause_seconds += seconds
        s.gc_longest_pause_seconds = max(s.gc_longest_pause_seconds, seconds)
        generation = info.get("generation", 0)
        if generation == 2:
            s.gc_full_collections += 1
        if seconds >= LONG_PAUSE_S:
            self._long.append(Pause(self._began_at, generation, seconds, info.get("collected", 0)))

    def take_long(self) -> list[Pause]:
        """The pauses of at least LONG_PAUSE_S since the last call, oldest first."""
        out = []
        while self._long:
            out.append(self._long.popleft())
        return out

    def refresh_frozen(self) -> None:
        """Report the frozen count now (after `freeze_heap`)."""
        self.stats.gc_frozen_objects = gc.get_freeze_count()
