"""Settings of a simulation that the cluster YAML does not hold (the YAML gives the router, engine limits, pools
and autoscaling; the profile gives the costs)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ConfigError


@dataclass(frozen=True)
class SimConfig:
    """How the simulated cluster behaves beyond its YAML, and what the run measures."""

    slo_ttft_ms: float = 500.0  # goodput: a request's time to first token must be <= this ...
    slo_itl_ms: float = 30.0  # ... and the p99 of its own inter-token gaps <= this (benchmarks/serving.py's rule)
    hop_ms: float = 1.0  # one message between the router and a worker, each way
    admit_ms: float = 0.0  # the router's own work on a new request before its first message (HTTP, tokenizing)
    node_startup_s: float = 0.0  # getting a node for a new replica, before its worker starts (cloud GPU: minutes)
    startup_s: float | None = None  # a new replica serves this long after it is asked for; None: node_startup_s
    # plus the profile's start-up (process + engine)
    route_sample: int = 0  # candidates drawn at random for the routing policy (0: the whole pool, as the router does)
    fast_forward: bool = True  # run decode-only stretches as one event; off: one event per step (exact gaps)
    shared_device: bool = False  # every replica on one machine/device (workers sharing a VM's cores or one GPU)
    # CPU workers on shared cores whose threads outnumber the cores: "fair" shares, or the profile's "measured"
    # oversubscribed multipliers (measured beside a co-runner that never pauses; they over-predict a real cluster)
    cpu_oversubscription: str = "fair"
    # CPU workers on shared cores as `disagg serve` and deploy/local.py start them (engine.cpu_share): a worker
    # re-chooses its threads within a layer whenever another starts or ends a step, the cores split among those in
    # a step; false: each step keeps the threads it chose at its start (adaptive threads without a share)
    cpu_share: bool = True
    sample_s: float = 60.0  # timeline resolution, seconds
    drain_timeout_s: float = 600.0  # a draining replica is stopped after this even if it still has work
    drain_grace_s: float = 600.0  # after the last arrival, how long requests still in flight may take to finish
    keep_requests: bool = False  # keep every request's figures (exact percentiles; memory grows with requests)
    seed: int = 0  # randomness of routing samples

    def __post_init__(self) -> None:
        checks = [
            (self.slo_ttft_ms > 0 and self.slo_itl_ms > 0, "SLO thresholds must be positive"),
            (self.hop_ms >= 0 and self.admit_ms >= 0 and self.node_startup_s >= 0,
             "hop_ms, admit_ms and node_startup_s must be >= 0"),
            (self.startup_s is None or self.startup_s >= 0, "startup_s must be >= 0"),
            (self.route_sample >= 0, "route_sample must be >= 0"),
            (self.cpu_oversubscription in ("fair", "measured"), "cpu_oversubscription must be fair or measured"),
            (self.sample_s > 0 and self.drain_timeout_s > 0 and self.drain_grace_s >= 0,
             "sample_s and drain_timeout_s must be positive, drain_grace_s >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"simulation: {msg}")
