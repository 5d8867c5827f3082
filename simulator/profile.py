"""A worker's measured costs on one kind of hardware: what `disagg profile` writes and `disagg simulate` reads.

One JSON file per (device, model shape, parallel size). Every figure is for one *replica* (one worker, which may
span `gpus_per_replica` devices with tensor parallelism):

- prefill: milliseconds of one engine step that computes one prompt of n tokens with nothing cached, by n; and
  chunks of n tokens computed after c cached tokens, from which the extra cost of attending to cached context is
  fitted (`attention_ms_per_pair`: ms per (new token, earlier token) pair);
- decode: milliseconds of one decode step by batch size x context length (every sequence at that context; the
  profiler writes the grid's envelope, non-decreasing in both);
- kv: block size, bytes per token of KV, and how many tokens the cache held at the profiled memory budget;
- transfer: the KV transfer rate and fixed latency of one pull (`latency_ms + bytes / rate`);
- startup: seconds from starting a worker process to serving (weights loaded, KV allocated, graphs captured);
- serving: what the worker's loop adds to every step (the decode grid times `engine.step` alone);
- sustained (GPU): how much slower a prompt step runs on a GPU kept busy than the prefill table's (timed with the
  GPU idle between prompts): under sustained load the card meets its power limit and lowers its clocks.

`provenance.kind` says how the figures were obtained: `measured` (by `disagg profile` on that hardware),
`derived` (computed from recorded measurements, listed in `provenance.sources`) or `analytic` (a roofline model,
no measurement behind it). Simulations report the kind of every profile they use.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine.config import ConfigError

SCHEMA = 1
KINDS = ("measured", "derived", "analytic")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"profile: {msg}")


def _ascending(xs: tuple[float, ...]) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:], strict=False))


@dataclass(frozen=True)
class Provenance:
    """Where the figures come from."""

    kind: str  # measured | derived | analytic
    note: str = ""  # what was measured or assumed, in words
    sources: tuple[str, ...] = ()  # result files or commands the figures were taken from
    date: str = ""  # when (ISO date)
    command: str = ""  # the command that wrote this file

    def __post_init__(self) -> None:
        _require(self.kind in KINDS, f"provenance.kind must be one of {KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class ChunkCost:
    """One measured prefill chunk: `tokens` new tokens after `context` cached ones took `ms`."""

    tokens: int  # new tokens computed in the step
    context: int  # tokens already in the KV cache before them
    ms: float  # step time


@dataclass(frozen=True)
class PrefillCosts:
    """Prefill step time by prompt length, and the cost of attending to cached context."""

    tokens: tuple[int, ...]  # prompt lengths measured, ascending
    ms: tuple[float, ...]  # step time of one prompt of that length, nothing cached
    attention_ms_per_pair: float = 0.0  # extra ms per (new token, earlier token) pair of attention
    chunked: tuple[ChunkCost, ...] = ()  # the chunk measurements the attention cost was fitted from
    max_num_batched_tokens: int = 0  # the engine's step token budget while profiling (the largest chunk)

    def __post_init__(self) -> None:
        _require(len(self.tokens) == len(self.ms) >= 2, "prefill needs >= 2 (tokens, ms) points of equal length")
        _require(_ascending(self.tokens) and self.tokens[0] > 0, "prefill.tokens must be positive and ascending")
        _require(all(m > 0 for m in self.ms), "prefill.ms must be positive")
        _require(self.attention_ms_per_pair >= 0, "prefill.attention_ms_per_pair must be >= 0")


@dataclass(frozen=True)
class DecodeCosts:
    """Decode step time on a batch x context grid."""

    batch: tuple[int, ...]  # batch sizes measured, ascending
    context: tuple[int, ...]  # context lengths measured (tokens per sequence), ascending
    ms: tuple[tuple[float, ...], ...]  # ms[i][j]: step time at batch[i], context[j]

    def __post_init__(self) -> None:
        _require(len(self.batch) >= 2 and _ascending(self.batch) and self.batch[0] >= 1,
                 "decode.batch needs >= 2 ascending sizes >= 1")
        _require(len(self.context) >= 2 and _ascending(self.context) and self.context[0] >= 0,
                 "decode.context needs >= 2 ascending lengths")
        _require(len(self.ms) == len(self.batch) and all(len(r) == len(self.context) for r in self.ms),
                 "decode.ms must be a batch x context grid")
        _require(all(m > 0 for r in self.ms for m in r), "decode.ms must be positive")


@dataclass(frozen=True)
class KVCosts:
    """The KV cache of one replica."""

    block_size: int  # tokens per block
    bytes_per_token: int  # KV bytes of one token over all layers (one replica's share under tensor parallelism)
    capacity_tokens: int  # tokens the cache held at `memory_budget_bytes`
    memory_budget_bytes: int  # the KV budget profiled (a cluster config may set another)

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.bytes_per_token > 0 and self.capacity_tokens > 0,
                 "kv figures must be positive")


@dataclass(frozen=True)
class TransferCosts:
    """One KV pull from a prefill replica to a decode replica."""

    backend: str  # the transfer backend measured (tcp, nixl, cuda_ipc, rdma for analytic figures)
    gib_s: float  # bytes moved per second, GiB/s
    latency_ms: float = 0.0  # fixed cost of one pull (setup, notification)

    def __post_init__(self) -> None:
        _require(self.gib_s > 0 and self.latency_ms >= 0, "transfer.gib_s must be > 0 and latency_ms >= 0")


@dataclass(frozen=True)
class StartupCosts:
    """How long a new replica takes before it serves."""

    engine_s: float  # building the engine: weights, KV allocation, CUDA graphs
    process_s: float = 0.0  # starting the worker process before that (interpreter, imports, gRPC server)

    @property
    def total_s(self) -> float:
        return self.engine_s + self.process_s


@dataclass(frozen=True)
class ServingCosts:
    """What a serving worker adds to each engine step (benchmarks/profile_serving.py): its loop runs the step on
    an executor thread, hands the outputs to the request streams and reads its load between steps."""

    step_overhead_ms: float  # added to every step (a step's tokens reach the streams this much later than alone)
    by_batch: dict[str, dict[str, float]] = field(default_factory=dict)  # batch -> plain_ms, served_ms, overhead_ms
    # Added to every step that computes prompt tokens, as part of the step (a co-runner slows it as it slows the
    # rest): a serving worker's prompt step over the engine's own. On one H100 a serving prefill worker's lone
    # 16-token prompt step ran 18.7 ms where the engine alone runs it in 14.9 (0: not measured).
    prompt_step_ms: float = 0.0
    # Added for each prompt beyond the first that a step computes, likewise (an H100 prefill worker's two- and
    # three-prompt steps ran over a price with `prompt_step_ms` once; 0: not measured).
    extra_prompt_ms: float = 0.0

    def __post_init__(self) -> None:
        _require(self.step_overhead_ms >= 0, "serving.step_overhead_ms must be >= 0")
        _require(self.prompt_step_ms >= 0 and self.extra_prompt_ms >= 0,
                 "serving.prompt_step_ms and extra_prompt_ms must be >= 0")


@dataclass(frozen=True)
class CoRunCosts:
    """How much slower a step runs while another process keeps the rest of the machine busy: the other core of a
    2-core VM (whose cores may be hyperthreads of one), or the same GPU (two workers on one card). Each multiplier
    is over the profile's own time for the step (the prefill table, the decode grid), which the simulator scales."""

    prefill: float  # a prefill step's time multiplier (at the co-run's own prompt: 2,048 tokens on a GPU)
    decode: float  # a decode step's time multiplier (at the co-run's decode batch)
    note: str = ""  # what the co-runner was
    # CPU: the same for an engine whose threads use every core beside the busy process (0: not measured)
    oversubscribed_prefill: float = 0.0
    oversubscribed_decode: float = 0.0
    # The decode multiplier by the step's rows (ascending; empty: `decode` at every batch): a CPU profile timed 4
    # rows beside prefills at 1.63x where the serving runs' 1-2-row steps ran 1.19-1.26x, so both are timed.
    decode_batch: tuple[int, ...] = ()
    decode_by_batch: tuple[float, ...] = ()
    # The prefill multiplier by the step's prompt tokens (ascending; empty: `prefill` at every length): on an H100
    # a prompt of 1,024-1,600 tokens beside a serving decode worker ran 2.20-2.28x its table time, one of ~2,048
    # 2.11-2.19x, one of 2,100-2,600 2.03-2.09x (an H200's alike).
    prefill_tokens: tuple[int, ...] = ()
    prefill_by_tokens: tuple[float, ...] = ()
    # A decode step's multiplier beside a busy co-runner over its mean, at evenly spaced probabilities from 0 to 1
    # (an inverse CDF, linear between points, mean 1; empty: every such step at the mean). On an H100 the serving
    # decode worker's steps beside prompts ran p10 / p50 / p99 0.75 / 1.0 / 1.2x their median: where first gaps
    # fill most of the top 1% of gaps, the ITL p99 is the top ~0.2% of these steps (benchmarks/co_run_spread.py).
    # Drawn by the shared device of a GPU (simulator/device.py); CPU core sharing (CpuCores) charges the mean.
    decode_spread: tuple[float, ...] = ()
    # decode_spread by the step's rows (ascending rows; empty: decode_spread at every batch), each such an inverse
    # CDF of mean 1. An H100's serving decode steps beside prompts spread p90 1.20x their mean at 1-4 rows, 1.06x at
    # 17-32: a small step is a short window, and where it falls against a prompt's kernels moves it more.
    spread_batch: tuple[int, ...] = ()
    spread_by_batch: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self) -> None:
        _require(self.prefill >= 1 and self.decode >= 1, "co_run multipliers must be >= 1")
        if self.decode_spread:
            _check_spread(self.decode_spread, "co_run.decode_spread")
        _require(len(self.spread_batch) == len(self.spread_by_batch),
                 "co_run.spread_batch and co_run.spread_by_batch must be of equal length")
        _require(_ascending(self.spread_batch) and all(x >= 1 for x in self.spread_batch),
                 "co_run.spread_batch must be ascending sizes >= 1")
        for rows, xs in zip(self.spread_batch, self.spread_by_batch, strict=True):
            _check_spread(xs, f"co_run.spread_by_batch at {rows} rows")
        _require(self.oversubscribed_prefill >= 0 and self.oversubscribed_decode >= 0,
                 "co_run oversubscribed multipliers must be >= 0")
        for xs, ms, what in ((self.decode_batch, self.decode_by_batch, "decode_batch"),
                             (self.prefill_tokens, self.prefill_by_tokens, "prefill_tokens")):
            _require(len(xs) == len(ms), f"co_run.{what} and its multipliers must be of equal length")
            _require(_ascending(xs) and all(x >= 1 for x in xs), f"co_run.{what} must be ascending sizes >= 1")
            _require(all(m >= 1 for m in ms), f"co_run.{what}'s multipliers must be >= 1")

    def decode_at(self, rows: int) -> float:
        """The decode multiplier of a step of `rows` rows."""
        return held_linear(self.decode_batch, self.decode_by_batch, rows, self.decode)

    @property
    def spreads(self) -> bool:
        """Whether decode steps beside a co-runner spread around the mean (a draw per step: `spread_draw`)."""
        return bool(self.decode_spread or self.spread_batch)

    def spread_draw(self, rows: int, u: float) -> float:
        """A decode step's multiplier over the mean co-run at probability u for a step of `rows` rows: the
        measured spreads' values at u, linear in rows between them and held past both ends; decode_spread's
        without them (1.0 without either)."""
        if self.spread_batch:
            return held_linear(self.spread_batch, tuple(spread_at(xs, u) for xs in self.spread_by_batch), rows, 1.0)
        return spread_at(self.decode_spread, u) if self.decode_spread else 1.0

    def prefill_at(self, tokens: int) -> float:
        """The prefill multiplier of a step of `tokens` prompt tokens (0: not known, `prefill`)."""
        return held_linear(self.prefill_tokens, self.prefill_by_tokens, tokens, self.prefill) if tokens \
            else self.prefill


