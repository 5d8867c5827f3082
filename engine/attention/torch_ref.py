"""Pure-torch paged attention: the reference every other backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary, register_backend
from engine.models import ops


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values at their slots. kv_cache: [num_blocks, 2, block_size, kv_heads, head_dim]."""
    bs = kv_cache.shape[2]
    blocks, offsets = slot_mapping // bs, slot_mapping % bs
    kv_cache[blocks, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `seq_len` keys and values: each [seq_len, kv_heads, head_dim]."""
    idx = block_table[: -(-seq_len // kv_cache.shape[2])]
    k = kv_cache[:, 0].index_select(0, idx).flatten(0, 1)[:seq_len]
    v = kv_cache[:, 1].index_select(0, idx).flatten(0, 1)[:seq_len]
    return k, v


def paged_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context (KV already written)."""
    if meta.decode_only:
        return _decode_batched(q, kv_cache, meta, scale)
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for b in range(meta.num_seqs):
        q_b = q[qsl[b] : qsl[b + 1]]
        k_b, v_b = gather_kv(kv_cache, meta.block_tables[b], lens[b])
        out[qsl[b] : qsl[b + 1]] = _attend(q_b, k_b, v_b, scale)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, H, D] are the last n positions of a sequence whose keys are k: [L, KVH, D]."""
    n, L = q.shape[0], k.shape[0]
    # query i sits at absolute position L - n + i and may see keys 0..L-n+i
    mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(diagonal=L - n)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return o.transpose(0, 1)


def _decode_batched(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence: gather padded contexts and attend in one batched call."""
    B, max_len, bs = meta.num_seqs, meta.max_seq_len, kv_cache.shape[2]
    nblk = -(-max_len // bs)
    idx = meta.block_tables[:, :nblk].flatten()
    # index_select on the strided K (or V) view gathers straight into a contiguous tensor (faster than [idx]).
    k = kv_cache[:, 0].index_select(0, idx).view(B, nblk * bs, *kv_cache.shape[-2:])[:, :max_len]
    v = kv_cache[:, 1].index_select(0, idx).view(B, nblk * bs, *kv_cache.shape[-2:])[:, :max_len]
    pos = torch.arange(max_len, device=q.device)
    mask = (pos[None, :] < meta.seq_lens[:, None].to(q.device))[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return o[:, :, 0, :]


@register_backend("torch")
class TorchAttention(AttentionBackend):
    """Reference backend: correct everywhere, fast nowhere in particular."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rope: Rotary | None = None,
    ) -> torch.Tensor:
        if rope is not None:
            q, k = ops.rotary(rope.positions, q, k, rope.cos, rope.sin)
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale)
