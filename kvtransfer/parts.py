"""Which bytes of a block a read moves: every layer or a layer range, and all of the shard's KV heads or a range.

A block of a KV cache is [num_layers, 2 (K, V), block_size, heads, head_dim]. A layer range is one contiguous run
of bytes within it. Between workers of different tensor-parallel sizes a rank's cache holds only some of the model's
KV heads, and a read moves a head range from the peer's shard into a head range of ours (engine/parallel/kv_heads.py
plans which): within a block that is one run per (layer, K/V, token), `length` bytes each, `stride` apart, at
different strides on the two sides when their shards are of different widths. A head range that is the shard's
whole width is one run again.

`HeadRanges` = (the peer's shard's heads [a, b), our shard's heads [c, d)), as offsets within each shard, with
b - a == d - c. Both sides of a read therefore move the same number of runs of the same length (`pair_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvtransfer.base import KVLayout

HeadRanges = tuple[tuple[int, int], tuple[int, int]]  # (remote shard's heads, local shard's heads), [start, stop)
MAPPABLE_FIELDS = ("block_size", "num_layers", "head_dim", "dtype")  # what two shards must share to move heads


@dataclass(frozen=True)
class BlockRuns:
    """`count` runs of `length` bytes within one block, the first at `offset`, each `stride` after the previous."""

    offset: int
    length: int
    stride: int
    count: int

    @property
    def nbytes(self) -> int:
        return self.length * self.count

    def split(self, count: int) -> BlockRuns:
        """The same bytes of a single run as `count` equal consecutive runs."""
        if count == self.count:
            return self
        assert self.count == 1 and self.length % count == 0, f"cannot split {self} into {count} runs"
        piece = self.length // count
        return BlockRuns(self.offset, piece, piece, count)

    def addresses(self, base: int, block_bytes: int, blocks: np.ndarray) -> np.ndarray:
        """Start address of every run of every block in `blocks` (block-major, runs in order), as uint64."""
        starts = base + blocks.astype(np.uint64) * np.uint64(block_bytes) + np.uint64(self.offset)
        runs = np.arange(self.count, dtype=np.uint64) * np.uint64(self.stride)
        return (starts[:, None] + runs[None, :]).reshape(-1)


def pair_runs(a: BlockRuns, b: BlockRuns) -> tuple[BlockRuns, BlockRuns]:
    """Both sides as the same number of runs of one length (a whole-width side is split to match the other)."""
    if a.count == b.count:
        return a, b
    return (a.split(b.count), b) if a.count == 1 else (a, b.split(a.count))


def block_runs(layout: KVLayout, layers: tuple[int, int] | None = None, heads: tuple[int, int] | None = None
               ) -> BlockRuns:
    """Where layers [l0, l1) (all for None) of heads [h0, h1) (the shard's all for None) lie in one block of a
    cache of `layout`; ValueError if a range lies outside it."""
    l0, l1 = layers or (0, layout.num_layers)
    width = layout.num_kv_heads
    h0, h1 = heads or (0, width)
    if not (0 <= l0 < l1 <= layout.num_layers and 0 <= h0 < h1 <= width):
        raise ValueError(f"layer range {(l0, l1)} or head range {(h0, h1)} is not within a block of "
                         f"{layout.num_layers} layers and {width} KV heads")
    head_bytes = layout.block_bytes // (layout.num_layers * 2 * layout.block_size * width)  # head_dim * itemsize
    token = width * head_bytes  # one token's heads, per layer and K/V
    count = (l1 - l0) * 2 * layout.block_size
    offset = l0 * 2 * layout.block_size * token + h0 * head_bytes
    length = (h1 - h0) * head_bytes
    if length == token:  # the shard's whole width: layers [l0, l1) are one contiguous run
        return BlockRuns(offset, length * count, length * count, 1)
    return BlockRuns(offset, length, token, count)


def check_shards(local: KVLayout, remote: KVLayout) -> None:
    """LayoutMismatchError unless the two caches can exchange head ranges (all but their widths agree)."""
    from kvtransfer.base import LayoutMismatchError

    diffs = [f"{f}: {getattr(local, f)!r} here vs {getattr(remote, f)!r} there" for f in MAPPABLE_FIELDS
             if getattr(local, f) != getattr(remote, f)]
    if diffs:
        raise LayoutMismatchError("KV layouts cannot exchange heads: " + "; ".join(diffs))


def check_mappable(local: KVLayout, remote: KVLayout, heads: HeadRanges | None) -> None:
    """LayoutMismatchError (a ValueError) unless a read of `heads` (None: whole shards, which must then match
    exactly) can move between caches of these layouts."""
    from kvtransfer.base import LayoutMismatchError

    if heads is None:
        local.check_compatible(remote)
        return
    check_shards(local, remote)
    (a, b), (c, d) = heads
    if b - a != d - c or not (0 <= a < b <= remote.num_kv_heads and 0 <= c < d <= local.num_kv_heads):
        raise LayoutMismatchError(f"head ranges {heads} do not fit shards of {remote.num_kv_heads} (there) and "
                                  f"{local.num_kv_heads} (here) heads")
