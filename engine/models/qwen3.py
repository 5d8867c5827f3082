"""Qwen3 (Qwen Team 2025): the Llama decoder with QK-norm.

    q, k = RMSNorm_q(q_head), RMSNorm_k(k_head)     per head, over head_dim, before the rotation

head_dim is explicit in the config (128 for every size, so num_heads * head_dim need not equal hidden_size),
q/k/v carry no bias, and sliding windows are off unless `use_sliding_window` (then layers from
max_window_layers up slide).
"""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM built from a config with qk_norm set: Attention adds q_norm/k_norm."""


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    first_sliding = int(d.get("max_window_layers") or 0)
    return ModelConfig.from_hf(
        d,
        architecture="qwen3",
        qk_norm=True,
        hidden_act=hf_config.activation(d),
        o_proj_bias=bool(d.get("attention_bias", False)),
        **hf_config.sliding_layers(d, lambda i: i >= first_sliding),
    )
