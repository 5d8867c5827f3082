"""Worker settings: role, address, engine and KV-transfer options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ConfigError, EngineConfig, from_mapping

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class TransferConfig:
    """How KV blocks move from prefill to decode workers."""

    backend: str = "nixl"  # kvtransfer backend: nixl | tcp | cuda_ipc (same-host GPUs)
    host: str = "127.0.0.1"  # address the TCP backend's block server listens on
    timeout_s: float = 10.0  # a pull slower than this is abandoned and the prompt recomputed locally
    lease_s: float = 30.0  # a prefill worker keeps finished prompts' blocks this long for the pull
    fault: str | None = None  # test-only fault injection on the decode side's reads: fail | hang
    layer_groups: int = 4  # layer-wise streaming: a prompt's KV is pulled in this many groups of layers
    stream_timeout_s: float = 300.0  # layer-wise streaming: the longest a pull may take, the prefill itself included
    nixl_progress_thread: bool | None = None  # true: NIXL's own (spinning) progress thread; false: a Python thread
    # polls NIXL every 1 ms while a peer may be reading this worker's blocks, every 50 ms otherwise, leaving the
    # cores to the engine; null: true for a GPU KV cache, false for a CPU one
    drain_timeout_s: float = 60.0  # a worker told to stop (SIGTERM) finishes its requests and keeps its leases
    # this long at most; then what still runs is aborted and the router moves it to another worker

    def __post_init__(self) -> None:
        if self.backend not in ("nixl", "tcp", "cuda_ipc"):
            raise ConfigError(f"transfer.backend must be nixl, tcp or cuda_ipc, got {self.backend!r}")
        if self.timeout_s <= 0 or self.lease_s <= self.timeout_s:
            raise ConfigError("transfer needs 0 < timeout_s < lease_s (a pull must end before its lease does)")
        if not (isinstance(self.layer_groups, int) and self.layer_groups >= 1):
            raise ConfigError(f"transfer.layer_groups must be a positive int, got {self.layer_groups!r}")
        if self.stream_timeout_s <= self.timeout_s:
            raise ConfigError("transfer.stream_timeout_s must be > timeout_s (it covers the prefill as well)")
        if self.nixl_progress_thread not in (None, True, False):
            raise ConfigError(f"transfer.nixl_progress_thread must be true, false or null, got {self.nixl_progress_thread!r}")
        if isinstance(self.drain_timeout_s, bool) or not isinstance(self.drain_timeout_s, int | float) \
                or self.drain_timeout_s < 0:
            raise ConfigError(f"transfer.drain_timeout_s must be a number >= 0, got {self.drain_timeout_s!r}")
        if self.fault not in (None, "fail", "hang"):
            raise ConfigError(f"transfer.fault must be fail or hang, got {self.fault!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """One prefill or decode worker process."""

    role: str = "decode"  # prefill | decode (a decode worker also prefills locally when given no KV)
    host: str = "127.0.0.1"  # gRPC listen address
    port: int = 0  # gRPC port; 0 picks a free one
    worker_id: str = ""  # name in logs and metrics; defaults to role@port
    engine: EngineConfig = field(default_factory=EngineConfig)  # the inference engine
    transfer: TransferConfig = field(default_factory=TransferConfig)  # KV transfer

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"worker.role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"worker.port out of range: {self.port}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerConfig:
        d = dict(d)
        engine = EngineConfig.from_dict(d.pop("engine", {}))
        transfer = from_mapping(TransferConfig, d.pop("transfer", {}), "transfer")
        return from_mapping(cls, {**d, "engine": engine, "transfer": transfer}, "worker")
