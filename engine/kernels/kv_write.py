"""Scatter new K/V rows into the paged KV cache (optionally rotating q and k on the way: one launch, not two).

kv_cache is one layer's view [num_blocks, 2, block_size, kv_heads, head_dim] of the block-major cache, so it
is strided (not contiguous); every stride is passed to the kernel. Token t goes to slot s = slot_mapping[t]:
block s // block_size, offset s % block_size. Slot -1 marks a padding token (CUDA-graph batches) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.rotary import _cos_sin, _rotate_heads, apply_rotary_ref


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_ckv, stride_cs, stride_ch, stride_cd,
    num_kv_heads, head_dim, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.where(slot >= 0, num_kv_heads, 0)  # slot -1: padding, nothing to write
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < heads) & (d[None, :] < head_dim)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    dst = cache_ptr + blk * stride_cb + off * stride_cs + h[:, None] * stride_ch + d[None, :] * stride_cd
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _check(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, f"kv_cache must be [blocks, 2, bs, kvh, d], got {kv_cache.shape}"
    assert k.dim() == 3 and k.shape == v.shape, f"k/v must be [T, kvh, d] and equal, got {k.shape} / {v.shape}"
    assert k.shape[1:] == kv_cache.shape[3:], f"k {k.shape} does not match kv_cache {kv_cache.shape}"
    assert slot_mapping.shape == (k.shape[0],), f"slot_mapping must be [T={k.shape[0]}], got {slot_mapping.shape}"
    assert slot_mapping.dtype in (torch.int32, torch.int64), f"slot_mapping must be int32/int64, got {slot_mapping.dtype}"
    assert k.device == v.device == kv_cache.device == slot_mapping.device, "all tensors must be on one device"
    assert k.dtype.is_floating_point and v.dtype.is_floating_point and kv_cache.dtype.is_floating_point


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache[s // bs, 0, s % bs] = k[t] and [.., 1, ..] = v[t] for s = slot_mapping[t] >= 0 (in place).

    k, v: [T, kv_heads, head_dim] (any strides, cast to the cache dtype); kv_cache: [num_blocks, 2, block_size,
    kv_heads, head_dim] (any strides); slot_mapping: [T] int64/int32, -1 = skip.
    """
    _check(k, v, kv_cache, slot_mapping)
    T, H, D = k.shape
    if T == 0:
        return
    BLOCK_H, BLOCK_D = triton.next_power_of_2(H), triton.next_power_of_2(D)
    num_warps = 4 if BLOCK_H * BLOCK_D >= 1024 else 1
    _write_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping,
        *k.stride(), *v.stride(), *kv_cache.stride(),
        H, D, kv_cache.shape[2],
        BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Pure-torch twin of `write_kv`."""
    _check(k, v, kv_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = kv_cache.shape[2]
    blocks, offsets = slots // bs, slots % bs
    kv_cache[blocks, 0, offsets] = k[keep].to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v[keep].to(kv_cache.dtype)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, cache_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_cs, stride_ch, cos_stride, block_size,
    NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cos, sin, d, dmask = _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, cos_stride, HALF, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, NUM_Q, cos, sin, h, d, dmask, HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    m = (h[:, None] < tl.where(slot >= 0, NUM_KV, 0)) & dmask[None, :]  # slot -1: padding, nothing to write
    t64 = t.to(tl.int64)
    src_k = k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :]
    k1 = tl.load(src_k, mask=m, other=0.0).to(tl.float32)
    k2 = tl.load(src_k + HALF, mask=m, other=0.0).to(tl.float32)
    dst = cache_ptr + (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + h[:, None] * stride_ch + d[None, :]
    # Rounded once, to the key's dtype and then the cache's: what rotating k and then writing it stores.
    k1_rot = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
    k2_rot = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
    tl.store(dst, k1_rot.to(cache_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, k2_rot.to(cache_ptr.dtype.element_ty), mask=m)
    tl.store(dst + stride_ckv, tl.load(src_v, mask=m, other=0.0).to(cache_ptr.dtype.element_ty), mask=m)
    tl.store(dst + stride_ckv + HALF, tl.load(src_v + HALF, mask=m, other=0.0).to(cache_ptr.dtype.element_ty), mask=m)


def rotary_write_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """`apply_rotary` then `write_kv`, in one launch: q [T, H, D] is rotated in place; k [T, kv_heads, D] is rotated
    on its way into the cache (k itself is left as it was), v is written as is. cos/sin: [max_pos, D] float32."""
    _check(k, v, kv_cache, slot_mapping)
    T, H, D = q.shape
    assert positions.shape == (T,) and k.shape[0] == T and k.shape[2] == D and D % 2 == 0, "shape mismatch"
    assert q.stride(2) == k.stride(2) == v.stride(2) == kv_cache.stride(4) == cos.stride(1) == 1, "head_dim not unit-stride"
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape and cos.shape[1] == D
    if T == 0:
        return
    half = D // 2
    _rotary_write_kv_kernel[(T,)](
        q, k, v, kv_cache, positions, slot_mapping, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), cos.stride(0), kv_cache.shape[2],
        NUM_Q=H, NUM_KV=k.shape[1], HALF=half, BLOCK_H=triton.next_power_of_2(max(H, k.shape[1])),
        BLOCK_D=triton.next_power_of_2(half), num_warps=4 if H * D >= 2048 else 1,
    )


def rotary_write_kv_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Pure-torch twin of `rotary_write_kv`."""
    q_rot, k_rot = apply_rotary_ref(positions, q, k, cos, sin)
    q.copy_(q_rot)
    write_kv_ref(k_rot, v, kv_cache, slot_mapping)