def _check_spread(xs: tuple[float, ...], what: str) -> None:
    rising = all(a <= b for a, b in zip(xs, xs[1:], strict=False))
    _require(len(xs) >= 2 and rising and xs[0] > 0, f"{what} must be >= 2 ascending multipliers > 0")
    _require(abs(spread_mean(xs) - 1) <= 0.02, f"{what} must have mean 1 (over the mean step)")


def spread_mean(xs: tuple[float, ...]) -> float:
    """The mean of an inverse CDF given at evenly spaced probabilities 0..1, linear between them."""
    return (sum(xs) - (xs[0] + xs[-1]) / 2) / (len(xs) - 1)


def spread_at(xs: tuple[float, ...], u: float) -> float:
    """The inverse CDF `xs` (evenly spaced probabilities 0..1) at probability u."""
    k = u * (len(xs) - 1)
    i = min(int(k), len(xs) - 2)
    return xs[i] + (xs[i + 1] - xs[i]) * (k - i)


def held_linear(xs: tuple[int, ...], ys: tuple[float, ...], x: float, default: float) -> float:
    """Linear between the measured points, held past both ends (a multiplier does not grow without bound);
    `default` when nothing was measured."""
    if not xs:
        return default
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


@dataclass(frozen=True)
class SustainedCosts:
    """Prompt steps back to back against the prefill table's, timed one at a time with the device idle between
    (benchmarks/profile_sustained.py): a GPU busy for more than ~0.1 s reaches its power limit and lowers its
    clocks, and compute-bound steps slow with them (an H100 at 700 W: 2,048-token prompts 46 -> 51.7 ms)."""

    prompt: float  # a prompt step's time multiplier on a device busy all the time
    note: str = ""  # what was timed

    def __post_init__(self) -> None:
        _require(self.prompt >= 1, "sustained.prompt must be >= 1")


