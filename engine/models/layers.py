"""The pieces every decoder family here is built from: RMSNorm, rotary embeddings, attention, gated MLPs.

W_q/W_k/W_v and W_gate/W_up are stored stacked (one matrix multiply each instead of three and two); the
residual add is folded into the following RMSNorm. Both are the same arithmetic, in fewer kernels. A module
that stacks checkpoint tensors lists where each one goes in `checkpoint_slots` (engine/models/checkpoint.py
turns those lists into the checkpoint layout the loader checks and the runner copies by). Under tensor
parallelism (engine/models/parallel.py) each rank holds its own heads and MLP columns; the arithmetic per rank is
the same, with one all-reduce after attention and one after the MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from engine.config import ModelConfig, RopeScaling
from engine.models import ops
from engine.models.parallel import (
    ColumnParallelLinear,
    Part,
    RowParallelLinear,
    Slots,
    VocabParallelEmbedding,
    even_split,
    kv_head_range,
)
from engine.parallel.group import current

__all__ = ["Attention", "GatedMLP", "RMSNorm", "RotaryEmbedding", "ScaledEmbedding", "Slots"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (Zhang & Sennrich 2019), fused with the residual add.

    unit_offset: the weight is stored as an offset from 1 and the scale is (1 + weight), computed in float32
    (Gemma's convention)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); the second is the next residual stream."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotation frequency of each pair of dimensions; Llama-3.1 stretches the low frequencies, linear all."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    orig = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates query/key pairs (i, i + d/2) by position x frequency (Su et al. 2021, 'rotate half' form)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.args = (head_dim, max_positions, theta, scaling)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_cache(torch.get_default_device())

    def build_cache(self, device: torch.device) -> None:
        """(Re)compute the cos/sin tables, always in float32 (after meta-device construction too)."""
        head_dim, max_positions, theta, scaling = self.args
        if torch.device(device).type == "meta":
            return
        inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
        freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def at(self, positions: torch.Tensor) -> Rotary:
        """The rotation of one forward pass; the attention backend applies it (fused with its KV write)."""
        return Rotary(positions, self.cos, self.sin)


class Attention(nn.Module):
    """Grouped-query attention: num_heads queries share num_kv_heads keys/values.

    Per layer it may look only at the last `window` keys (sliding-window layers), cap its scores with
    cap * tanh(s / cap), and RMS-normalise every query and key head before the rotation (QK-norm). Under tensor
    parallelism a rank computes its query heads and the KV heads they share, and sums O's partial products."""

    def __init__(self, cfg: ModelConfig, layer: int, unit_offset_norm: bool = False) -> None:
        super().__init__()
        tp, d = current(), cfg.head_dim
        q0, q1 = even_split(cfg.num_heads, tp.rank, tp.size)
        k0, k1 = kv_head_range(cfg.num_kv_heads, tp.rank, tp.size)
        self.num_heads, self.num_kv_heads, self.head_dim = q1 - q0, k1 - k0, d  # this rank's
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        # W_q, W_k, W_v stacked into one matrix (this rank's heads of each): one GEMM instead of three
        q, kv = Part(cfg.num_heads * d, q0 * d, q1 * d), Part(cfg.num_kv_heads * d, k0 * d, k1 * d)
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, (q, kv, kv), bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_proj_bias, in_range=(q.start, q.stop))
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, unit_offset_norm) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, unit_offset_norm) if cfg.qk_norm else None
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.window, self.softcap = cfg.layer_windows[layer], cfg.attn_logit_softcap

    def checkpoint_slots(self) -> Slots:
        return self.qkv_proj.stacked_slots(("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def forward(self, x: torch.Tensor, rope: Rotary, kv_cache: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k, v = k.view(T, self.num_kv_heads, self.head_dim), v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = ops.qk_rms_norm(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.unit_offset)
        o = backend.forward(q, k, v, kv_cache, meta, self.scale, rope, window=self.window, softcap=self.softcap)
        return self.o_proj(o.reshape(T, self.q_size))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu (Shazeer 2020), GeGLU with tanh-approximated gelu.
    Under tensor parallelism a rank holds its share of the inner columns; `reduce` False leaves the partial sum
    of `down` to the caller (an MoE layer reduces its experts and shared expert together)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, reduce: bool = True) -> None:
        super().__init__()
        tp = current()
        inner = Part(intermediate_size, *even_split(intermediate_size, tp.rank, tp.size))
        # W_gate and W_up stacked (this rank's columns of each): one GEMM, then act(gate) * up in one pass
        self.gate_up_proj = ColumnParallelLinear(hidden_size, (inner, inner), bias=False)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, (inner.start, inner.stop), reduce)
        self.inter, self.act = inner.rows, act

    def checkpoint_slots(self) -> Slots:
        return self.gate_up_proj.stacked_slots(("gate_proj", "up_proj"), "gate_up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.act_and_mul(self.gate_up_proj(x), self.act))


class ScaledEmbedding(VocabParallelEmbedding):
    """Token embeddings multiplied by a constant (Gemma scales by sqrt(hidden_size), rounded to the weights' dtype)."""

    def __init__(self, num_embeddings: int, dim: int, scale: float) -> None:
        super().__init__(num_embeddings, dim)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The scale rounded to the weights' dtype on the host: a Python number keeps CUDA-graph capture copy-free.
        return super().forward(input_ids) * float(torch.tensor(self.scale).to(self.weight.dtype))
