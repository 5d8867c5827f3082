"""KV transfer between workers of different tensor-parallel sizes: the handshake's layouts on the wire, and the
rule that a pull never moves part of a request's heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_worker.kv_pull import KVUnmappable, check_mappable
from engine.parallel.kv_heads import KVHeadLayout, head_runs
from kvtransfer import KVLayout, LayoutMismatchError, LocalFabric, TransferStatus
from kvtransfer.parts import BlockRuns, block_runs, pair_runs
from proto.convert import kv_heads_from_proto, kv_heads_to_proto
from tests.kvtransfer_peer import make_agent, wait_done


def smollm2(tp: int) -> KVHeadLayout:
    return KVHeadLayout.of(3, tp, 30, 16, 64, "float32", 100)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_kv_head_layout_crosses_the_wire(tp: int) -> None:
    layout = KVHeadLayout.of(3 if tp != 2 else 2, tp, 30, 16, 64, "bfloat16", 77)
    assert kv_heads_from_proto(kv_heads_to_proto(layout)) == layout


def test_a_truncated_layout_is_refused() -> None:
    m = kv_heads_to_proto(smollm2(3))
    del m.heads[-1]
    with pytest.raises(ValueError, match="cover"):
        kv_heads_from_proto(m)


def test_guard_refuses_a_peer_that_does_not_describe_its_ranks() -> None:
    with pytest.raises(KVUnmappable, match="does not describe"):
        check_mappable(smollm2(1), None, "prefill-0")


@pytest.mark.parametrize("local, remote", [(1, 3), (3, 1), (2, 2)])
def test_guard_refuses_tensor_parallel_pairs_the_transfer_cannot_map(local: int, remote: int) -> None:
    """Equal sizes included: rank 0's shards agree field for field, yet a pull through rank 0's agent alone would
    move a third (a half) of the heads."""
    lay = (lambda tp: KVHeadLayout.of(2, tp, 30, 16, 64, "float32", 100)) if 2 in (local, remote) else smollm2
    with pytest.raises(KVUnmappable, match="tensor-parallel"):
        check_mappable(lay(local), lay(remote), "prefill-0")
    check_mappable(lay(1), lay(1), "prefill-0")


# ---- head-range reads between shards of different widths (every backend that moves bytes here) -------------------
def shard(heads: int, seed: int | None, blocks: int = 12) -> torch.Tensor:
    """[blocks, 3 layers, 2, block_size 4, heads, head_dim 8] float16: random from `seed`, zeros for None."""
    shape = (blocks, 3, 2, 4, heads, 8)
    if seed is None:
        return torch.zeros(shape, dtype=torch.float16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).half()


@pytest.mark.parametrize("rank", [0, 2])
def test_block_runs_match_the_engines_head_runs(rank: int) -> None:
    """kvtransfer's runs (from one shard's KVLayout) are the engine's (from the worker's head layout)."""
    eng = KVHeadLayout.of(3, 1, 30, 16, 64, "float32", 10)
    layout = KVLayout.from_cache(torch.zeros(1, 30, 2, 16, 3, 64))
    for heads, layers in [((rank, rank + 1), None), ((0, 3), (4, 9)), ((1, 3), (29, 30))]:
        r = head_runs(eng, 0, heads, layers)
        assert block_runs(layout, layers, heads) == BlockRuns(r.offset, r.length, r.stride, r.count)
    narrow = KVLayout.from_cache(torch.zeros(1, 30, 2, 16, 1, 64))  # a one-head shard: its layer is one run
    one, many = block_runs(narrow, (2, 3), None), block_runs(layout, (2, 3), (1, 2))
    a, b = pair_runs(one, many)
    assert (a.count, a.length) == (b.count, b.length) and a.nbytes == one.nbytes


@pytest.mark.parametrize("backend", ["local", "tcp", "nixl"])
@pytest.mark.parametrize("widths, heads, layers", [
    ((1, 3), ((0, 1), (2, 3)), None),  # a narrow prefill rank's one head into a wide decode rank
    ((3, 1), ((1, 2), (0, 1)), (1, 3)),  # one head of a wide shard into a narrow one, a layer group only
    ((2, 3), ((0, 2), (1, 3)), (0, 1)),
])
def test_head_range_reads(backend: str, widths: tuple[int, int], heads, layers) -> None:  # noqa: ANN001
    """Exactly those heads of those layers land; every other byte of the reader's cache stays as it was."""
    fabric = LocalFabric()
    owner = make_agent(backend, f"hr-owner-{backend}", shard(widths[0], 1), fabric=fabric)
    reader = make_agent(backend, f"hr-reader-{backend}", shard(widths[1], None), fabric=fabric)
    try:
        reader.add_remote("owner", owner.metadata())
        remote, local = np.array([3, 7, 0]), np.array([5, 1, 11])
        h = reader.start_read("owner", remote, local, tag="hr#1", layers=layers, heads=heads)
        assert wait_done(reader, [h]) == [TransferStatus.DONE], h.error
        reader.release(h)
        (a, b), (c, d) = heads
        l0, l1 = layers or (0, 3)
        want = torch.zeros_like(reader.kv_cache)
        want[local, l0:l1, :, :, c:d] = owner.kv_cache[remote, l0:l1, :, :, a:b]
        assert torch.equal(reader.kv_cache, want)
        assert h.nbytes == 3 * (l1 - l0) * 2 * 4 * (b - a) * 8 * 2
    finally:
        reader.close()
        owner.close()


@pytest.mark.parametrize("backend", ["local", "tcp", "nixl"])
def test_whole_block_reads_between_shards_of_different_widths_fail(backend: str) -> None:
    """Without head ranges two shards must match exactly: a whole-block read of another width fails, never
    copying bytes of the wrong shape."""
    fabric = LocalFabric()
    owner = make_agent(backend, f"hw-owner-{backend}", shard(1, 1), fabric=fabric)
    reader = make_agent(backend, f"hw-reader-{backend}", shard(3, None), fabric=fabric)
    try:
        reader.add_remote("owner", owner.metadata())
        h = reader.start_read("owner", [0], [0], tag="hw")
        assert wait_done(reader, [h]) == [TransferStatus.FAILED]
        assert "num_kv_heads: 3 here vs 1 there" in (h.error or "")
        reader.release(h)
        with pytest.raises(ValueError, match="differ in size"):
            reader.start_read("owner", [0], [0], tag="hw2", heads=((0, 1), (0, 2)))
        assert not reader.kv_cache.any()
    finally:
        reader.close()
        owner.close()


def test_head_reads_need_the_same_block_shape() -> None:
    fabric = LocalFabric()
    owner = make_agent("local", "hb-owner", torch.zeros(4, 3, 2, 8, 1, 8, dtype=torch.float16), fabric=fabric)
    reader = make_agent("local", "hb-reader", shard(3, None), fabric=fabric)
    try:
        with pytest.raises(LayoutMismatchError, match="block_size: 4 here vs 8 there"):
            reader.add_remote("owner", owner.metadata())
    finally:
        reader.close()
        owner.close()
