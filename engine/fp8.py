"""FP8 weights (`engine.quantization: fp8`, and Hugging Face FP8 checkpoints: engine/fp8_checkpoint.py).

The design is int8's (engine/quantization.py): a quantized weight is the module's own parameter, holding
torch.float8_e4m3fn data [N, K], with float32 scales [N] attached as `param.quant_scale`, one per output channel
(absmax / 448). A checkpoint's per-tensor scale becomes that scale repeated over the tensor's rows (exact: the
stored FP8 bytes are kept as they are). `engine.models.ops.linear` sees the dtype; the model files are unchanged.

What runs where (`fp8_linear`), on a CUDA device with FP8 tensor cores (Hopper, sm90+):
- one row (a batch-1 decode step): `fp8_gemv` (engine/kernels/fp8.py), weight-only: x stays in its dtype;
- more rows: x is quantized per token (`quantize_rows_fp8`, one Triton launch) and `torch._scaled_mm` multiplies
  with rowwise scales (W8A8, dynamic per-token activations: vLLM's scheme for per-channel FP8 weights), float32
  accumulation, bf16 out;
- a shape `_scaled_mm` refuses (K or N not a multiple of 16) takes `fp8_linear_ref`: correct, not fast.
`fp8_linear_ref` is the torch twin of all of it (the same choice by row count), what the tests compare against.

Without FP8 matmuls (the CPU; GPUs before Hopper) the weights are rounded through FP8 at load and stored
dequantized in the engine's dtype, and one log line says so: the model computes with FP8-rounded weights at the
engine dtype's speed and memory. That is what a vLLM user gets on a GPU without FP8 (a weight-only FP8 fallback
and a warning) rather than an error: an FP8 checkpoint still loads and runs anywhere. On the CPU use int8 for
speed (it composes: an FP8 checkpoint with `engine.quantization: int8` is dequantized, then quantized to int8).
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # floor of a dynamic activation scale (as vLLM's): a row of zeros stays zeros
log = logging.getLogger(__name__)


@functools.cache
def _kernels() -> ModuleType | None:
    """engine.kernels.fp8, or None without triton (imported on first use: it imports this module)."""
    try:
        from engine.kernels import fp8
    except ImportError:  # triton is optional on CPU-only installs
        return None
    return fp8


def fp8_native(device: torch.device) -> bool:
    """Whether `device` runs FP8 matmuls (FP8 tensor cores and the Triton kernels): CUDA sm90+."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0) and _kernels() is not None


