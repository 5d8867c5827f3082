"""How the router picks one worker out of a pool for a prefill or a decode.

Policies: `round_robin`, `least_loaded`, `kv_aware` (prefix overlap against load; see `KVAware`).

Every policy given the registry's `KVIndex` also predicts, for the prompt it places, how many of its leading
full blocks the chosen worker already caches (`Placement`, exported as router metrics), and tells the index the
worker will cache the prompt's blocks (`KVIndex.expect`), so prompts routed before the next Load poll count too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from engine.kv_cache_manager import prefix_hashes
from router.registry import KVIndex, WorkerState


@dataclass(frozen=True)
class Placement:
    """The last choice of a policy: where the prompt went and how much of it the index says is cached there."""

    worker: WorkerState
    prompt_blocks: int = 0  # full blocks of the prompt (at the worker's block size)
    matched_blocks: int = 0  # of which the worker holds a leading run, per the router's index

    @property
    def overlap(self) -> float:
        return self.matched_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


class Policy(ABC):
    """Picks a worker for one phase (prefill | decode). Instances keep their own rotation state."""

    name: str = ""

    def __init__(self, phase: str, index: KVIndex | None = None, expect_ttl_s: float = 0.0) -> None:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be prefill or decode, got {phase!r}")
        self.phase = phase
        self.index = index
        self.expect_ttl_s = expect_ttl_s
        self.last: Placement | None = None
        self._turn = 0
        self._prompt: list[int] = []
        self._hashes: dict[int, list[int]] = {}  # block size -> this call's prompt hashes
        self._matches: dict[int, dict[str, int]] = {}  # block size -> address -> leading blocks held

    def choose(self, workers: Sequence[WorkerState], prompt_ids: Sequence[int] = ()) -> WorkerState:
        """One of `workers` (which must not be empty) for a prompt of `prompt_ids` (may be empty: unknown)."""
        if not workers:
            raise ValueError("no worker to choose from")
        ordered = sorted(workers, key=lambda w: w.address)
        start = self._turn % len(ordered)
        self._turn += 1
        self._prompt, self._hashes, self._matches = list(prompt_ids), {}, {}
        w = self._pick(ordered[start:] + ordered[:start])
        hashes = self.prompt_hashes(w)
        self.last = Placement(w, len(hashes), self.matched(w, ordered))
        if self.index is not None and hashes:
            self.index.expect(w.address, hashes, self.expect_ttl_s)
        return w

    def prompt_hashes(self, w: WorkerState) -> list[int]:
        """The chained hashes of the prompt's full blocks at `w`'s block size (none when it is unknown)."""
        bs = w.kv_block_size
        if self.index is None or bs <= 0 or not self._prompt:
            return []
        if bs not in self._hashes:
            self._hashes[bs] = prefix_hashes(self._prompt, bs)
        return self._hashes[bs]

    def matched(self, w: WorkerState, workers: Sequence[WorkerState]) -> int:
        """Leading blocks of the prompt that `w` caches, per the index (matched once per call for all `workers`)."""
        hashes = self.prompt_hashes(w)
        if not hashes or self.index is None:
            return 0
        bs = w.kv_block_size
        if bs not in self._matches:
            same = [x.address for x in workers if x.kv_block_size == bs]
            self._matches[bs] = self.index.match(hashes, same)
        return self._matches[bs].get(w.address, 0)

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


class KVAware(Policy):
    """Weighs how much of the prompt a worker already caches against how busy it is:

        score(w) = overlap_weight * matched_blocks(w) / prompt_blocks  -  load_weight * load(w)

    and takes the highest score; ties go to fewer requests in flight, then the rotation order (round-robin).
    `matched_blocks(w)`: the leading full blocks of the prompt the router's index says `w` caches (its events,
    plus prompts just routed there); `prompt_blocks`: the prompt's full blocks. The load is normalized so that
    the two terms compare:

    - prefill: load = max(queued_prefill_tokens, in_flight_new_tokens) / prompt_tokens, i.e. the prompt tokens
      `w` has to compute before it gets to this prompt, in units of this prompt. With both weights 1 the policy
      picks the worker with the fewest tokens to compute before this prompt's first token (its queue plus the
      uncached part of the prompt). `queued_prefill_tokens` (Load report) counts what the worker has not
      computed yet, prefix hits excluded; `in_flight_new_tokens` is the same for this router's requests in
      flight there (their prompts less the blocks predicted cached). The report lags by one poll while the
      in-flight count moves at once; the max counts a request once.
    - decode: load = max(kv_usage, in_flight_tokens / KV capacity in tokens), 0..1. With both weights 1 a full
      prefix overlap outweighs up to 100 percentage points of KV usage; overlap there saves the pull.

    Without an index or a known block size every overlap is 0 and it routes by load alone.
    """

    name = "kv_aware"

    def __init__(self, phase: str, index: KVIndex | None = None, expect_ttl_s: float = 0.0,
                 overlap_weight: float = 1.0, load_weight: float = 1.0) -> None:
        super().__init__(phase, index, expect_ttl_s)
        self.overlap_weight, self.load_weight = overlap_weight, load_weight

    def _pick(self, rotated: list[WorkerState]) -> WorkerState:
        return max(rotated, key=lambda w: (self.score(w, rotated), -w.in_flight))

    def score(self, w: WorkerState, workers: Sequence[WorkerState]) -> float:
        n = len(self.prompt_hashes(w))
        overlap = self.matched(w, workers) / n if n else 0.0
        return self.overlap_weight * overlap - self.load_weight * self.load(w)

    def load(self, w: WorkerState) -> float:
        if self.phase == "prefill":
            queued = w.load.queued_prefill_tokens if w.load else 0
            return max(queued, w.in_flight_new_tokens) / max(1, len(self._prompt))
        usage = w.load.kv_usage if w.load else 0.0
        capacity = w.load.kv_blocks_total * w.kv_block_size if w.load else 0
        return max(usage, w.in_flight_tokens / capacity if capacity else 0.0)


POLICIES: Mapping[str, type[Policy]] = MappingProxyType({p.name: p for p in (RoundRobin, LeastLoaded, KVAware)})


def make_policy(name: str, phase: str, index: KVIndex | None = None, expect_ttl_s: float = 0.0,
                overlap_weight: float = 1.0, load_weight: float = 1.0) -> Policy:
    """A new policy instance by name (see `POLICIES`) for `phase` (prefill | decode).

    `index`: the registry's KV index (prefix overlap for `kv_aware`, predicted overlap for the metrics of all);
    `expect_ttl_s`: see `KVIndex.expect`; the weights apply to `kv_aware` only.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    if cls is KVAware:
        return KVAware(phase, index, expect_ttl_s, overlap_weight, load_weight)
    return cls(phase, index, expect_ttl_s)
