"""The few elementwise steps of the model, each with a fused Triton kernel on CUDA and plain torch elsewhere.

The torch versions are written exactly as Hugging Face computes them (that is what the CPU parity tests
check); the kernels are tested against their own torch twins in tests/test_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from engine.kernels.activation import silu_and_mul as _silu_and_mul_kernel
    from engine.kernels.gemv import gemv as _gemv_kernel
    from engine.kernels.rmsnorm import fused_add_rmsnorm as _add_rmsnorm_kernel
    from engine.kernels.rotary import apply_rotary as _rotary_kernel

    HAVE_TRITON = True
except ImportError:  # triton is optional on CPU-only installs
    HAVE_TRITON = False


def _fast(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (RMSNorm(h) * weight, h)."""
    if _fast(x):
        return _add_rmsnorm_kernel(x, torch.zeros_like(x) if residual is None else residual, weight, eps)
    h = x if residual is None else residual + x
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h32.to(h.dtype), h


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b. One row on CUDA (a batch-1 decode step) takes the GEMV kernel: one launch reading W at copy
    speed, where cuBLAS splits some of these shapes over K and adds a reduction kernel."""
    if _fast(x) and x.shape[0] == 1 and x.stride(1) == weight.stride(1) == 1 and x.dtype == weight.dtype:
        return _gemv_kernel(x, weight, bias)
    return F.linear(x, weight, bias)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each (i, i + d/2) pair of q and k by position x frequency; cos/sin are [max_pos, d] tables."""
    if _fast(q):
        return _rotary_kernel(positions, q, k, cos, sin)
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's inner product: silu(gate) * up, from the fused [T, 2I] projection."""
    if _fast(gate_up):
        return _silu_and_mul_kernel(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
