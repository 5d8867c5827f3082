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


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, start: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values at positions start .. seq_len - 1: each [seq_len - start, kv_heads, head_dim].
    Only blocks holding those positions are read."""
    bs = kv_cache.shape[2]
    first = start // bs
    idx = block_table[first : -(-seq_len // bs)]
    k = kv_cache[:, 0].index_select(0, idx).flatten(0, 1)[start - first * bs : seq_len - first * bs]
    v = kv_cache[:, 1].index_select(0, idx).flatten(0, 1)[start - first * bs : seq_len - first * bs]
    return k, v


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached context (KV already written), over the
    last `window` keys of each query when given, with soft-capped scores when `softcap` is given."""
    if meta.decode_only and window is None:
        return _decode_batched(q, kv_cache, meta, scale, softcap)
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for b in range(meta.num_seqs):
        n, L = qsl[b + 1] - qsl[b], lens[b]
        start = 0 if window is None else max(0, L - n - window + 1)  # the earliest key any of these queries sees
        k_b, v_b = gather_kv(kv_cache, meta.block_tables[b], L, start)
        out[qsl[b] : qsl[b + 1]] = _attend(q[qsl[b] : qsl[b + 1]], k_b, v_b, scale, start, window, softcap)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int, window: int | None,
            softcap: float | None) -> torch.Tensor:
    """q: [n, H, D] are the last n positions of a sequence whose keys from position `start` on are k: [L', KVH, D]."""
    n, L = q.shape[0], start + k.shape[0]
    qpos = torch.arange(L - n, L, device=q.device)[:, None]
    kpos = torch.arange(start, L, device=q.device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    k, v = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)
    if softcap is None:
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)
    return _softcapped(q.transpose(0, 1), k, v, mask, scale, softcap).transpose(0, 1)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, cap: float
                ) -> torch.Tensor:
    """Attention with scores cap * tanh(scale q.k / cap), as transformers' eager Gemma 2 computes it.
    q: [..., H, n, D]; k, v: [..., KVH, L, D]; mask broadcasts to [..., H, n, L]."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    s = ops.softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _decode_batched(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    softcap: float | None) -> torch.Tensor:
    """One query per sequence: gather padded contexts and attend in one batched call."""
    B, max_len, bs = meta.num_seqs, meta.max_seq_len, kv_cache.shape[2]
    nblk = -(-max_len // bs)
    idx = meta.block_tables[:, :nblk].flatten()
    # index_select on the strided K (or V) view gathers straight into a contiguous tensor (faster than [idx]).
    k = kv_cache[:, 0].index_select(0, idx).view(B, nblk * bs, *kv_cache.shape[-2:])[:, :max_len]
    v = kv_cache[:, 1].index_select(0, idx).view(B, nblk * bs, *kv_cache.shape[-2:])[:, :max_len]
    pos = torch.arange(max_len, device=q.device)
    mask = (pos[None, :] < meta.seq_lens[:, None].to(q.device))[:, None, None, :]  # [B, 1, 1, L]
    k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
    if softcap is not None:
        return _softcapped(q[:, :, None, :], k, v, mask, scale, softcap)[:, :, 0, :]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
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
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        if rope is not None:
            q, k = ops.rotary(rope.positions, q, k, rope.cos, rope.sin)
        write_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale, window, softcap)
