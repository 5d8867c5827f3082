"""Qwen3-MoE (Qwen Team 2025): Qwen3's attention (QK-norm) with a sparse mixture of experts in every layer.

    y = h + sum_{e in topk(p)} w_e * SwiGLU_e(RMSNorm(h)),   p = softmax(W_router h)

128 experts of width moe_intermediate_size, 8 per token, the chosen probabilities renormalised when
norm_topk_prob (as in every released model); no shared expert. Layers in mlp_only_layers (and, with
decoder_sparse_step > 1, the layers between sparse ones) keep a dense SwiGLU of intermediate_size.
"""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM built from a config with qk_norm and moe set."""


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    return ModelConfig.from_hf(
        {**d, "layer_types": None},
        architecture="qwen3_moe",
        qk_norm=True,
        hidden_act=hf_config.activation(d),
        o_proj_bias=bool(d.get("attention_bias", False)),
        moe=hf_config.moe(d),
        **hf_config.sliding_layers({**d, "layer_types": None}, lambda i: True),
    )
