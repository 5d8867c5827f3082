"""Weights quantized at load (`engine.quantization`).

`int8`: weight-only int8 with one scale per output channel (symmetric, absmax / 127), for the CPU. A decode step
of a small model on a few cores is bound by the bytes it reads: the float32 SmolLM2 reads 540 MB per token, int8
135 MB. The matmuls run as `torch._weight_int8pack_mm` (PyTorch's CPU kernel for exactly this: activations stay
float, weights are widened in registers). Every projection of the decoder layers and the LM head is quantized;
embeddings (a gather of a few rows), norms and MoE experts (the fused MoE kernel takes float weights) stay as
loaded. The LM head is read through its int8 copy (`CausalLM.head_weight`): with tied embeddings the table itself
stays float for the embedding's gather.

A quantized weight is the module's own parameter holding int8 data, with its scales attached as
`param.quant_scale`; `engine.models.ops.linear` sees the attribute and takes the int8 kernel. Nothing else in the
model changes, so the model files still read like their papers.

`fp8`: FP8 (e4m3) weights with one scale per output channel, the same design, for GPUs with FP8 tensor cores
(engine/fp8.py: the kernels, and the fallback where there are none). The same weights are quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ConfigError
from engine.fp8 import FP8, fp8_native, log_fallback, quantized_fp8

METHODS = ("int8", "fp8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], float32 scale [N]) with weight ~= int8 * scale[:, None]; rows of zeros get scale 1."""
    assert weight.dim() == 2, f"a weight matrix, got shape {tuple(weight.shape)}"
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (weight * scale)^T for int8 `weight` [N, K]: the CPU int8-weight kernel, x [M, K] float. The kernel runs
    in bfloat16 (with float32 activations it takes a slow path: 31 ms instead of 2.9 for SmolLM2's LM head on one
    core here), so x is rounded to bfloat16 and the result widened back."""
    assert weight.dtype == torch.int8 and x.shape[-1] == weight.shape[1] and scale.shape == (weight.shape[0],)
    if x.dtype == torch.bfloat16:
        return torch._weight_int8pack_mm(x, weight, scale)
    return torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale).to(x.dtype)


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The torch twin: dequantize, then an ordinary matmul in float32."""
    return (x.float() @ (weight.float() * scale.float()[:, None]).t()).to(x.dtype)


def _quantized(param: torch.Tensor) -> nn.Parameter:
    q, scale = quantize_int8(param.data)
    out = nn.Parameter(q, requires_grad=False)
    out.quant_scale = scale.to(torch.bfloat16)  # type: ignore[attr-defined]  # the kernel's dtype
    return out


def quantize_model(model: nn.Module, method: str, device: torch.device) -> int:
    """Quantize every projection weight of `model` in place, and give the LM head its quantized copy; returns the
    bytes saved (the copy's not counted against them). Weights already quantized (an FP8 checkpoint's) are kept."""
    if method not in METHODS:
        raise ConfigError(f"engine.quantization must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "int8" and device.type != "cpu":
        raise ConfigError("engine.quantization: int8 is a CPU path (torch's int8-weight kernel); on a GPU use "
                          "fp8 (Hopper) or bfloat16 weights")
    quantize = _quantized
    if method == "fp8":
        native = fp8_native(device)
        if not native:
            log_fallback(device, next(model.parameters()).dtype, "weights are rounded through FP8, kept as")
        quantize = lambda p: quantized_fp8(p, native)  # noqa: E731
    saved = 0
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 2 and w.dtype not in _QUANTIZED and projection(name, module):
            module.weight = quantize(w)
            saved += w.numel() * w.element_size() - module.weight.numel() * module.weight.element_size()
    head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    if head.weight.dtype in _QUANTIZED:  # an FP8 checkpoint's LM head: ops.linear reads it as it is
        return saved
    model.head_weight = quantize(head.weight)  # the embedding's gather (tied) keeps reading the float table
    if model.lm_head is not None:  # untied: only the quantized copy is read from now on
        saved += head.weight.numel() * head.weight.element_size() - model.head_weight.numel() * \
            model.head_weight.element_size()
        head.weight = nn.Parameter(head.weight.data.new_empty(0, head.weight.shape[1]), requires_grad=False)
    return saved


_QUANTIZED = (torch.int8, FP8)


def projection(name: str, module: nn.Module) -> bool:
    """A decoder matmul weight: not an embedding or LM head (handled apart), a norm, or a MoE router's gate
    (tiny, and its argmax picks experts)."""
    return type(module).__name__ in ("ColumnParallelLinear", "RowParallelLinear", "Linear") and not name.endswith(
        ("gate", "shared_expert_gate"))
