"""The cluster YAML schema shared by the local launcher and the Ray launcher.

    model: smollm2                 # or an HF folder / .gguf file
    engine: {dtype: float32, cache: {...}, scheduler: {...}}
    transfer: {backend: nixl, timeout_s: 10, lease_s: 30}
    router: {port: 8000, prefill_policy: least_loaded, ...}
    pools:
      prefill: {replicas: 1}       # 0 = co-located: decode workers prefill locally
      decode: {replicas: 1, tensor_parallel_size: 2, resources: {num_gpus: 1}}
      # tensor_parallel_size: ranks per worker of the pool (default: engine.tensor_parallel_size, else 1); on Ray a
      # replica reserves `resources` per rank (num_cpus, num_gpus), custom resources once (docs/parallel.md)
    autoscaling: {...}             # optional, per pool (deploy/autoscale.py); Ray only
    ray: {namespace: disagg, ...}  # optional (deploy/placement.py); Ray only
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from deploy.autoscale import AutoscalingConfig
from deploy.placement import RayConfig, Resources
from engine.config import ConfigError, EngineConfig, from_mapping
from router.config import RouterConfig
from worker.config import TransferConfig, WorkerConfig


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical workers."""

    replicas: int = 1  # workers started in this pool
    base_port: int = 0  # first worker's gRPC port, the rest count up; 0 = any free ports
    resources: Resources = field(default_factory=Resources)  # what each rank of a replica reserves on a Ray node
    tensor_parallel_size: int | None = None  # ranks per worker (one process and device each); None: the engine's

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ConfigError(f"pool replicas must be >= 0, got {self.replicas}")
        tp = self.tensor_parallel_size
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
            raise ConfigError(f"pool tensor_parallel_size must be a positive int, got {tp!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """Router + prefill pool + decode pool."""

    model: str = "smollm2"  # model for every worker and the router's tokenizer
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields other than model
    transfer: TransferConfig = field(default_factory=TransferConfig)  # KV transfer between the pools
    router: dict[str, Any] = field(default_factory=dict)  # RouterConfig fields
    prefill: PoolConfig = field(default_factory=PoolConfig)  # the prefill pool
    decode: PoolConfig = field(default_factory=PoolConfig)  # the decode pool
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)  # per-pool policies (Ray only)
    ray: RayConfig = field(default_factory=RayConfig)  # namespace, router placement, timeouts (Ray only)

    def __post_init__(self) -> None:
        if self.decode.replicas < 1:
            raise ConfigError("pools.decode.replicas must be at least 1")
        self._check_autoscaling()
        for role in ("prefill", "decode"):
            self.engine_config(role=role)  # validate now, not when a worker or the router starts
        self.router_config()

    def _check_autoscaling(self) -> None:
        if self.colocated and self.autoscaling.prefill is not None:
            raise ConfigError("autoscaling.prefill needs a prefill pool (pools.prefill.replicas >= 1); "
                              "a co-located cluster (replicas: 0) cannot scale it")
        for name in ("prefill", "decode"):
            policy, replicas = self.autoscaling.pool(name), self.pool(name).replicas
            if policy is not None and not policy.min_replicas <= replicas <= policy.max_replicas:
                raise ConfigError(f"pools.{name}.replicas ({replicas}) is where the pool starts, so it must lie within "
                                  f"autoscaling.{name}: [{policy.min_replicas}, {policy.max_replicas}]")

    def pool(self, name: str) -> PoolConfig:
        if name not in ("prefill", "decode"):
            raise KeyError(f"no pool {name!r} (pools are prefill and decode)")
        return getattr(self, name)

    def engine_config(self, model: str | None = None, role: str | None = None,
                      tensor_parallel_size: int | None = None) -> EngineConfig:
        """The engine of a worker of `role`'s pool (None: the engine section alone); `tensor_parallel_size`
        overrides the pool's and the engine section's. A prefill worker runs prompt steps only (each request
        leaves it at its first token), so unless the engine section says otherwise it captures no decode CUDA
        graphs (`enforce_eager`): they would cost its start-up and GPU memory and never be replayed."""
        d = {**self.engine, "model": model or self.model}
        if role == "prefill":
            d.setdefault("enforce_eager", True)
        tp = tensor_parallel_size or (self.pool(role).tensor_parallel_size if role is not None else None)
        if tp is not None:
            d["tensor_parallel_size"] = tp
        return EngineConfig.from_dict(d)

    def tensor_parallel_size(self, role: str) -> int:
        """Ranks per worker of `role`'s pool."""
        return self.engine_config(role=role).tensor_parallel_size

    def worker_config(self, role: str, host: str = "127.0.0.1", port: int = 0, worker_id: str = "",
                      model: str | None = None, transfer_backend: str | None = None,
                      tensor_parallel_size: int | None = None) -> WorkerConfig:
        transfer = self.transfer if not transfer_backend else dataclasses.replace(self.transfer, backend=transfer_backend)
        return WorkerConfig(role=role, host=host, port=port, worker_id=worker_id, transfer=transfer,
                            engine=self.engine_config(model, role, tensor_parallel_size))

    def router_settings(self) -> dict[str, Any]:
        """The router section, its model id defaulting to the cluster's model."""
        return {"model_name": self.model, **self.router}

    def router_config(self) -> RouterConfig:
        return RouterConfig.from_dict(self.router_settings())

    @property
    def colocated(self) -> bool:
        return self.prefill.replicas == 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterConfig:
        d = dict(d or {})
        pools = d.pop("pools", {}) or {}
        unknown = set(pools) - {"prefill", "decode"}
        if unknown:
            raise ConfigError(f"unknown pool(s): {', '.join(sorted(unknown))} (pools are prefill and decode)")
        d["transfer"] = from_mapping(TransferConfig, d.get("transfer", {}) or {}, "transfer")
        for name in ("prefill", "decode"):
            pool = dict(pools.get(name, {}) or {})
            if "resources" in pool:
                pool["resources"] = Resources.from_dict(pool["resources"], f"pools.{name}.resources")
            d[name] = from_mapping(PoolConfig, pool, f"pools.{name}")
        d["autoscaling"] = AutoscalingConfig.from_dict(d.get("autoscaling"))
        d["ray"] = RayConfig.from_dict(d.get("ray"))
        return from_mapping(cls, d, "cluster")

    @classmethod
    def load(cls, path: str) -> ClusterConfig:
        import yaml

        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        try:
            return cls.from_dict(data or {})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
