"""The attention interface every backend implements, and the metadata it reads.

KV cache layout (one tensor per worker):

    kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

Block-major: everything one block holds, for every layer, K and V, is one
contiguous run of `num_layers * 2 * block_size * num_kv_heads * head_dim`
elements. Moving a request's KV between workers is then one descriptor per
block (not one per block per layer per K/V as with per-layer tensors), which
is what makes NIXL/TCP transfers few and large. A layer sees the strided view
`kv_cache[:, layer]` of shape [num_blocks, 2, block_size, kv_heads, head_dim].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for one forward pass over a flat token batch."""

    query_start_loc: torch.Tensor  # [B+1] int32: sequence b's new tokens are rows qsl[b]:qsl[b+1]
    seq_lens: torch.Tensor  # [B] int32: tokens with KV after this pass (context + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    max_query_len: int  # longest run of new tokens in the batch
    max_seq_len: int  # longest sequence in the batch
    query_start_loc_cpu: list[int]  # host copy, for backends that loop over sequences
    seq_lens_cpu: list[int]  # host copy

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding for one forward pass: rotate q and k of token t by `positions[t]`."""

    positions: torch.Tensor  # [T] int64
    cos: torch.Tensor  # [max_positions, head_dim] float32, 'rotate half' layout
    sin: torch.Tensor  # same shape


class AttentionBackend(ABC):
    """Rotates the new queries and keys (when `rope` is given), writes the new K/V into the paged cache, then
    attends causally over each sequence's context. Rotation belongs here so a backend may fuse it with the
    KV write (one launch per layer instead of two).

    window W (sliding-window layers): a query at position p sees keys p - W + 1 .. p only. A backend never
    reads the KV of a position before the window of the earliest query of its sequence in the batch, so block
    table entries wholly before it may name any block (or a freed one).
    softcap c: scores s = scale * q.k become c * tanh(s / c) before the softmax (Gemma 2)."""

    name: str = ""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim], one layer's view
        meta: AttentionMetadata,
        scale: float,
        rope: Rotary | None = None,  # None: q and k arrive already rotated (or use no rotary embedding)
        *,
        window: int | None = None,  # sliding window in keys (the query's own included); None: the whole context
        softcap: float | None = None,  # attention logit soft-cap; None: none
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...


_REGISTRY: dict[str, type[AttentionBackend]] = {}


def register_backend(name: str):  # noqa: ANN201 - decorator
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks triton on CUDA when it is importable, the torch reference otherwise."""
    import engine.attention.torch_ref  # noqa: F401 - registers "torch"

    if name == "auto":
        name = "torch"
        if device.type == "cuda":
            try:
                import engine.attention.triton_backend  # noqa: F401

                name = "triton"
            except ImportError:
                pass
    elif name == "triton":
        import engine.attention.triton_backend  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
