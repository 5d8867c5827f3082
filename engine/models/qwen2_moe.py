"""Qwen2-MoE (Qwen Team 2024): Qwen2's attention (biased q/k/v) with fine-grained experts plus a shared expert.

    y = h + sum_{e in topk(p)} p_e * SwiGLU_e(x) + sigmoid(g . x) * SwiGLU_shared(x),   x = RMSNorm(h)

60 routed experts, 4 per token, their softmax probabilities used as they are (norm_topk_prob false), and one
always-on shared expert of width shared_expert_intermediate_size behind a sigmoid gate.
"""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.llama import LlamaForCausalLM


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM built from a config with attention_bias and a moe with a shared expert."""


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    first_global = int(d.get("max_window_layers") or 0)
    return ModelConfig.from_hf(
        d,
        architecture="qwen2_moe",
        attention_bias=bool(d.get("qkv_bias", True)),
        hidden_act=hf_config.activation(d),
        moe=hf_config.moe(d),
        **hf_config.sliding_layers(d, lambda i: i % 2 == 0 and i < first_global),
    )
