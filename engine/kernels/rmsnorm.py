"""RMSNorm kernels. One program per row.

fused_add_rmsnorm: h = x + residual; y = weight * rmsnorm(h). Rounding follows the model's unfused code
(engine/models/ops.py): h is rounded to x's dtype, the norm is computed in fp32 and rounded to x's dtype, then
multiplied by the weight and rounded again. With unit_offset (Gemma) the scale is (1 + weight), applied in fp32
before the one rounding.

qk_rms_norm: the same norm over every head of q [T, H, D] and k [T, KVH, D] in place (QK-norm), one program
per token for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scale(h32, inv, w_ptr, c, mask, ROUND_TY: tl.constexpr, UNIT_OFFSET: tl.constexpr):  # noqa: ANN001, ANN202
    """Normalised h times the weight: (1 + w) in fp32 (unit offset), else w times the norm rounded first."""
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        return h32 * inv * (1.0 + w)
    return (h32 * inv).to(ROUND_TY).to(tl.float32) * w


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,
    stride_x, stride_r, stride_o, stride_h,
    n_cols, eps,
    BLOCK: tl.constexpr, UNIT_OFFSET: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n_cols
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * stride_h + c, h, mask=mask)
    h32 = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h32 * h32, 0) / n_cols + eps)
    y = _scale(h32, inv, w_ptr, c, mask, h_ptr.dtype.element_ty, UNIT_OFFSET)
    tl.store(out_ptr + row * stride_o + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.shape == residual.shape, f"x/residual must be [N, hidden] and equal: {x.shape} / {residual.shape}"
    assert weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got {weight.shape}"
    assert x.dtype == residual.dtype and x.dtype.is_floating_point, f"dtypes {x.dtype} / {residual.dtype}"
    assert x.device == residual.device == weight.device, "all tensors must be on one device"


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual). x, residual: [N, hidden] (last dim contiguous); weight: [hidden].
    unit_offset: scale by (1 + weight) in fp32 and return x's dtype (Gemma)."""
    _check(x, residual, weight)
    assert x.stride(1) == 1 and residual.stride(1) == 1 and weight.stride(0) == 1, "rows must be contiguous"
    N, C = x.shape
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    h = torch.empty_like(x)
    out = torch.empty(N, C, dtype=out_dtype, device=x.device)
    if N == 0:
        return out, h
    BLOCK = triton.next_power_of_2(C)
    num_warps = min(16, max(1, BLOCK // 512))
    _add_rmsnorm_kernel[(N,)](
        x, residual, weight, out, h, x.stride(0), residual.stride(0), out.stride(0), h.stride(0),
        C, eps, BLOCK=BLOCK, UNIT_OFFSET=unit_offset, num_warps=num_warps,
    )
    return out, h


def _normed_ref(h: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    h32 = h.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(h.dtype)
    return weight * normed.to(h.dtype)


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `fused_add_rmsnorm` (the model's unfused RMSNorm applied to x + residual)."""
    _check(x, residual, weight)
    h = x + residual
    return _normed_ref(h, weight, eps, unit_offset), h


@triton.jit
def _norm_heads(base, t, stride_t, stride_h, n_heads, w_ptr, eps, head_dim,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, UNIT_OFFSET: tl.constexpr):  # noqa: ANN001
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h[:, None] < n_heads) & (d[None, :] < head_dim)
    ptrs = base + t * stride_t + h[:, None] * stride_h + d[None, :]
    x = tl.load(ptrs, mask=m, other=0.0)
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, 1) / head_dim + eps)[:, None]
    y = _scale(x32, inv, w_ptr, d[None, :], d[None, :] < head_dim, x.dtype, UNIT_OFFSET)
    tl.store(ptrs, y.to(x.dtype), mask=m)


@triton.jit
def _qk_norm_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, stride_qt, stride_qh, stride_kt, stride_kh, num_q, num_k,
                    head_dim, eps, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    _norm_heads(q_ptr, t, stride_qt, stride_qh, num_q, wq_ptr, eps, head_dim, BLOCK_H, BLOCK_D, UNIT_OFFSET)
    _norm_heads(k_ptr, t, stride_kt, stride_kh, num_k, wk_ptr, eps, head_dim, BLOCK_H, BLOCK_D, UNIT_OFFSET)


def _check_qk(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor) -> None:
    assert q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2], \
        f"q must be [T, H, D] and k [T, KVH, D], got {tuple(q.shape)} / {tuple(k.shape)}"
    assert q_weight.shape == k_weight.shape == (q.shape[2],), f"weights must be [{q.shape[2]}]"
    assert q.dtype == k.dtype and q.device == k.device == q_weight.device == k_weight.device


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over head_dim of every head of q [T, H, D] and k [T, KVH, D], in place (any row and head strides,
    head_dim contiguous); q_weight / k_weight: [D]. Returns (q, k)."""
    _check_qk(q, k, q_weight, k_weight)
    assert q.stride(2) == k.stride(2) == q_weight.stride(0) == k_weight.stride(0) == 1, "head_dim must be contiguous"
    T, H, D = q.shape
    if T:
        block_h = triton.next_power_of_2(max(H, k.shape[1]))
        _qk_norm_kernel[(T,)](q, k, q_weight, k_weight, q.stride(0), q.stride(1), k.stride(0), k.stride(1), H,
                              k.shape[1], D, eps, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(D),
                              UNIT_OFFSET=unit_offset, num_warps=4 if block_h * D >= 2048 else 1)
    return q, k


def qk_rms_norm_ref(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                    unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `qk_rms_norm` (returns new tensors)."""
    _check_qk(q, k, q_weight, k_weight)
    return _normed_ref(q, q_weight, eps, unit_offset), _normed_ref(k, k_weight, eps, unit_offset)