@dataclass(frozen=True)
class Profile:
    """One replica's costs on one kind of hardware."""

    name: str  # e.g. h200-llama3-8b
    device: str  # the hardware, in words
    model: dict[str, Any]  # the model shape (layers, hidden, heads, kv heads, dtype, parameters)
    provenance: Provenance  # measured | derived | analytic, and from what
    prefill: PrefillCosts  # prompt step times
    decode: DecodeCosts  # decode step times
    kv: KVCosts  # the KV cache
    transfer: TransferCosts  # KV pulls
    startup: StartupCosts  # time to serve
    gpus_per_replica: int = 1  # devices one replica occupies (the tensor-parallel size); 0 for a CPU replica
    co_run: CoRunCosts | None = None  # slowdown beside another busy process on the same machine/device (measured)
    serving: ServingCosts | None = None  # the worker loop's cost per step (measured; None: not measured, 0 assumed)
    sustained: SustainedCosts | None = None  # prompt steps on a busy device (measured on GPUs; None: as alone)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else the profiler recorded (ceilings, notes)

    def __post_init__(self) -> None:
        _require(bool(self.name), "name must not be empty")
        _require(self.gpus_per_replica >= 0, "gpus_per_replica must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def scaled(self, k: float, prefill_k: float | None = None, row_k: float | None = None,
               fixed_ms: float = 0.0) -> Profile:
        """This profile on a machine whose steps run `k` times slower (k < 1: faster): every step time (prefill,
        chunks, attention, decode, serving loop) times k, or prompts (prefill, chunks, attention) times `prefill_k`
        where given: a VM's memory bandwidth (decode steps) and its compute (prompts) can drift apart; one 2-core VM
        ran decode steps 3.3x a profile's and prompts 1.0x. With `row_k`, a decode step's first `fixed_ms` (the part
        that does not grow with its rows: reading the weights) scales by k and the rest by `row_k`. KV, transfer and
        start-up unchanged."""
        p = k if prefill_k is None else prefill_k
        r = k if row_k is None else row_k
        _require(k > 0 and p > 0 and r > 0 and fixed_ms >= 0, "a profile's scales must be > 0")
        pre, dec = self.prefill, self.decode

        def step(m: float) -> float:
            return k * min(m, fixed_ms) + r * max(0.0, m - fixed_ms)

        return replace(
            self,
            prefill=replace(pre, ms=tuple(m * p for m in pre.ms), attention_ms_per_pair=pre.attention_ms_per_pair * p,
                            chunked=tuple(replace(c, ms=c.ms * p) for c in pre.chunked)),
            decode=replace(dec, ms=tuple(tuple(step(m) for m in row) for row in dec.ms)),
            serving=replace(self.serving, step_overhead_ms=self.serving.step_overhead_ms * k,
                            prompt_step_ms=self.serving.prompt_step_ms * p,
                            extra_prompt_ms=self.serving.extra_prompt_ms * p) if self.serving else None)

    def save(self, path: str) -> None:
        text = json.dumps(self.to_dict(), indent=1)
        # lists of numbers on one line each: a decode grid reads as a table
        text = re.sub(r"\[[\d\s,.eE+-]+\]", lambda m: re.sub(r"\s+", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"),
                      text)
        with open(path, "w") as f:
            f.write(text + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        d = dict(d)
        _require(d.pop("schema", SCHEMA) == SCHEMA, f"schema must be {SCHEMA}")
        pre = dict(d["prefill"])
        pre["chunked"] = tuple(ChunkCost(**c) for c in pre.get("chunked", ()))
        dec = d["decode"]
        return cls(
            name=d["name"], device=d["device"], model=dict(d.get("model", {})),
            provenance=Provenance(**{**d["provenance"], "sources": tuple(d["provenance"].get("sources", ()))}),
            prefill=PrefillCosts(**{**pre, "tokens": tuple(pre["tokens"]), "ms": tuple(pre["ms"])}),
            decode=DecodeCosts(tuple(dec["batch"]), tuple(dec["context"]), tuple(tuple(r) for r in dec["ms"])),
            kv=KVCosts(**d["kv"]), transfer=TransferCosts(**d["transfer"]), startup=StartupCosts(**d["startup"]),
            gpus_per_replica=int(d.get("gpus_per_replica", 1)), extra=dict(d.get("extra", {})),
            co_run=_co_run(d["co_run"]) if d.get("co_run") else None,
            serving=ServingCosts(**d["serving"]) if d.get("serving") else None,
            sustained=SustainedCosts(**d["sustained"]) if d.get("sustained") else None)

    @classmethod
    def load(cls, path: str) -> Profile:
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a profile ({type(e).__name__}: {e})") from None


def _co_run(d: dict[str, Any]) -> CoRunCosts:
    lists = ("decode_batch", "decode_by_batch", "prefill_tokens", "prefill_by_tokens", "decode_spread", "spread_batch")
    return CoRunCosts(**{**d, **{k: tuple(d.get(k, ())) for k in lists},
                         "spread_by_batch": tuple(tuple(xs) for xs in d.get("spread_by_batch", ()))})
