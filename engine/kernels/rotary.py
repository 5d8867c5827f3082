"""Rotary position embedding applied in place to queries and keys ('rotate half' layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base, t, stride_t, stride_h, n, cos, sin, h, d, dmask, HALF: tl.constexpr):
    m = (h[:, None] < n) & dmask[None, :]
    p1 = base + t * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (f1 * cos - f2 * sin).to(x1.dtype), mask=m)
    tl.store(p1 + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=m)


@triton.jit
def _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, cos_stride, HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token t's rotation: cos/sin rows [1, BLOCK_D] of its position, the half-dim offsets and their mask."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HALF
    cos = tl.load(cos_ptr + pos * cos_stride + d, mask=dmask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * cos_stride + d, mask=dmask, other=0.0)[None, :]
    return cos, sin, d, dmask


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                   cos_stride, NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    cos, sin, d, dmask = _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, cos_stride, HALF, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    _rotate_heads(q_ptr, t, q_stride_t, q_stride_h, NUM_Q, cos, sin, h, d, dmask, HALF)
    _rotate_heads(k_ptr, t, k_stride_t, k_stride_h, NUM_K, cos, sin, h, d, dmask, HALF)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] in place by their positions; cos/sin are [max_pos, D] float32 tables."""
    T, H, D = q.shape
    assert k.dim() == 3 and k.shape[0] == T and k.shape[2] == D and positions.shape == (T,), "shape mismatch"
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and cos.shape == sin.shape, "layout"
    assert cos.dtype == torch.float32 and D % 2 == 0
    if T == 0:
        return q, k
    half = D // 2
    _rotary_kernel[(T,)](q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
                         NUM_Q=H, NUM_K=k.shape[1], HALF=half, BLOCK_H=triton.next_power_of_2(max(H, k.shape[1])),
                         BLOCK_D=triton.next_power_of_2(half))
    return q, k


def apply_rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin, computed in float32 and rounded once like the kernel (returns new tensors)."""
    half = q.shape[-1] // 2
    c, s = cos[positions, :half][:, None, :], sin[positions, :half][:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)
