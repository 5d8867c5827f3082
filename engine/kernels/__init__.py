"""Triton kernels for the engine's hot paths, each with a pure-torch twin (`<name>_ref`) it is tested against.

Importing this package imports triton; it needs no GPU (tests run the kernels under TRITON_INTERPRET=1 on CPU tensors).
"""

from engine.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from engine.kernels.kv_write import write_kv, write_kv_ref
from engine.kernels.moe import fused_moe, fused_moe_ref, moe_route, moe_route_ref
from engine.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from engine.kernels.rmsnorm import fused_add_rmsnorm, fused_add_rmsnorm_ref, qk_rms_norm, qk_rms_norm_ref

__all__ = [
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_ref",
    "fused_moe",
    "fused_moe_ref",
    "moe_route",
    "moe_route_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "qk_rms_norm",
    "qk_rms_norm_ref",
    "write_kv",
    "write_kv_ref",
]
