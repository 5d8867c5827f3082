"""SwiGLU's gate: silu(gate) * up from one fused [T, 2I] projection, in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, INTER, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < INTER
    g = tl.load(x_ptr + t * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * x_stride + INTER + cols, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + t * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> [T, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, f"x must be [T, 2I] row-major, got {x.shape}"
    T, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T:
        block = 1024
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter, BLOCK=block)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch twin, in float32 and rounded once like the kernel."""
    inter = x.shape[1] // 2
    g, u = x[:, :inter].float(), x[:, inter:].float()
    return (torch.nn.functional.silu(g) * u).to(x.dtype)
