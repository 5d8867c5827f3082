"""How a worker's KV heads lie across its tensor-parallel ranks, and which rank feeds which when two workers of
different sizes move a request's KV.

Every rank keeps a KV cache of the same block-major layout (docs/architecture.md "KV cache layout") over its own
heads: rank r's cache is [num_blocks, num_layers, 2, block_size, heads of r, head_dim], and block b of every
rank holds the same tokens (one block table for the worker). Rank r holds the model's KV heads
`heads[r] = [start, stop)`: an equal share, or one head replicated on N / num_kv_heads ranks when there are
fewer KV heads than ranks (engine/models/parallel.py `kv_head_range`).

Between a prefill worker of P ranks and a decode worker of D ranks, `plan_head_copies` says, for every decode
rank, which prefill rank holds each of its heads and where they sit in both shards. With equal layouts rank r
reads rank r's whole blocks; otherwise a decode rank reads a head range of each block, for every layer (or a
layer group): `head_runs` gives that as strided runs of bytes within a block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig
from engine.models.parallel import kv_head_range


@dataclass(frozen=True)
class KVHeadLayout:
    """The KV caches of one worker's ranks: what a handshake carries so the other side can plan its reads."""

    num_kv_heads: int  # the model's KV heads
    heads: tuple[tuple[int, int], ...]  # per rank, the model's KV heads [start, stop) its shard holds, in order
    num_layers: int
    block_size: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    num_blocks: int  # blocks in each rank's cache (the same on every rank)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(tuple(h) for h in self.heads))
        if not self.heads or any(not 0 <= a < b <= self.num_kv_heads for a, b in self.heads):
            raise ValueError(f"head ranges {self.heads} do not lie within {self.num_kv_heads} KV heads")
        if {h for a, b in self.heads for h in range(a, b)} != set(range(self.num_kv_heads)):
            raise ValueError(f"head ranges {self.heads} do not cover all {self.num_kv_heads} KV heads")

    @classmethod
    def of(cls, num_kv_heads: int, tp_size: int, num_layers: int, block_size: int, head_dim: int, dtype: str,
           num_blocks: int) -> KVHeadLayout:
        heads = tuple(kv_head_range(num_kv_heads, r, tp_size) for r in range(tp_size))
        return cls(num_kv_heads, heads, num_layers, block_size, head_dim, dtype, num_blocks)

    @property
    def tp_size(self) -> int:
        return len(self.heads)

    def local_heads(self, rank: int) -> int:
        a, b = self.heads[rank]
        return b - a

    def shard_shape(self, rank: int) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.local_heads(rank), self.head_dim)

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    def block_bytes(self, rank: int) -> int:
        """Bytes of one block of rank's cache (every layer, K and V, its heads)."""
        return self.num_layers * 2 * self.block_size * self.local_heads(rank) * self.head_dim * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (for a handshake message); `from_dict` reads them back."""
        return {**asdict(self), "heads": [list(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVHeadLayout:
        return cls(**{**d, "heads": tuple(tuple(h) for h in d["heads"])})


def kv_layout(config: EngineConfig, model: ModelConfig, num_blocks: int) -> KVHeadLayout:
    """The layout of an engine of this config and model shape."""
    return KVHeadLayout.of(model.num_kv_heads, config.tensor_parallel_size, model.num_layers,
                           config.cache.block_size, model.head_dim, config.dtype, num_blocks)


@dataclass(frozen=True)
class HeadCopy:
    """Heads [heads) of the model move from src_rank's shard (local heads src_heads) to dst_rank's (dst_heads)."""

    src_rank: int
    src_heads: tuple[int, int]  # [start, stop) within the source rank's shard
    dst_rank: int
    dst_heads: tuple[int, int]  # [start, stop) within the destination rank's shard
    heads: tuple[int, int]  # the model's KV heads

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]


def check_compatible(src: KVHeadLayout, dst: KVHeadLayout) -> None:
    """ValueError naming every field two workers' KV must agree on but do not."""
    diffs = [f"{k}: {getattr(src, k)!r} vs {getattr(dst, k)!r}"
             for k in ("num_kv_heads", "num_layers", "block_size", "head_dim", "dtype") if getattr(src, k) != getattr(dst, k)]
    if diffs:
        raise ValueError("KV layouts cannot map onto each other: " + "; ".join(diffs))


