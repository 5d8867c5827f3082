"""Where things run on a Ray cluster: what each replica reserves, and the `ray:` section of the cluster YAML.

    pools:
      prefill: {replicas: 2, resources: {num_gpus: 1, custom: {prefill_node: 1}}}
      decode:  {replicas: 2, resources: {num_gpus: 1}}
    ray:
      namespace: disagg
      router_resources: {num_cpus: 1, custom: {head_node: 0.01}}

`disagg serve` (local processes) ignores both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ConfigError, from_mapping


@dataclass(frozen=True)
class Resources:
    """What one replica reserves on a Ray node; Ray places it on a node that has them (or its autoscaler adds one)."""

    num_cpus: float = 1.0  # CPU cores reserved (Ray also sets OMP_NUM_THREADS from it)
    num_gpus: float = 0.0  # GPUs reserved; Ray sets CUDA_VISIBLE_DEVICES for the worker
    custom: dict[str, float] = field(default_factory=dict)  # custom node resources, e.g. {prefill_node: 1}

    def __post_init__(self) -> None:
        if not (_number(self.num_cpus) and self.num_cpus >= 0):
            raise ConfigError(f"num_cpus must be a number >= 0, got {self.num_cpus!r}")
        if not (_number(self.num_gpus) and self.num_gpus >= 0):
            raise ConfigError(f"num_gpus must be a number >= 0, got {self.num_gpus!r}")
        if not isinstance(self.custom, dict):
            raise ConfigError(f"custom must be a mapping of resource name to amount, got {type(self.custom).__name__}")
        for name, amount in self.custom.items():
            if not isinstance(name, str) or name in ("CPU", "GPU") or not (_number(amount) and amount > 0):
                raise ConfigError(f"custom resource {name!r}: need a name other than CPU/GPU and an amount > 0")

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for `ActorClass.options(...)`."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.custom)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Resources:
        try:
            return from_mapping(cls, d if d is not None else {}, where)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


@dataclass(frozen=True)
class RayConfig:
    """Settings only `disagg deploy` reads."""

    namespace: str = "disagg"  # Ray namespace of the deployment's named actors (`--namespace` overrides it)
    router_resources: Resources = field(default_factory=lambda: Resources(num_cpus=1.0))  # the router actor's
    startup_timeout_s: float = 900.0  # a replica not serving by then is replaced (covers waiting for a new node)
    drain_timeout_s: float = 600.0  # a draining replica is stopped after this even with requests still running

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError("ray.namespace must be a non-empty string")
        if not (_number(self.startup_timeout_s) and self.startup_timeout_s > 0):
            raise ConfigError("ray.startup_timeout_s must be positive")
        if not (_number(self.drain_timeout_s) and self.drain_timeout_s > 0):
            raise ConfigError("ray.drain_timeout_s must be positive")

    @classmethod
    def from_dict(cls, d: Any) -> RayConfig:
        d = dict(d or {}) if isinstance(d, dict) or d is None else d
        if isinstance(d, dict) and "router_resources" in d:
            d["router_resources"] = Resources.from_dict(d["router_resources"], "ray.router_resources")
        return from_mapping(cls, d, "ray")


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
