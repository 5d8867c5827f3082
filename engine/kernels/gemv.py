"""y = x W^T (+ b) for a single row x: the batch-1 decode step's projections, read once at memory speed.

At one row a linear layer is a matrix-vector product: all its time is reading W. cuBLAS runs some of these
shapes as split-K GEMMs plus a reduction kernel (an extra launch per projection, and 2.4-2.5 TB/s on an H100
for the QKV and down projections where a plain copy moves 2.9). Here each program owns BLOCK_N output rows:
it streams their [BLOCK_N, K] slice of W in [BLOCK_N, BLOCK_K] tiles, multiplies by the matching slice of x
and keeps a [BLOCK_N, BLOCK_K] float32 accumulator, summed across K once at the end.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, num_warps, num_stages) per weight shape (N, K), the best of `python -m benchmarks.gemv_gpu
# --sweep` on an H100 (Llama-3-8B's QKV, O, gate/up, down, LM head); other shapes take DEFAULT_CONFIG.
DEFAULT_CONFIG = (4, 1024, 8, 2)
CONFIGS = MappingProxyType({(6144, 4096): (8, 512, 4, 1), (4096, 4096): (8, 512, 8, 3), (28672, 4096): (4, 1024, 8, 1),
                            (4096, 14336): (4, 1024, 8, 2), (128256, 4096): (4, 1024, 8, 4)})


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = x W^T, times a per-row scale when HAS_SCALE (a quantized W: FP8 rows widened in registers), + bias."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptr + k0 + cols)
        else:
            kmask = k0 + cols < K
            w = tl.load(w_ptrs, mask=(rows[:, None] < N) & kmask[None, :], other=0.0)
            x = tl.load(x_ptr + k0 + cols, mask=kmask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] @ weight[N, K]^T (+ bias [N]) -> [1, N] in x's dtype, accumulated in float32.

    `config` = (BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the tuned table (benchmarks sweep it)."""
    assert x.dim() == 2 and x.shape[0] == 1 and weight.dim() == 2 and x.shape[1] == weight.shape[1], \
        f"need x [1, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1 and x.dtype == weight.dtype, "row-major, one dtype"
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_contiguous())
    N, K = weight.shape
    block_n, block_k, warps, stages = config or CONFIGS.get((N, K), DEFAULT_CONFIG)
    return launch_gemv(x, weight, None, bias, (block_n, block_k, warps, stages))


def launch_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                config: tuple[int, int, int, int]) -> torch.Tensor:
    """The one GEMV launch behind `gemv` and `engine.kernels.fp8.fp8_gemv` (shapes checked by those)."""
    N, K = weight.shape
    block_n, block_k, warps, stages = config
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight, y, N, K,
        weight.stride(0), HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        EVEN=N % block_n == 0 and K % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=stages)
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch twin: the float32 product, rounded once to x's dtype."""
    y = x.float() @ weight.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)
