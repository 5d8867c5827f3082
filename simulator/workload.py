"""Arrivals for a simulation: a trace file, or a generator (Poisson, bursty, diurnal), as chunks of plain lists.

Trace files give each request's arrival time, prompt (input) length and output length, in the layouts public
traces use: Mooncake's JSON lines (`{"timestamp": ms, "input_length": n, "output_length": m, ...}`), Azure's LLM
inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps as dates), or this project's CSV
(`timestamp,input_length,output_length`, seconds). Times are shifted to start at 0.

Generators draw arrivals second by second from a Poisson process whose rate may follow a day (`diurnal`: a
sinusoid between `rate` at the trough and `peak_rate` at `peak_at_s`) and be multiplied by bursts (`burst_factor`
for `burst_s`, starting as a Poisson process every `burst_every_s` on average). Lengths come from one class of
requests, or two whose shares follow the day (`mix`): the prompt/output mix shifts as traffic does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from engine.config import ConfigError

Chunk = tuple[list[float], list[int], list[int]]


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: `N` (fixed), `A:B` (uniform), `lognormal:MEAN:SIGMA[:MAX]` (mean in tokens)."""

    kind: str  # fixed | uniform | lognormal
    a: float  # the length, the low end, or the mean
    b: float = 0.0  # the high end (uniform) or sigma of the underlying normal (lognormal)
    cap: int = 0  # lognormal: longest length drawn (0: 1,000,000)

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal") or self.a < 1 or (self.kind == "uniform" and self.b < self.a):
            raise ConfigError(f"bad length distribution {self}")

    @classmethod
    def parse(cls, s: str) -> Lengths:
        parts = s.split(":")
        try:
            if parts[0] == "lognormal":
                return cls("lognormal", float(parts[1]), float(parts[2]), int(parts[3]) if len(parts) > 3 else 0)
            if len(parts) == 2:
                return cls("uniform", float(parts[0]), float(parts[1]))
            return cls("fixed", float(parts[0]))
        except (IndexError, ValueError):
            raise ConfigError(f"length {s!r}: expected N, A:B or lognormal:MEAN:SIGMA[:MAX]") from None

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        mu = math.log(self.a) - self.b**2 / 2  # so that the mean is `a`
        return np.clip(np.rint(rng.lognormal(mu, self.b, size=n)), 1, self.cap or 1_000_000).astype(np.int64)

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a


@dataclass(frozen=True)
class Workload:
    """A generated workload."""

    arrival: str  # poisson | bursty | diurnal
    rate: float  # requests/s: the mean (poisson, bursty) or the daily trough (diurnal)
    duration_s: float  # arrivals during [0, duration_s)
    prompt: Lengths  # class A prompt lengths
    output: Lengths  # class A output lengths
    peak_rate: float = 0.0  # diurnal: requests/s at the daily peak
    period_s: float = 86400.0  # diurnal: length of a day
    peak_at_s: float = 14 * 3600.0  # diurnal: when in the day the rate peaks
    burst_factor: float = 1.0  # a burst multiplies the rate by this
    burst_every_s: float = 0.0  # mean time between burst starts (0: no bursts)
    burst_s: float = 300.0  # how long a burst lasts
    mix_prompt: Lengths | None = None  # class B prompt lengths (None: one class only)
    mix_output: Lengths | None = None  # class B output lengths
    mix_low: float = 0.0  # class B's share of requests at its daily low ...
    mix_high: float = 0.0  # ... and at its daily high
    mix_peak_at_s: float = 20 * 3600.0  # when in the day class B's share peaks
    seed: int = 0  # everything random is drawn from this

    def __post_init__(self) -> None:
        checks = [(self.arrival in ("poisson", "bursty", "diurnal"), "arrival must be poisson, bursty or diurnal"),
                  (self.rate >= 0 and self.duration_s > 0, "rate must be >= 0 and duration_s > 0"),
                  (self.arrival != "diurnal" or self.peak_rate >= self.rate, "diurnal needs peak_rate >= rate"),
                  (self.burst_factor >= 1 and self.burst_every_s >= 0 and self.burst_s > 0, "bad burst settings"),
                  (0 <= self.mix_low <= self.mix_high <= 1, "mix shares must satisfy 0 <= low <= high <= 1"),
                  ((self.mix_prompt is None) == (self.mix_output is None), "mix needs both prompt and output")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"workload: {msg}")

    def rate_at(self, t: np.ndarray, bursts: np.ndarray) -> np.ndarray:
        """Requests/s at times `t`, bursts (their start times) included."""
        base = np.full_like(t, self.rate, dtype=float)
        if self.arrival == "diurnal":
            phase = np.cos(2 * np.pi * (t - self.peak_at_s) / self.period_s)
            base = self.rate + (self.peak_rate - self.rate) * (1 + phase) / 2
        if len(bursts):
            i = np.searchsorted(bursts, t, side="right") - 1
            inside = (i >= 0) & (t - bursts[np.maximum(i, 0)] < self.burst_s)
            base = np.where(inside, base * self.burst_factor, base)
        return base

    def mix_share(self, t: np.ndarray) -> np.ndarray:
        """Class B's share of the requests arriving at `t`."""
        phase = np.cos(2 * np.pi * (t - self.mix_peak_at_s) / self.period_s)
        return self.mix_low + (self.mix_high - self.mix_low) * (1 + phase) / 2

    def bursts(self) -> np.ndarray:
        if self.burst_every_s <= 0 or self.burst_factor <= 1:
            return np.zeros(0)
        rng = np.random.default_rng([self.seed, 1])
        n = rng.poisson(self.duration_s / self.burst_every_s)
        return np.sort(rng.uniform(0, self.duration_s, size=n))

    def chunks(self, chunk_s: float = 60.0) -> Iterator[Chunk]:
        """Arrivals in time order, `chunk_s` of simulated time per chunk."""
        rng, bursts = np.random.default_rng([self.seed, 0]), self.bursts()
        for start in np.arange(0.0, self.duration_s, chunk_s):
            seconds = np.arange(start, min(start + chunk_s, self.duration_s))
            counts = rng.poisson(self.rate_at(seconds + 0.5, bursts))
            t = np.sort(np.repeat(seconds, counts) + rng.random(int(counts.sum())))
            yield self._lengths(rng, t)

    def _lengths(self, rng: np.random.Generator, t: np.ndarray) -> Chunk:
        n = len(t)
        prompt, output = self.prompt.sample(rng, n), self.output.sample(rng, n)
        if self.mix_prompt is not None and self.mix_output is not None:
            b = rng.random(n) < self.mix_share(t)
            prompt = np.where(b, self.mix_prompt.sample(rng, n), prompt)
            output = np.where(b, self.mix_output.sample(rng, n), output)
        return t.tolist(), prompt.tolist(), output.tolist()

    def expected_requests(self) -> float:
        t = np.arange(0.0, self.duration_s) + 0.5
        return float(self.rate_at(t, self.bursts()).sum())
