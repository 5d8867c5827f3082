"""The Llama decoder (Touvron et al. 2023), as Llama 2/3/3.1, Mistral, Qwen2 and SmolLM use it.

    h = x + Attention(RMSNorm(x))          grouped-query attention with rotary positions
    y = h + SwiGLU(RMSNorm(h))             down(silu(gate(h)) * up(h))

W_q/W_k/W_v and W_gate/W_up are stored stacked (one matrix multiply each instead of three and two); the
residual add is folded into the following RMSNorm. Both are the same arithmetic, in fewer kernels.

The forward pass takes a flat batch of new tokens from many sequences (no
padding) with their positions, and attention metadata that says where each
sequence's tokens and cached keys/values are. Parameter names match Hugging
Face's `LlamaForCausalLM`, so its state dict loads as is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary
from engine.config import ModelConfig, RopeScaling
from engine.models import ops


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (Zhang & Sennrich 2019), fused with the residual add."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); the second is the next residual stream."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotation frequency of each pair of dimensions; Llama-3.1 stretches the low frequencies."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
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
    """Grouped-query attention: num_heads queries share num_kv_heads keys/values."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # W_q, W_k, W_v stacked into one matrix: one GEMM instead of three
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k, v = k.view(T, self.num_kv_heads, self.head_dim), v.view(T, self.num_kv_heads, self.head_dim)
        o = backend.forward(q, k, v, kv_cache, meta, self.scale, rope)
        return ops.linear(o.reshape(T, self.num_heads * self.head_dim), self.o_proj.weight)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # W_gate and W_up stacked: one GEMM, then silu(gate) * up in one pass
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus the LM head (tied to the embedding when the config says so)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden]
        assert input_ids.dim() == 1 and input_ids.shape == positions.shape
        x, residual, rope = self.model.embed_tokens(input_ids), None, self.model.rotary_emb.at(positions)
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, rope, kv_cache[:, i], meta, backend, residual)
        return self.model.norm(x, residual)[0]

    # Hugging Face checkpoints keep W_q/W_k/W_v and W_gate/W_up separate: (fused param, part, parts' row sizes)
    def stacked_target(self, name: str) -> tuple[str, int, int] | None:
        """For a checkpoint tensor name, where its rows go in a stacked parameter: (param name, row start, rows)."""
        cfg = self.config
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        parts = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
                 "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter)}
        for part, (fused, start, rows) in parts.items():
            if f".{part}." in name:
                return name.replace(part, fused), start, rows
        return None

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [T, vocab]; written into `out` when given (a buffer shared by all CUDA graphs)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = ops.linear(hidden, weight)
        return logits.float() if out is None else out.copy_(logits)
