"""FP8 (e4m3) kernels for weights quantized per output channel (engine/fp8.py).

`fp8_gemv`: y = x (W * s)^T for a single row x, the batch-1 decode step's projections. It is gemv.py's kernel
reading FP8 weights (half the bytes of bf16): each program streams its BLOCK_N rows of W in [BLOCK_N, BLOCK_K]
tiles, widens them to float32, multiplies by the matching slice of x (x is not quantized: at one row the step is
bound by reading W, so the activation stays exact), keeps a float32 accumulator and applies the row scales once
at the end.

`quantize_rows_fp8`: dynamic per-token scaling, the activation side of `torch._scaled_mm` for batches: one FP8
row and one float32 scale (absmax / 448) per row of x. One program per row: a pass for the absmax, a pass that
divides (IEEE division, as torch does), saturates to +-448 and rounds to nearest even. On a GPU it computes
exactly what its twin does. Triton's interpreter rounds float32 -> FP8 differently (it rounds half away from
zero, and a rounding carry into an odd exponent loses the carry), so the tests check exactness on inputs that
need no rounding and closeness on random ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# the constants, and the twins (kept beside the quantizer so that they import without triton)
from engine.fp8 import FP8, FP8_MAX, MIN_SCALE, fp8_gemv_ref, quantize_rows_fp8_ref
from engine.kernels.gemv import launch_gemv

__all__ = ["GEMV_CONFIG", "fp8_gemv", "fp8_gemv_ref", "quantize_rows_fp8", "quantize_rows_fp8_ref"]

GEMV_CONFIG = (8, 1024, 8, 2)  # (BLOCK_N, BLOCK_K, num_warps, num_stages): 8 KiB of W per tile; not tuned on a GPU


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] @ (weight [N, K] FP8 * scale [N, 1])^T (+ bias [N]) -> [1, N] in x's dtype, float32 accumulation.

    `config` = (BLOCK_N, BLOCK_K, num_warps, num_stages) overrides GEMV_CONFIG (benchmarks sweep it)."""
    assert x.dim() == 2 and x.shape[0] == 1 and weight.dim() == 2 and x.shape[1] == weight.shape[1], \
        f"need x [1, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
    assert weight.dtype == FP8 and x.dtype in (torch.float32, torch.float16, torch.bfloat16), (x.dtype, weight.dtype)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "row-major x and weight"
    assert scale.shape == (weight.shape[0],) and scale.dtype == torch.float32 and scale.is_contiguous()
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous())
    return launch_gemv(x, weight, scale, bias, config or GEMV_CONFIG)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, FP8_MAX: tl.constexpr,
                          MIN_SCALE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        kmask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * stride_q + k0 + cols, q.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=kmask)
    tl.store(s_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor, block_k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (float32/float16/bfloat16) -> (FP8 [M, K] row-major, float32 scales [M, 1]) with
    x ~= q * scale: each row scaled by its own absmax / 448 (at least MIN_SCALE)."""
    assert x.dim() == 2 and x.stride(1) == 1, f"need a row-major [M, K] x, got {tuple(x.shape)}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    if M:
        _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                                    BLOCK_K=min(block_k, triton.next_power_of_2(K)), num_warps=4)
    return q, scale
