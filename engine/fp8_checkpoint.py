"""Hugging Face FP8 checkpoints: weights stored as float8_e4m3fn with their scales beside them.

The `quantization_config` of config.json says which kind (older compressed-tensors exports call it
`compression_config`); the tensors say which layers:
- `quant_method: fp8` (vLLM's and AutoFP8's format; transformers' FP8 without `weight_block_size`):
  `<layer>.weight` FP8, `<layer>.weight_scale` per tensor (shape [] or [1]), `<layer>.input_scale` when
  `activation_scheme` is static; `ignored_layers` stay bf16.
- `quant_method: fbgemm_fp8` (transformers' FbgemmFp8Config, Meta's Llama 3.1 FP8 releases): `weight_scale` per
  output channel [N, 1]; `modules_to_not_convert` stay bf16.
- `quant_method: compressed-tensors` (llm-compressor) whose weight groups are 8-bit float per tensor ([1]) or per
  channel ([N, 1]): `weight_scale`, and `input_scale` for static activations; `ignore` stays bf16.
A weight stored as FP8 keeps its bytes; its scale becomes one float32 per row (engine/fp8.py). Activation scales
(`input_scale`, `input_scale_ub`) and KV-cache scales (`k_scale`, `v_scale`, `output_scale`) are read past:
activations are scaled per token at run time, at least as accurately as by a static per-tensor scale, and the KV
cache keeps the engine dtype.

Refused, with a WeightLoadError that names what: block-wise scales (`weight_block_size`, strategy `block`: the
128x128 blocks of DeepSeek-V3-style checkpoints do not fit one scale per row), any other quant_method (gptq, awq,
bitsandbytes, ...), compressed-tensors groups that are not 8-bit float, FP8 e5m2 weights, an FP8 weight without
its scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.fp8 import FP8, dequantize_fp8, dequantize_fp8_params, fp8_native, log_fallback
from engine.loader import Shard, WeightLoadError
from engine.models.checkpoint import Slot
from engine.quantization import projection

FP8_DTYPE = "F8_E4M3"  # safetensors' name of float8_e4m3fn
SCALE = ".weight_scale"
READ_PAST = (".input_scale", ".input_scale_ub", ".k_scale", ".v_scale", ".output_scale")
METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors")
Found = dict[str, tuple[str, tuple[int, ...]]]  # checkpoint name -> (file, shape)


def quantization_method(d: dict[str, Any], where: str) -> str | None:
    """The FP8 quant_method of a config.json mapping, None for an unquantized checkpoint; WeightLoadError for a
    quantization this engine does not load."""
    q = d.get("quantization_config") or d.get("compression_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method not in METHODS:
        raise WeightLoadError(f"{where}: quantization_config quant_method {method!r} is not supported (FP8 checkpoints "
                              f"are: {', '.join(METHODS)}; or load bf16/fp32 weights with engine.quantization)")
    if q.get("weight_block_size"):
        raise WeightLoadError(f"{where}: block-wise FP8 (weight_block_size {q['weight_block_size']}) is not supported: "
                              "per-tensor and per-channel FP8 checkpoints are")
    if method == "compressed-tensors":
        _check_compressed(q, where)
    return method


def _check_compressed(q: dict[str, Any], where: str) -> None:
    if q.get("format") not in ("float-quantized", "naive-quantized"):
        raise WeightLoadError(f"{where}: compressed-tensors format {q.get('format')!r} is not supported (FP8 "
                              "checkpoints are float-quantized)")
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        kind = (w.get("type"), w.get("num_bits"), w.get("strategy"))
        if kind[:2] != ("float", 8) or kind[2] not in ("tensor", "channel"):
            raise WeightLoadError(f"{where}: compressed-tensors group {name!r}: weights {kind[1]}-bit {kind[0]} per "
                                  f"{kind[2]} are not supported (8-bit float per tensor or per channel are)")


def split_scales(found: Found, dtypes: dict[str, str], method: str | None, where: str
                 ) -> tuple[Found, dict[str, tuple[str, str]]]:
    """`found` without the scale tensors, and FP8 weight name -> (file, name) of its scale. Checked: every FP8
    weight is e4m3 and has a per-tensor or per-channel scale, and every scale belongs to an FP8 weight."""
    weights: Found = {}
    scales: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for name, (file, shape) in found.items():
        if method is not None and name.endswith(SCALE):
            scales[name.removesuffix("_scale")] = (file, name, shape)
        elif method is None or not name.endswith(READ_PAST):
            weights[name] = (file, shape)
    for name, (file, scale, shape) in scales.items():
        if dtypes.get(name) != FP8_DTYPE:
            raise WeightLoadError(f"{file}: {scale} scales {name}, stored as {dtypes.get(name, 'no tensor')}: only "
                                  "float8_e4m3fn (F8_E4M3) weights are supported")
        rows = weights[name][1][0]
        if shape not in ((), (1,), (1, 1), (rows,), (rows, 1)):
            raise WeightLoadError(f"{file}: {scale} has shape {shape}: per-tensor ([] or [1]) and per-channel "
                                  f"([{rows}, 1]) scales are supported, block-wise ones are not")
    for name, (file, _) in weights.items():
        if dtypes[name].startswith("F8") and (dtypes[name] != FP8_DTYPE or name not in scales):
            why = "no weight_scale beside it" if dtypes[name] == FP8_DTYPE else "only float8_e4m3fn is supported"
            raise WeightLoadError(f"{file}: tensor {name} is stored as {dtypes[name]} ({why})")
    return weights, {name: (file, scale) for name, (file, scale, _) in scales.items()}


def row_scales(scale: torch.Tensor, rows: int, shard: Shard | None) -> torch.Tensor:
    """A checkpoint scale (per tensor or per channel) as one float32 per row of the weight's `rows`, cut to the
    rows a tensor-parallel rank holds."""
    s = scale.float().reshape(-1)
    s = s.expand(rows) if s.numel() == 1 else s
    if shard is not None and shard.dim == 0:
        s = s[shard.start : shard.stop]
    return s.contiguous()


def fp8_storage(model: nn.Module, layout: Mapping[str, Slot], names: frozenset[str]) -> list[str]:
    """Make FP8 (still unallocated, on the meta device) every projection weight whose checkpoint tensors are all FP8
    (`names`); returns their parameter names. Other FP8 tensors (MoE experts, embeddings) are dequantized into
    their float parameters as they are copied (`copy_fp8`)."""
    tensors: dict[str, list[str]] = {}
    for name, slot in layout.items():
        tensors.setdefault(slot.param, []).append(name)
    made = []
    for param, ckpt in tensors.items():
        owner, _, attr = param.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and all(n in names for n in ckpt) and projection(owner, module):
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(torch.empty(old.shape, dtype=FP8, device=old.device), requires_grad=False))
            made.append(param)
    return made


def attach_scales(model: nn.Module, params: list[str]) -> None:
    """Give the FP8 parameters `params` (allocated now) their row scales, NaN until the checkpoint's are copied."""
    named = dict(model.named_parameters())
    for name in params:
        p = named[name]
        p.quant_scale = torch.full((p.shape[0],), float("nan"), dtype=torch.float32, device=p.device)  # type: ignore[attr-defined]


def copy_fp8(param: torch.Tensor, index: tuple[int | slice, ...], tensor: torch.Tensor, where: str) -> None:
    """Copy a checkpoint tensor into `param[index]` where either is FP8: FP8 bytes and row scales into an FP8
    parameter, or the dequantized values into a float one."""
    scale = getattr(tensor, "quant_scale", None)
    if param.dtype != FP8:
        param[index].copy_(dequantize_fp8(tensor, scale, param.dtype) if scale is not None else tensor)
        return
    if scale is None:
        raise WeightLoadError(f"{where} is not FP8, but the weight it is stacked into is")
    param[index].copy_(tensor)
    param.quant_scale[index[:1]].copy_(scale)  # type: ignore[attr-defined]


def finish_fp8(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Without FP8 matmuls on `device`, the checkpoint's FP8 weights are dequantized to `dtype` (one log line)."""
    if not fp8_native(device):
        count = dequantize_fp8_params(model, dtype)
        log_fallback(device, dtype, f"the checkpoint's {count} FP8 weights are dequantized to")
