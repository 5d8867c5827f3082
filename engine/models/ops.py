"""The few elementwise and routing steps of the models, each with a fused Triton kernel on CUDA and plain torch
elsewhere.

The torch versions are written exactly as Hugging Face computes them (that is what the CPU parity tests
check); the kernels are tested against their own torch twins in tests/test_kernels.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.fp8 import fp8_linear
from engine.quantization import int8_linear

try:
    from engine.kernels.activation import gelu_tanh_and_mul as _gelu_tanh_and_mul_kernel
    from engine.kernels.activation import silu_and_mul as _silu_and_mul_kernel
    from engine.kernels.gemv import gemv as _gemv_kernel
    from engine.kernels.moe import fused_moe as _fused_moe_kernel
    from engine.kernels.moe import moe_route as _moe_route_kernel
    from engine.kernels.rmsnorm import fused_add_rmsnorm as _add_rmsnorm_kernel
    from engine.kernels.rmsnorm import qk_rms_norm as _qk_rms_norm_kernel
    from engine.kernels.rotary import apply_rotary as _rotary_kernel

    HAVE_TRITON = True
except ImportError:  # triton is optional on CPU-only installs
    HAVE_TRITON = False


def _fast(x: torch.Tensor) -> bool:
    return HAVE_TRITON and x.is_cuda


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (x alone when residual is None); returns (RMSNorm(h) * weight, h). unit_offset: the scale
    is (1 + weight), applied in float32 before rounding (Gemma)."""
    if _fast(x):
        res = torch.zeros_like(x) if residual is None else residual
        return _add_rmsnorm_kernel(x, res, weight, eps, unit_offset=unit_offset)
    h = x if residual is None else residual + x
    h32 = h.float()
    h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h32 * (1.0 + weight.float())).to(h.dtype), h
    return weight * h32.to(h.dtype), h


def qk_rms_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of every query head [T, H, D] and key head [T, KVH, D] (QK-norm)."""
    if _fast(q):
        return _qk_rms_norm_kernel(q, k, q_weight, k_weight, eps, unit_offset)
    return add_rms_norm(q, None, q_weight, eps, unit_offset)[0], add_rms_norm(k, None, k_weight, eps, unit_offset)[0]


SKINNY_ROWS = range(1, 17)  # float32 rows on the CPU (a decode step's batch, a short prompt) that take W x^T


def _skinny_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A few float32 rows on the CPU (a decode step's batch; a prompt chunk of up to 16 tokens too). There MKL
    runs `x W^T` (what F.linear asks for) slowly for a few rows, and `W x^T` with one row (a GEMV) no faster: the
    49,152 x 576 LM head takes 22 / 34 / 17 ms for 2 / 3 / 4 rows one way, 3.4 / 4.6 / 5.0 ms the other, and 9-10 ms
    for one row either way; over a whole SmolLM2 step (weights streamed from memory, not warm in a cache) the
    layers' own weights behave alike (benchmarks/RESULTS.md, "The LM head of a CPU decode step")."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and x.shape[0] in SKINNY_ROWS)


def _skinny_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T computed as (W x^T)^T: the same sums in another order (float32 rounding apart). One row goes in twice,
    so that MKL takes its GEMM rather than its slower GEMV."""
    rows = x.shape[0]
    xs = x if rows > 1 else x.expand(2, -1).contiguous()
    return (weight @ xs.t())[:, :rows].t().contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b. One row on CUDA (a batch-1 decode step) takes the GEMV kernel: one launch reading W at copy
    speed, where cuBLAS splits some of these shapes over K and adds a reduction kernel. A weight quantized at
    load carries its scales as `weight.quant_scale` (engine/quantization.py) and takes the int8 kernel, or the FP8
    ones for an FP8 weight (engine/fp8.py). A CPU decode step's few rows take `W x^T` (`_skinny_cpu`)."""
    scale = getattr(weight, "quant_scale", None)
    if scale is not None:
        if weight.dtype != torch.int8:
            return fp8_linear(x, weight, scale, bias)
        y = int8_linear(x, weight, scale)
        return y if bias is None else y + bias
    if _fast(x) and x.shape[0] == 1 and x.stride(1) == weight.stride(1) == 1 and x.dtype == weight.dtype:
        return _gemv_kernel(x, weight, bias)
    if _skinny_cpu(x, weight):
        y = _skinny_linear(x, weight)
        return y if bias is None else y + bias
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


def act_and_mul(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """A gated MLP's inner product act(gate) * up from the fused [T, 2I] projection: silu (SwiGLU) or
    gelu_tanh (GeGLU)."""
    if _fast(gate_up):
        return (_silu_and_mul_kernel if act == "silu" else _gelu_tanh_and_mul_kernel)(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh")) * up


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap): squashes x smoothly into (-cap, cap) (Gemma 2's logit soft-capping)."""
    return torch.tanh(x / cap) * cap


def moe_route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k]): the k most probable experts of
    softmax(logits), their probabilities renormalised to sum 1 when `normalize`."""
    if _fast(logits):
        return _moe_route_kernel(logits, top_k, normalize)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, act: str) -> torch.Tensor:
    """sum_j weights[t, j] * Expert_{ids[t, j]}(x[t]) for every token t, with expert e's gate|up weights
    w_gate_up[e] [2I, H] and down weights w_down[e] [H, I]. On CUDA one grouped GEMM per projection; elsewhere
    one pair of matrix multiplies per expert that any token chose, summed in expert order as transformers does."""
    if _fast(x):
        return _fused_moe_kernel(x, w_gate_up, w_down, weights, ids, act)
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = torch.where(ids == e)
        h = F.linear(act_and_mul(F.linear(x[token], w_gate_up[e]), act), w_down[e])
        out.index_add_(0, token, (h * weights[token, slot, None]).to(out.dtype))
    return out
