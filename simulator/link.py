"""A decode replica's link: the KV pulls it makes, one at a time, each `latency_ms + bytes / rate` alone.

On a network or a GPU's copy engines the bytes move beside the replicas' steps: a pull's time is the profile's,
after the pulls queued before it have moved their bytes (its fixed latency overlaps the next pull's bytes). On a
machine whose cores move them (`SharedDevice.carries_transfers`: the TCP backend between two workers of one VM)
a pull is work on those cores beside the workers' steps (simulator/device.py), so it runs slower while they step,
and they while it runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from simulator.device import SharedDevice
from simulator.events import EventLoop
from simulator.profile import TransferCosts


class Link:
    """The pulls of the decode replica `name`."""

    def __init__(self, name: str, loop: EventLoop, transfer: TransferCosts, device: SharedDevice | None) -> None:
        self.name, self.loop, self.transfer = f"{name}-link", loop, transfer
        self.device = device if device is not None and device.carries_transfers else None
        self.free_at = 0.0  # when the bytes queued so far have moved (off-device links)
        # on-device pulls not ended, the first in flight: (ms alone, done, its argument)
        self.queue: deque[tuple[float, Callable[[Any], None], Any]] = deque()
        self._version = 0

    def pull(self, nbytes: float, done: Callable[[Any], None], arg: Any) -> None:
        """Move `nbytes` after the pulls queued before; `done(arg)` when they are in."""
        bytes_s = nbytes / (self.transfer.gib_s * 2**30)
        if self.device is None:
            start = max(self.loop.now, self.free_at)
            self.free_at = start + bytes_s
            self.loop.at(self.free_at + self.transfer.latency_ms / 1e3, done, arg)
            return
        self.queue.append((self.transfer.latency_ms + bytes_s * 1e3, done, arg))
        if len(self.queue) == 1:
            self.device.start_transfer(self, self.queue[0][0])

    def schedule_end(self, t: float) -> None:
        """The pull in flight ends at `t` (the device moves it as its cores' sharing changes)."""
        self._version += 1
        self.loop.at(t, self._end, self._version)

    def _end(self, version: int) -> None:
        if version != self._version:
            return
        assert self.device is not None
        self.device.finish(self)
        _, done, arg = self.queue.popleft()
        if self.queue:
            self.device.start_transfer(self, self.queue[0][0])
        done(arg)
