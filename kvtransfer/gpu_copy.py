"""Gather-scatter of whole KV blocks between two GPU pools in one launch (any order of block ids)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_blocks_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, block_words, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    s = tl.load(src_ids_ptr + i).to(tl.int64)
    d = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    m = offs < block_words
    tl.store(dst_ptr + d * block_words + offs, tl.load(src_ptr + s * block_words + offs, mask=m), mask=m)


def block_words(pool: torch.Tensor) -> torch.Tensor:
    """A contiguous pool as a [num_blocks, words] view: 8-byte words where a block's size allows, else bytes.
    Two pools of one layout get views of the same dtype and width, as launch_copy_blocks() needs."""
    block_bytes = math.prod(pool.shape[1:]) * pool.element_size()
    word = torch.int64 if block_bytes % 8 == 0 else torch.uint8
    return pool.view(pool.shape[0], -1).view(word)


def launch_copy_blocks(src_words: torch.Tensor, dst_words: torch.Tensor, src_ids: torch.Tensor,
                       dst_ids: torch.Tensor, *, block: int = 2048, num_warps: int = 4) -> None:
    """copy_blocks() without its checks, for callers that hold block_words() views of two pools of one layout
    (built once, not per read) and 1-D id tensors of equal length on the pools' device."""
    n, words = src_ids.numel(), dst_words.shape[1]
    if n:
        _copy_blocks_kernel[(n, triton.cdiv(words, block))](src_words, dst_words, src_ids, dst_ids, words,
                                                            BLOCK=block, num_warps=num_warps)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor, *,
                block: int = 2048, num_warps: int = 4) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for whole blocks (first dim); both pools contiguous, same layout.
    Tuning knobs: `block` (8-byte words per program, a power of two), `num_warps`."""
    assert src.is_contiguous() and dst.is_contiguous() and src.shape[1:] == dst.shape[1:] and src.dtype == dst.dtype
    assert src_ids.shape == dst_ids.shape and src_ids.dim() == 1 and src_ids.device == dst.device
    launch_copy_blocks(block_words(src), block_words(dst), src_ids, dst_ids, block=block, num_warps=num_warps)


def copy_blocks_ref(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    dst[dst_ids] = src[src_ids]
