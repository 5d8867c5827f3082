"""Small helpers shared by the kernels' launchers."""

from __future__ import annotations

import os

import torch


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
