"""Reading the Hugging Face `config.json` fields that several families share (sliding layers, MoE, activation).

Every function raises ConfigError with the key at fault; the loader adds the file name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.config import ConfigError, MoEConfig

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def activation(d: dict[str, Any], key: str = "hidden_act", default: str = "silu") -> str:
    """The MLP gate's activation as ModelConfig names it; bias-carrying MLPs are not supported."""
    name = d.get(key) or default
    if name not in HF_ACTIVATIONS or d.get("mlp_bias", False):
        raise ConfigError(f"unsupported MLP ({key} {name!r}, mlp_bias {d.get('mlp_bias', False)})")
    return HF_ACTIVATIONS[name]


def sliding_layers(d: dict[str, Any], rule: Callable[[int], bool]) -> dict[str, Any]:
    """sliding_window and layer_types. Configs written by transformers 5 list `layer_types`; older ones leave
    it to the family's rule (layer index -> slides?). A null, zero or switched-off window means no sliding."""
    n = int(d["num_hidden_layers"])
    window = d.get("sliding_window")
    if not window or not d.get("use_sliding_window", True):
        return {"sliding_window": None, "layer_types": ("full_attention",) * n}
    types = d.get("layer_types") or ["sliding_attention" if rule(i) else "full_attention" for i in range(n)]
    return {"sliding_window": int(window), "layer_types": tuple(types)}


def moe(d: dict[str, Any], inter_key: str = "moe_intermediate_size", normalize: bool | None = None) -> MoEConfig:
    """The MoE fields: experts (num_experts or num_local_experts), top-k, expert width, the layers that stay
    dense (Qwen's mlp_only_layers and decoder_sparse_step) and the shared expert's width."""
    n, step = int(d["num_hidden_layers"]), int(d.get("decoder_sparse_step") or 1)
    only = set(d.get("mlp_only_layers") or ())
    return MoEConfig(
        num_experts=int(d.get("num_experts") or d["num_local_experts"]),
        num_experts_per_tok=int(d["num_experts_per_tok"]),
        intermediate_size=int(d[inter_key]),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)) if normalize is None else normalize,
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
        dense_layers=tuple(i for i in range(n) if i in only or (i + 1) % step != 0),
    )
