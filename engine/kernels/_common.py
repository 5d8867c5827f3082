"""Small helpers shared by the kernels' launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether kernels must feed tl.dot float32 operands instead of `dtype` ones.

    The interpreter multiplies bfloat16 operands as their raw uint16 bits (a triton bug), so there the
    kernels cast bf16 tiles to fp32 first: bf16 x bf16 products are exact in fp32, so the result is what
    the GPU's bf16 tensor-core dot with fp32 accumulation computes. On a GPU the native dtype is used.
    """
    return dtype == torch.bfloat16 and (interpreting() or device.type != "cuda")


ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def tanh(x):  # noqa: ANN001, ANN201 - triton.jit
    """tanh in float32 through exp of a non-positive argument: no overflow at any |x|, exact sign."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


LOG2E = 1.4426950408889634


def score_scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, cap_log2) for the attention kernels' base-2 softmax: scores are dot * qk_scale without a cap,
    tanh(dot * qk_scale) * cap_log2 with one (cap * tanh(scale * dot / cap), times log2 e)."""
    if softcap is None:
        return scale * LOG2E, 0.0
    assert softcap > 0, f"softcap must be positive, got {softcap}"
    return scale / softcap, softcap * LOG2E
