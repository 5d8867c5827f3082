"""Triton paged attention: KV write, flash-decoding for decode-only batches, tiled causal prefill otherwise.

Importable wherever triton is installed; it needs no GPU at import (tests run it under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, Rotary, register_backend
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import rotary_write_kv, write_kv
from engine.kernels.prefill_attention import paged_prefill_attention


@register_backend("triton")
class TritonAttention(AttentionBackend):
    """Same contract as TorchAttention; kv_cache is one layer's strided view of the block-major cache.

    decode_num_splits fixes the flash-decoding split count (CUDA-graph capture wants a fixed grid; any count is
    correct for any sequence length); None picks it per batch from meta.max_seq_len without a device sync.
    """

    def __init__(self, decode_num_splits: int | None = None) -> None:
        self.decode_num_splits = decode_num_splits

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
        if rope is None:
            write_kv(k, v, kv_cache, meta.slot_mapping)
        else:
            rotary_write_kv(rope.positions, q, k, v, rope.cos, rope.sin, kv_cache, meta.slot_mapping)
        if meta.decode_only and q.shape[0] == meta.seq_lens.shape[0]:
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                          self.decode_num_splits, window=window, softcap=softcap,
                                          max_seq_len=meta.max_seq_len)
        return paged_prefill_attention(q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                       meta.max_query_len, scale, window=window, softcap=softcap)
