"""Router settings: where it listens, what it serves, how it picks and watches workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.config import ConfigError, from_mapping
from router.policy import POLICIES


@dataclass(frozen=True)
class RouterConfig:
    """The OpenAI-compatible front end of the cluster."""

    host: str = "127.0.0.1"  # HTTP listen address
    port: int = 8000  # HTTP port
    model_name: str = "smollm2"  # the model id clients must send and /v1/models lists
    api_keys: tuple[str, ...] = ()  # accepted bearer keys; empty: no authentication
    prefill_policy: str = "least_loaded"  # how a prefill worker is picked: round_robin | least_loaded | kv_aware
    decode_policy: str = "least_loaded"  # how a decode worker is picked: round_robin | least_loaded | kv_aware
    # kv_aware picks the highest overlap_weight * (cached prefix blocks / prompt blocks) - load_weight * load;
    # load: prefill = queued prefill tokens / prompt tokens, decode = KV usage (router/policy.py, KVAware).
    prefill_overlap_weight: float = 1.0
    prefill_load_weight: float = 1.0
    decode_overlap_weight: float = 1.0
    decode_load_weight: float = 1.0
    kv_expect_ttl_s: float = 10.0  # a routed prompt's blocks count as cached on its worker this long before its
    # KV events confirm them (so prompts sharing a prefix within one poll interval meet); 0: events only
    health_interval_s: float = 1.0  # seconds between Health + Load polls of every worker
    rpc_timeout_s: float = 2.0  # deadline of control RPCs (Health, Load, Abort, ReleaseKV)
    worker_timeout_s: float = 60.0  # deadline of a Prefill or Decode call; a decode worker that sends nothing this
    # long while requests wait on it is lost (they move to another one)
    request_timeout_s: float = 3600.0  # deadline of a whole request
    conditional_disagg_min_prompt_tokens: int = 0  # shorter prompts skip the prefill pool (decode prefills locally)
    max_migrations: int = 3  # times a request may move to another decode worker when its own is lost; 0: never
    no_worker_wait_s: float = 10.0  # a request that finds no healthy decode worker (arriving, or to resume on after
    # its own was lost) waits this long for one (a worker restarting, a health check late under load), then 503
    kv_streaming: bool = False  # send Decode with Prefill: the decode worker pulls the KV layer group by layer group
    # while the prefill computes it, hiding the transfer (docs/architecture.md "Layer-wise streaming")
    max_model_len: int | None = None  # context length to enforce; None: the smallest the workers report
    processes: int = 1  # router processes serving the one port (SO_REUSEPORT); each polls and streams on its own
    max_n: int = 16  # most choices (n, best_of) one request may ask for per prompt; more is a 400

    def __post_init__(self) -> None:
        if isinstance(self.api_keys, list | str):
            keys = (self.api_keys,) if isinstance(self.api_keys, str) else tuple(self.api_keys)
            object.__setattr__(self, "api_keys", keys)
        checks = [
            (0 <= self.port < 65536, f"router.port out of range: {self.port}"),
            (bool(self.model_name), "router.model_name must not be empty"),
            (all(isinstance(k, str) and k for k in self.api_keys), "router.api_keys must be non-empty strings"),
            (self.prefill_policy in POLICIES, f"router.prefill_policy must be one of {', '.join(POLICIES)}"),
            (self.decode_policy in POLICIES, f"router.decode_policy must be one of {', '.join(POLICIES)}"),
            (all(x >= 0 for x in (self.prefill_overlap_weight, self.prefill_load_weight, self.decode_overlap_weight,
                                  self.decode_load_weight)), "router.*_overlap_weight / *_load_weight must be >= 0"),
            (self.kv_expect_ttl_s >= 0, "router.kv_expect_ttl_s must be >= 0"),
            (self.health_interval_s > 0, "router.health_interval_s must be positive"),
            (self.rpc_timeout_s > 0, "router.rpc_timeout_s must be positive"),
            (self.worker_timeout_s > 0, "router.worker_timeout_s must be positive"),
            (self.request_timeout_s >= self.worker_timeout_s, "router.request_timeout_s must be >= worker_timeout_s"),
            (self.conditional_disagg_min_prompt_tokens >= 0, "router.conditional_disagg_min_prompt_tokens must be >= 0"),
            (isinstance(self.max_migrations, int) and self.max_migrations >= 0, "router.max_migrations must be >= 0"),
            (self.no_worker_wait_s >= 0, "router.no_worker_wait_s must be >= 0"),
            (isinstance(self.kv_streaming, bool), "router.kv_streaming must be true or false"),
            (self.max_model_len is None or self.max_model_len > 1, "router.max_model_len must be > 1"),
            (isinstance(self.processes, int) and 1 <= self.processes <= 256, "router.processes must be in [1, 256]"),
            (isinstance(self.max_n, int) and self.max_n >= 1, "router.max_n must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        """Build from a parsed YAML/JSON mapping (the cluster YAML's `router:` section); unknown keys are errors."""
        return from_mapping(cls, d, "router")
