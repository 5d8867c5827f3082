"""The simulation clock: a heap of (time, sequence, callback, argument) events."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class EventLoop:
    """Events run in time order; equal times run in the order they were scheduled (the sequence number)."""

    __slots__ = ("heap", "now", "_seq")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self.now = 0.0  # seconds: the time of the event running now
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run `fn(arg)` at time `t` (never before now)."""
        heapq.heappush(self.heap, (t if t > self.now else self.now, next(self._seq), fn, arg))

    def next_time(self) -> float:
        return self.heap[0][0] if self.heap else float("inf")

    def run_one(self) -> None:
        t, _, fn, arg = heapq.heappop(self.heap)
        self.now = t
        fn(arg)

    def run_until(self, t_end: float) -> None:
        """Run every event up to `t_end`, then set the clock to it."""
        heap = self.heap
        while heap and heap[0][0] <= t_end:
            t, _, fn, arg = heapq.heappop(heap)
            self.now = t
            fn(arg)
        self.now = max(self.now, t_end)
