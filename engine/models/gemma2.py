"""Gemma 2 (Gemma Team 2024): a Llama-like decoder with local and global layers and soft-capped logits.

    h = x + RMSNorm_post_attn(Attention(RMSNorm_in(x)))        sandwich norms around attention
    y = h + RMSNorm_post_ffw(GeGLU(RMSNorm_pre_ffw(h)))        and around the MLP: down(gelu_tanh(gate) * up)

where, unlike Llama:
- layers alternate between local (sliding window of 4096 keys, even layers) and global attention;
- attention scores are soft-capped, s -> 50 tanh(s / 50), and so are the final logits (cap 30);
- the attention scale is query_pre_attn_scalar^-1/2 instead of head_dim^-1/2;
- token embeddings are multiplied by sqrt(hidden_size), and the LM head is tied to them;
- every RMSNorm scales by (1 + w): its weights are stored as offsets from one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from engine.config import ModelConfig
from engine.models import hf_config
from engine.models.causal_lm import CausalLM, DecoderStack
from engine.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, ScaledEmbedding


class GemmaDecoderLayer(nn.Module):
    """Gemma 2 and 3's layer: sandwich-normed attention and GeGLU. `rope` may hold one rotation per layer type
    (Gemma 3's local and global bases); the layer takes its own."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, unit_offset_norm=True)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.layer_type = cfg.layer_types[layer]

    def forward(self, x: torch.Tensor, rope: Rotary | dict[str, Rotary], kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: AttentionBackend, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rope = rope[self.layer_type] if isinstance(rope, dict) else rope
        h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta, backend))[0]
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h))[0], residual


def gemma_stack(cfg: ModelConfig, rotary: nn.Module) -> DecoderStack:
    """Scaled embeddings, Gemma layers, a (1 + w) final norm."""
    return DecoderStack(ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.hidden_size**0.5),
                        [GemmaDecoderLayer(cfg, i) for i in range(cfg.num_layers)],
                        RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True), rotary)


class Gemma2ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        super().__init__(cfg, gemma_stack(cfg, rotary))


def gemma_fields(d: dict[str, Any]) -> dict[str, Any]:
    """What Gemma 2 and 3 configs share: GeGLU, the attention scale, the final-logit cap, tied embeddings."""
    return dict(
        hidden_act=hf_config.activation(d, "hidden_activation" if d.get("hidden_activation") else "hidden_act",
                                        "gelu_pytorch_tanh"),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
        final_logit_softcap=d.get("final_logit_softcapping"),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        o_proj_bias=bool(d.get("attention_bias", False)),
    )


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    return ModelConfig.from_hf(
        d,
        architecture="gemma2",
        attn_logit_softcap=d.get("attn_logit_softcapping"),
        **gemma_fields(d),
        **hf_config.sliding_layers(d, lambda i: i % 2 == 0),
    )
