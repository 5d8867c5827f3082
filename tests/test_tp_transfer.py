"""KV transfer between workers of different tensor-parallel sizes: the handshake's layouts on the wire, and the
rule that a pull never moves part of a request's heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from decode_worker.kv_pull import KVUnmappable, check_mappable
from engine.config import CacheConfig
from engine.parallel.kv_heads import KVHeadLayout, head_runs
from engine.request import SamplingParams
from kvtransfer import KVLayout, LayoutMismatchError, LocalFabric, TransferStatus
from kvtransfer.parts import BlockRuns, block_runs, pair_runs
from proto.convert import kv_heads_from_proto, kv_heads_to_proto
from tests.kvtransfer_peer import make_agent, wait_done
from tests.test_tp_engine import PROMPTS, make
from worker.kv_agents import WorkerAgents


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
def test_every_decode_head_has_a_source(local: int, remote: int) -> None:
    plan = check_mappable(smollm2(local) if local != 2 else KVHeadLayout.of(2, 2, 30, 16, 64, "float32", 9),
                          smollm2(remote) if remote != 2 else KVHeadLayout.of(2, 2, 30, 16, 64, "float32", 9), "p")
    assert sum(c.num_heads for c in plan) == (3 if local != 2 else 2)


def test_guard_refuses_workers_of_different_models() -> None:
    other = KVHeadLayout.of(3, 3, 24, 16, 64, "float32", 100)
    with pytest.raises(KVUnmappable, match="num_layers: 24 vs 30"):
        check_mappable(smollm2(1), other, "prefill-0")


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


# ---- one agent per rank: real rank processes (slow tier) --------------------------------------------------------
def _agents(eng, backend: str, name: str):  # noqa: ANN001, ANN202
    return WorkerAgents.start(eng, backend, name, {})


def _peer_agents(agents) -> list[tuple[str, bytes]]:  # noqa: ANN001
    return [(agents.name, agents.metadata())] + [(a.name, a.metadata) for a in agents.rank_agents()]


def _pull(src, dst, src_agents, dst_agents, rid: str) -> list[int]:  # noqa: ANN001
    """Prefill the prompt on `src` under a lease, read its KV into `dst` through the agents (one per rank, head
    ranges by the plan), decode there; the whole output."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    src.add_request(rid, PROMPTS[3], params, lease_s=60)
    first = [t for _ in range(50) if src.has_unfinished() for so in src.step() for t in so.new_token_ids]
    lease = src.lease(rid)
    res = dst.receive_kv(dst.make_request(rid, PROMPTS[3], params, output_token_ids=first), len(PROMPTS[3]), 30)
    assert lease is not None and res is not None and not res.num_cached_blocks
    read = dst_agents.start_read(src_agents.name, lease.block_ids, res.blocks_to_fill, tag=rid)
    assert dst_agents.wait(read, 30) is TransferStatus.DONE, read.error
    dst_agents.release(read)
    assert len(read.parts) == 2  # 2 -> 1: rank 0 reads a head from each; 1 -> 2 and 2 -> 2: one part per rank
    assert src.release_lease(rid)
    dst.kv_received(rid)
    out = [t for _ in range(50) if dst.has_unfinished() for so in dst.step() for t in so.new_token_ids]
    return first + out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_rank_agents_move_kv_between_engines_of_different_sizes(tiny_llama_dir: str, backend: str) -> None:
    """Prefill 2 ranks -> decode 1, 1 -> 2 and 2 -> 2 (rank r <- rank r, whole blocks): each equals a local run."""
    cache = CacheConfig(num_blocks=64, enable_prefix_caching=False)  # every pull reads the whole prompt
    one, two, other = (make(tiny_llama_dir, tp, cache=cache) for tp in (1, 2, 2))
    agents = {n: _agents(e, backend, f"{backend}-{n}") for n, e in (("one", one), ("two", two), ("other", other))}
    try:
        assert len(agents["two"].rank_agents()) == 1
        for a, b in (("one", "two"), ("two", "one"), ("two", "other")):
            agents[b].add_peer(agents[a].name, {"one": one, "two": two, "other": other}[a].kv_layout(),
                               _peer_agents(agents[a]))
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        one.add_request("local", PROMPTS[3], params)
        local = [t for _ in range(50) if one.has_unfinished() for so in one.step() for t in so.new_token_ids]
        assert _pull(two, one, agents["two"], agents["one"], "2to1") == local
        assert _pull(one, two, agents["one"], agents["two"], "1to2") == local
        assert _pull(two, other, agents["two"], agents["other"], "2to2") == local
        abort_mid_read(two, other, agents["two"], backend)
        for e in (one, two, other):
            assert e.load().kv_blocks_free == 64
    finally:
        for a in agents.values():
            a.close()
        two.close()
        other.close()


def abort_mid_read(src, dst, src_agents, backend: str) -> None:  # noqa: ANN001
    """A pull whose parts hang on both decode ranks, aborted: the request ends at once, its blocks stay out of the
    pool (quarantine) until every rank's part is released, then all of them come back; the prefill's lease too."""
    hang = WorkerAgents.start(dst, backend, f"{backend}-hang", {"fault": "hang"})
    try:
        hang.add_peer(src_agents.name, src.kv_layout(), _peer_agents(src_agents))
        params = SamplingParams(max_tokens=4, temperature=0)
        src.add_request("ab", PROMPTS[2], params, lease_s=60)
        first = [t for _ in range(50) if src.has_unfinished() for so in src.step() for t in so.new_token_ids]
        lease = src.lease("ab")
        res = dst.receive_kv(dst.make_request("ab", PROMPTS[2], params, output_token_ids=first), len(PROMPTS[2]), 30)
        assert lease is not None and res is not None
        read = hang.start_read(src_agents.name, lease.block_ids, res.blocks_to_fill, tag="ab")
        assert len(read.parts) == 2 and hang.wait(read, 0.5) is TransferStatus.PENDING
        assert dst.abort("ab")  # the client went away mid-pull
        assert dst.load().kv_blocks_free == 64 - len(res.block_ids), "quarantined while the parts may write"
        hang.release(read)  # every rank's part stopped
        dst.kv_failed("ab")
        assert dst.load().kv_blocks_free == 64
        assert src.release_lease("ab")
    finally:
        hang.close()