def fp8_gemv_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Twin of engine.kernels.fp8.fp8_gemv: the float32 product with the dequantized weight, rounded once to x's
    dtype."""
    y = (x.float() @ weight.float().t()) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def quantize_rows_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of engine.kernels.fp8.quantize_rows_fp8: per row, absmax / 448 floored at MIN_SCALE, IEEE division,
    saturation to +-448, round-to-nearest-even cast; (FP8 [M, K], float32 scales [M, 1])."""
    x32 = x.float()
    amax = x32.abs().amax(dim=1, keepdim=True)
    # A tensor divisor, not the Python float: CUDA torch divides by a CPU scalar as a * (1 / b), which is not the
    # correctly rounded quotient the kernel's div_rn takes, and a scale one ulp off moves whole rows' rounding.
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=MIN_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 [N, K], float32 scale [N]) with weight ~= fp8 * scale[:, None]; rows of zeros get scale 1."""
    assert weight.dim() == 2, f"a weight matrix, got shape {tuple(weight.shape)}"
    w = weight.float()
    scale = w.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight * scale[:, None] in `dtype` (the product taken in float32)."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def scaled_mm_rowwise(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """(xq * x_scale) (weight * w_scale)^T (+ bias) through torch._scaled_mm, in bf16.

    What its CUDA kernel requires (torch 2.11-2.13): A [M, K] FP8 row-major; B [K, N] FP8 column-major (the
    transpose of a row-major [N, K] weight is exactly that); K and N multiples of 16 (M is free); rowwise scales
    float32 and contiguous, scale_a [M, 1] and scale_b [1, N]; out bf16 (the one output dtype rowwise scaling takes
    on every build: fp16 came later, float32 needs cuBLAS 12.9); a bias must then be bf16. use_fast_accum stays off
    (full float32 accumulation: the fast mode accumulates in lower precision on Hopper)."""
    M, K = xq.shape
    N = weight.shape[0]
    assert xq.dtype == weight.dtype == FP8 and weight.shape == (N, K), (xq.dtype, weight.dtype, weight.shape, K)
    assert xq.stride(1) == 1 and weight.stride(1) == 1, "row-major activations and weight"
    assert K % 16 == 0 and N % 16 == 0, f"_scaled_mm needs K and N multiples of 16, got K={K} N={N}"
    assert x_scale.shape == (M, 1) and x_scale.dtype == torch.float32 and x_scale.is_contiguous()
    assert w_scale.shape == (N,) and w_scale.dtype == torch.float32 and w_scale.is_contiguous()
    assert bias is None or (bias.shape == (N,) and bias.dtype == torch.bfloat16)
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale.view(1, N), bias=bias,
                            out_dtype=torch.bfloat16, use_fast_accum=False)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """x (weight * scale)^T + bias for an FP8 weight [N, K] with float32 row scales [N]; x [..., K]."""
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    kernels = _kernels() if x.is_cuda else None
    if kernels is None:
        y = fp8_linear_ref(x2, weight, scale, bias)
    elif x2.shape[0] == 1 and x2.stride(1) == 1:
        y = kernels.fp8_gemv(x2, weight, scale, bias)
    elif K % 16 == 0 and N % 16 == 0:
        xq, xs = kernels.quantize_rows_fp8(x2 if x2.stride(1) == 1 else x2.contiguous())
        fuse = bias is not None and bias.dtype == torch.bfloat16
        y = scaled_mm_rowwise(xq, xs, weight, scale, bias if fuse else None).to(x.dtype)
        if bias is not None and not fuse:
            y = y + bias
    else:
        y = fp8_linear_ref(x2, weight, scale, bias)
    return y.reshape(*x.shape[:-1], N)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """The torch twin of `fp8_linear`, x [M, K]: one row is the GEMV's weight-only product; more rows are
    quantized per token and multiplied exactly in float32 ((xq . wq) * x_scale * w_scale, + bias), rounded once to
    bf16 (`_scaled_mm`'s output) and then to x's dtype."""
    if x.shape[0] == 1:
        return fp8_gemv_ref(x, weight, scale, bias)
    xq, xs = quantize_rows_fp8_ref(x)
    y = (xq.float() @ weight.float().t()) * xs * scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16).to(x.dtype)


def fp8_parameter(weight: torch.Tensor, scale: torch.Tensor) -> nn.Parameter:
    """An FP8 parameter with its float32 row scales attached (what ops.linear dispatches on)."""
    assert weight.dtype == FP8 and scale.shape == (weight.shape[0],)
    out = nn.Parameter(weight, requires_grad=False)
    out.quant_scale = scale.float().contiguous()  # type: ignore[attr-defined]
    return out


def quantized_fp8(param: torch.Tensor, native: bool) -> nn.Parameter:
    """`param` quantized per output channel: FP8 with scales when `native`, else rounded through FP8 and stored back
    in its own dtype (the fallback without FP8 matmuls)."""
    q, scale = quantize_fp8(param.data)
    if native:
        return fp8_parameter(q, scale)
    return nn.Parameter(dequantize_fp8(q, scale, param.dtype), requires_grad=False)


def dequantize_fp8_params(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every FP8 parameter of `model` (an FP8 checkpoint's) by its dequantized `dtype` copy; returns how
    many. Used where FP8 matmuls are not available."""
    count = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype == FP8:
                setattr(module, name, nn.Parameter(dequantize_fp8(p.data, p.quant_scale, dtype), requires_grad=False))
                count += 1
    return count


def log_fallback(device: torch.device, dtype: torch.dtype, what: str) -> None:
    """The one line that says FP8 runs as a fallback here; `what` says which weights went to `dtype`."""
    name = str(dtype).removeprefix("torch.")
    log.warning("FP8 weights: %s has no FP8 matmul path (needs CUDA sm90+ and triton); %s %s (FP8 values, %s speed "
                "and memory)", device, what, name, name)
