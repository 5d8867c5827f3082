"""Fused residual add + RMSNorm: h = x + residual; y = weight * rmsnorm(h). One program per row.

Rounding follows the model's unfused code (engine/models/llama.py): h is rounded to x's dtype, the norm is
computed in fp32 and rounded to x's dtype, then multiplied by the weight and rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr,
    stride_x, stride_r, stride_o, stride_h,
    n_cols, eps,
    BLOCK: tl.constexpr,
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
    normed = (h32 * inv).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.shape == residual.shape, f"x/residual must be [N, hidden] and equal: {x.shape} / {residual.shape}"
    assert weight.shape == (x.shape[1],), f"weight must be [{x.shape[1]}], got {weight.shape}"
    assert x.dtype == residual.dtype and x.dtype.is_floating_point, f"dtypes {x.dtype} / {residual.dtype}"
    assert x.device == residual.device == weight.device, "all tensors must be on one device"


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual). x, residual: [N, hidden] (last dim contiguous); weight: [hidden]."""
    _check(x, residual, weight)
    assert x.stride(1) == 1 and residual.stride(1) == 1 and weight.stride(0) == 1, "rows must be contiguous"
    N, C = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    h = torch.empty_like(x)
    out = torch.empty(N, C, dtype=out_dtype, device=x.device)
    if N == 0:
        return out, h
    BLOCK = triton.next_power_of_2(C)
    num_warps = min(16, max(1, BLOCK // 512))
    _add_rmsnorm_kernel[(N,)](
        x, residual, weight, out, h, x.stride(0), residual.stride(0), out.stride(0), h.stride(0),
        C, eps, BLOCK=BLOCK, num_warps=num_warps,
    )
    return out, h


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch twin of `fused_add_rmsnorm` (the model's unfused RMSNorm applied to x + residual)."""
    _check(x, residual, weight)
    h = x + residual
    h32 = h.float()
    normed = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, h