def plan_head_copies(src: KVHeadLayout, dst: KVHeadLayout) -> list[HeadCopy]:
    """Per destination rank (in order), the copies that fill all its heads, each from one source rank. A head
    several source ranks hold (replicated) is read from the replica `dst_rank % replicas`, so destination ranks
    spread their reads; consecutive heads from one source rank form one copy."""
    check_compatible(src, dst)
    plan: list[HeadCopy] = []
    for d, (d0, d1) in enumerate(dst.heads):
        run: list[int] | None = None  # [src rank, first head, end head]
        for h in range(d0, d1):
            holders = [r for r, (a, b) in enumerate(src.heads) if a <= h < b]
            s = holders[d % len(holders)]
            if run is not None and run[0] == s and run[2] == h:
                run[2] = h + 1
                continue
            if run is not None:
                plan.append(_copy(src, dst, d, *run))
            run = [s, h, h + 1]
        assert run is not None
        plan.append(_copy(src, dst, d, *run))
    return plan


def _copy(src: KVHeadLayout, dst: KVHeadLayout, d: int, s: int, h0: int, h1: int) -> HeadCopy:
    sa, da = src.heads[s][0], dst.heads[d][0]
    return HeadCopy(s, (h0 - sa, h1 - sa), d, (h0 - da, h1 - da), (h0, h1))


@dataclass(frozen=True)
class BlockRuns:
    """Strided byte runs within one block of a rank's cache: `count` runs of `length` bytes, the first at
    `offset`, each `stride` after the previous (a single run when the heads are all of the shard's)."""

    offset: int
    length: int
    stride: int
    count: int


def head_runs(layout: KVHeadLayout, rank: int, heads: tuple[int, int], layers: tuple[int, int] | None = None
              ) -> BlockRuns:
    """Where local heads [heads) of layers [layers) (all when None) lie in a block of rank's cache: one run per
    (layer, K/V, token), or one run in all when the heads are the shard's whole width."""
    l0, l1 = layers or (0, layout.num_layers)
    h0, h1, width = heads[0], heads[1], layout.local_heads(rank)
    if not (0 <= h0 < h1 <= width and 0 <= l0 < l1 <= layout.num_layers):
        raise ValueError(f"heads {heads} / layers {(l0, l1)} outside rank {rank}'s shard {layout.shard_shape(rank)}")
    token = width * layout.head_dim * layout.itemsize  # bytes of one token's heads, per layer and K/V
    count = (l1 - l0) * 2 * layout.block_size
    offset = l0 * 2 * layout.block_size * token + h0 * layout.head_dim * layout.itemsize
    length = (h1 - h0) * layout.head_dim * layout.itemsize
    if length == token:
        return BlockRuns(offset, length * count, length * count, 1)
    return BlockRuns(offset, length, token, count)


@dataclass
class RankKV:
    """What a function run on every rank (`LLMEngine.run_on_ranks`) gets: its rank, the worker's layout, this
    rank's KV cache shard, and a dict kept as long as the rank lives (for what the function creates, such as a
    transfer agent registered on the shard)."""

    rank: int
    layout: KVHeadLayout
    kv_cache: torch.Tensor  # this rank's shard: layout.shard_shape(rank)
    state: dict[str, Any] = field(default_factory=dict)


# ---- moving KV by a plan with plain tensor copies (tests, and a reference for transfer backends) ---------------
def read_blocks(ctx: RankKV, block_ids: Sequence[int]) -> torch.Tensor:
    """This rank's KV of these blocks, [len(block_ids), num_layers, 2, block_size, its heads, head_dim], on the CPU."""
    return ctx.kv_cache[torch.tensor(list(block_ids), dtype=torch.long, device=ctx.kv_cache.device)].cpu()


def write_blocks(ctx: RankKV, block_ids: Sequence[int], per_rank: Sequence[torch.Tensor]) -> None:
    """Write `per_rank[ctx.rank]` (as `read_blocks` returns it) into these blocks of this rank's cache."""
    idx = torch.tensor(list(block_ids), dtype=torch.long, device=ctx.kv_cache.device)
    ctx.kv_cache.index_copy_(0, idx, per_rank[ctx.rank].to(ctx.kv_cache.device))


def regroup(src: KVHeadLayout, dst: KVHeadLayout, src_blocks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The same blocks (every source rank's `read_blocks`) split as the destination's ranks hold them."""
    n = src_blocks[0].shape[0]
    out = [src_blocks[0].new_empty(n, *dst.shard_shape(r)[1:]) for r in range(dst.tp_size)]
    for c in plan_head_copies(src, dst):
        out[c.dst_rank][..., c.dst_heads[0] : c.dst_heads[1], :] = \
            src_blocks[c.src_rank][..., c.src_heads[0] : c.src_heads[1], :]
    return out
