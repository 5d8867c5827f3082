"""A step's sequences flattened into one token batch: input ids, positions and the attention metadata.

Every model that shares the KV cache manager's block tables (the target, a draft model with its own cache of
the same block count) builds its batch here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.base import AttentionMetadata
from engine.kv_cache_manager import KVCacheManager

# Triton compiles a kernel anew for each specialisation of its arguments: a pointer that is or is not 16-byte
# aligned, an int that is 1, a multiple of 16 or neither. A batch's inputs are laid out so that none of these
# depend on the batch: every part starts 16-byte aligned and the block tables' row stride (their width) is a
# multiple of 16. Otherwise each new (batch size, prompt length) class compiled its own variants in the middle of
# a request, 1.1-1.7 s each on an H100 or H200 (benchmarks/RESULTS.md, "A fresh cluster's first requests").
TABLE_COLS = 16  # block-table width rounded up to a multiple of this (zeros past a row's length, never read)
_INT64_ALIGN, _INT32_ALIGN = 2, 4  # elements per 16 bytes


@dataclass
class BatchSeq:
    """One sequence's share of a forward pass: `token_ids` at positions `start`, `start + 1`, ..."""

    request_id: str  # whose block table gives the KV slots
    start: int  # position of token_ids[0]
    token_ids: list[int]
    num_logits: int  # logits are wanted at this many last positions


def build_batch(
    seqs: list[BatchSeq], kv: KVCacheManager, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """Flatten sequences into (input_ids, positions, attention metadata, rows whose logits are wanted).

    Block tables and slots come from `kv`, so any model whose KV cache has the same block size and block
    count (a draft model's own cache) can run on the same metadata. Everything is computed with numpy over
    the manager's block-table array and reaches the device in one copy: per-sequence Python work is only
    reading each sequence's fields.
    """
    n, bs = len(seqs), kv.block_size
    lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
    starts = np.fromiter((s.start for s in seqs), np.int64, n)
    num_logits = np.fromiter((s.num_logits for s in seqs), np.int64, n)
    qsl = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=qsl[1:])
    total = int(qsl[-1])
    seq_of = np.repeat(np.arange(n), lens)
    pos = np.arange(total) - qsl[:-1][seq_of] + starts[seq_of]
    tables = pad_columns(kv.table_array.gather([s.request_id for s in seqs]), TABLE_COLS)
    slots = tables[seq_of, pos // bs].astype(np.int64) * bs + pos % bs
    ends = qsl[1:]
    first_logit = np.repeat(ends - num_logits, num_logits)
    logits_idx = first_logit + np.arange(len(first_logit)) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
    ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int64, total)
    seq_lens = starts + lens
    # One host buffer, one copy: [ids | positions | slots | logits rows] as int64, then [qsl | seq_lens | tables]
    # (converted to int32 on the device), each part padded to 16 bytes.
    parts = [ids, pos, slots, logits_idx, qsl, seq_lens, tables.reshape(-1)]
    sizes = [len(p) for p in parts]
    room = [-(-k // a) * a for k, a in zip(sizes, [_INT64_ALIGN] * 4 + [_INT32_ALIGN] * 3, strict=True)]
    host = torch.empty(sum(room), dtype=torch.int64, pin_memory=device.type == "cuda")  # gaps never read
    flat, at = host.numpy(), 0
    for part, k in zip(parts, room, strict=True):
        flat[at : at + len(part)] = part
        at += k
    dev = host.to(device, non_blocking=True)
    head = sum(room[:4])
    d_ids, d_pos, d_slots, d_logits = _unpad(dev[:head], room[:4], sizes[:4])
    d_qsl, d_lens, d_tables = _unpad(dev[head:].to(torch.int32), room[4:], sizes[4:])
    meta = AttentionMetadata(
        query_start_loc=d_qsl, seq_lens=d_lens, block_tables=d_tables.view(n, tables.shape[1]), slot_mapping=d_slots,
        max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist(),
    )
    return d_ids, d_pos, meta, d_logits


def pad_columns(tables: np.ndarray, multiple: int) -> np.ndarray:
    """`tables` widened with zero columns to a multiple of `multiple` (the array itself when it is one)."""
    n, width = tables.shape
    wide = -(-width // multiple) * multiple
    if wide == width:
        return tables
    out = np.zeros((n, wide), dtype=tables.dtype)
    out[:, :width] = tables
    return out


def _unpad(buf: torch.Tensor, room: list[int], sizes: list[int]) -> list[torch.Tensor]:
    return [t[:k] for t, k in zip(torch.split(buf, room), sizes, strict=True)]
