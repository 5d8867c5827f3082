"""Gemma 3 (Gemma Team 2025): Gemma 2's layer with QK-norm, five local layers per global one, two RoPE bases.

Changes from Gemma 2 (engine/models/gemma2.py):
- every query and key head is RMS-normalised ((1 + w) form) before the rotation, and the attention scores are
  no longer soft-capped (nor, by default, the final logits);
- local (sliding-window, 512 or 1024 keys) and global layers come 5:1 (layer i is global when (i + 1) % 6 == 0);
- local layers rotate with base 10k, global ones with base 1M, stretched by linear RoPE scaling (factor 8 in the
  4B/12B/27B models) for the 128k context.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.attention.base import Rotary
from engine.config import ConfigError, ModelConfig, hf_rope_scaling
from engine.models import hf_config
from engine.models.causal_lm import CausalLM
from engine.models.gemma2 import gemma_fields, gemma_stack
from engine.models.layers import RotaryEmbedding


class LocalGlobalRotary(nn.Module):
    """One rotation table per layer type: sliding layers use the local base, full ones the global base and scaling."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n, local = cfg.max_position_embeddings, cfg.rope_local_theta or cfg.rope_theta
        self.local = RotaryEmbedding(cfg.head_dim, n, local, None)
        self.globl = RotaryEmbedding(cfg.head_dim, n, cfg.rope_theta, cfg.rope_scaling)

    def at(self, positions: torch.Tensor) -> dict[str, Rotary]:
        return {"sliding_attention": self.local.at(positions), "full_attention": self.globl.at(positions)}


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, gemma_stack(cfg, LocalGlobalRotary(cfg)))


def _rope(d: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keys rope_parameters by layer type; older configs say rope_theta, rope_local_base_freq and
    rope_scaling (of the global layers)."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if hf_rope_scaling(local) is not None:
            raise ConfigError("Gemma 3 local layers with scaled RoPE are not supported")
        return dict(rope_theta=float(full.get("rope_theta", 1e6)), rope_scaling=hf_rope_scaling(full),
                    rope_local_theta=float(local.get("rope_theta", 1e4)))
    return dict(rope_theta=float(d.get("rope_theta") or 1e6), rope_scaling=hf_rope_scaling(d.get("rope_scaling")),
                rope_local_theta=float(d.get("rope_local_base_freq") or 1e4))


def from_hf(d: dict[str, Any], arch: str) -> ModelConfig:
    pattern = int(d.get("sliding_window_pattern") or 6)
    if d.get("use_bidirectional_attention"):
        raise ConfigError("bidirectional Gemma 3 (an encoder) is not a causal LM")
    return ModelConfig.from_hf(
        {**d, "rope_parameters": None, "rope_scaling": None},
        architecture="gemma3",
        qk_norm=True,
        **gemma_fields(d),
        **_rope(d),
        **hf_config.sliding_layers(d, lambda i: (i + 1) % pattern != 0),
    )
