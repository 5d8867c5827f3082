"""A gated MLP's inner product from one fused [T, 2I] = [gate | up] projection, in one pass:
silu(gate) * up (SwiGLU) and gelu_tanh(gate) * up (GeGLU), both computed in float32 and rounded once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import tanh


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, INTER, BLOCK: tl.constexpr, GELU: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < INTER
    g = tl.load(x_ptr + t * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * x_stride + INTER + cols, mask=m, other=0.0).to(tl.float32)
    if GELU:  # noqa: SIM108 - constexpr branch
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))  # 0.797.. = sqrt(2 / pi)
    else:
        a = g / (1.0 + tl.exp(-g))
    tl.store(out_ptr + t * out_stride + cols, (a * u).to(out_ptr.dtype.element_ty), mask=m)


def _act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, f"x must be [T, 2I] row-major, got {x.shape}"
    T, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(T, inter, dtype=x.dtype, device=x.device)
    if T:
        block = 1024
        _act_and_mul_kernel[(T, triton.cdiv(inter, block))](x, out, x.stride(0), out.stride(0), inter, BLOCK=block,
                                                            GELU=gelu)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    return _act_and_mul(x, gelu=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] = [gate | up] -> gelu_tanh(gate) * up [T, I] (gelu with the tanh approximation)."""
    return _act_and_mul(x, gelu=True)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of `silu_and_mul`, in float32 and rounded once like the kernel."""
    inter = x.shape[1] // 2
    g, u = x[:, :inter].float(), x[:, inter:].float()
    return (torch.nn.functional.silu(g) * u).to(x.dtype)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch twin of `gelu_tanh_and_mul`, in float32 and rounded once like the kernel."""
    inter = x.shape[1] // 2
    g, u = x[:, :inter].float(), x[:, inter:].float()
    return (torch.nn.functional.gelu(g, approximate="tanh") * u).to(x.dtype)
