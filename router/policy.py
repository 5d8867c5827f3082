"""How the router picks one worker out of a pool for a prefill or a decode."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from router.registry import WorkerState


class Policy(ABC):
    """Picks a worker for one phase (prefill | decode). Instances keep their own rotation state."""

    name: str = ""

    def __init__(self, phase: str) -> None:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        self.phase = phase
        self._turn = 0

    def choose(self, workers: Sequence[WorkerState]) -> WorkerState:
        """One of `workers` (which must not be empty)."""
        if not workers:
            raise ValueError("no worker to choose from")
        ordered = sorted(workers, key=lambda w: w.address)
        start = self._turn % len(ordered)
        self._turn += 1
        return self._pick(ordered[start:] + ordered[:start])

    @abstractmethod
    def _pick(self, rotated: list[WorkerState]) -> WorkerState:
        """Pick from the candidates, listed in an order that rotates by one on each call."""


class RoundRobin(Policy):
    """Each worker in turn."""

    name = "round_robin"

    def _pick(self, rotated: list[WorkerState]) -> WorkerState:
        return rotated[0]


class LeastLoaded(Policy):
    """The worker with the least work, from its latest Load report plus this router's requests in flight on it.

    The in-flight counts move at once, so a burst spreads out before the next poll. Prefill: fewest queued prompt
    tokens, then fewest waiting requests. Decode: lowest KV usage (in steps of `kv_usage_step`, so near-equal
    workers tie), then fewest running requests. Ties go to the rotation order, i.e. round-robin.
    """

    name = "least_loaded"
    kv_usage_step = 0.05  # KV usage differences below this count as equal

    def _pick(self, rotated: list[WorkerState]) -> WorkerState:
        key = self._prefill_key if self.phase == "prefill" else self._decode_key
        return min(rotated, key=key)

    @staticmethod
    def _prefill_key(w: WorkerState) -> tuple[int, int]:
        queued = w.load.queued_prefill_tokens if w.load else 0
        waiting = w.load.num_waiting if w.load else 0
        return queued + w.in_flight_tokens, waiting + w.in_flight

    def _decode_key(self, w: WorkerState) -> tuple[int, int]:
        usage = w.load.kv_usage if w.load else 0.0
        running = w.load.num_running if w.load else 0
        return int(usage / self.kv_usage_step), running + w.in_flight


POLICIES: Mapping[str, type[Policy]] = MappingProxyType({p.name: p for p in (RoundRobin, LeastLoaded)})


def make_policy(name: str, phase: str) -> Policy:
    """A new policy instance by name (see `POLICIES`) for `phase` (prefill | decode)."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return cls(phase)
