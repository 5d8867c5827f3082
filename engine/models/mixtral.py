"""Mixtral (Jiang et al. 2024): Mistral with every feed-forward a sparse mixture of experts.

    y = h + sum_{e in top2(p)} (p_e / (p_top1 + p_top2)) * SwiGLU_e(RMSNorm(h)),   p = softmax(W_router h)

8 experts, 2 per token, the two chosen probabilities renormalised (the same as a softmax over the two chosen
logits). Attention is Mistral's (a sliding window on every layer when the config sets one). Checkpoints call the
MoE block `block_sparse_moe` and an expert's gate, up and down projections w1, w3 and w2.
"""

from __future__ import annotations

from typing import Any

from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    expert_names = ("w1", "w3", "w2")
    checkpoint_renames = ((".mlp.", ".block_sparse_moe."),)


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    return ModelConfig.from_hf(
        {**d, "layer_types": None},
        architecture="mixtral",
        hidden_act=hf_config.activation(d),
        moe=hf_config.moe(d, inter_key="intermediate_size", normalize=True),
        **hf_config.sliding_layers({**d, "layer_types": None}, lambda i: True),
    )
