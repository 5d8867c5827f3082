"""The Llama decoder (Touvron et al. 2023), as Llama 2/3/3.1, Mistral, Qwen2 and SmolLM use it.

    h = x + Attention(RMSNorm(x))          grouped-query attention with rotary positions
    y = h + SwiGLU(RMSNorm(h))             down(silu(gate(h)) * up(h))

Mistral (Jiang et al. 2023) is this with every layer attending to a sliding window of the last W keys;
Qwen2 adds a bias to q/k/v and may slide its upper layers. The mixture-of-experts families keep this layer
and give it a sparse MoE instead of the SwiGLU (engine/models/moe.py), Qwen3 adds QK-norm (engine/models/qwen3.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.causal_lm import CausalLM, DecoderStack
from engine.models.layers import Attention, RMSNorm, RotaryEmbedding
from engine.models.moe import HF_EXPERT_NAMES, feed_forward
from engine.models.parallel import VocabParallelEmbedding


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then pre-norm feed-forward (dense SwiGLU or sparse MoE), each around a residual."""

    def __init__(self, cfg: ModelConfig, layer: int, expert_names: tuple[str, str, str] = HF_EXPERT_NAMES) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = feed_forward(cfg, layer, expert_names)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rotary, kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(CausalLM):
    expert_names = HF_EXPERT_NAMES

    def __init__(self, cfg: ModelConfig) -> None:
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        layers = [LlamaDecoderLayer(cfg, i, self.expert_names) for i in range(cfg.num_layers)]
        super().__init__(cfg, DecoderStack(VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size), layers,
                                           RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), rotary))


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    """LlamaForCausalLM, MistralForCausalLM (every layer slides when sliding_window is set) and Qwen2ForCausalLM
    (q/k/v always biased; layers from max_window_layers up slide when use_sliding_window)."""
    qwen2 = arch == "Qwen2ForCausalLM"
    first_sliding = int(d.get("max_window_layers") or 0) if qwen2 else 0
    if not qwen2 and d.get("layer_types"):  # Mistral-family mask rule: the window applies to every layer
        d = {**d, "layer_types": None}
    return ModelConfig.from_hf(
        d,
        architecture="llama",
        hidden_act=hf_config.activation(d),
        attention_bias=qwen2 or bool(d.get("attention_bias", False)),
        o_proj_bias=not qwen2 and bool(d.get("attention_bias", False)),
        **hf_config.sliding_layers(d, lambda i: i >= first_sliding),
    )
