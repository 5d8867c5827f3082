"""Allocator invariants: no block owned twice, ref counts never negative, free count returns to start."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_pool import BlockPool, OutOfBlocksError
from engine.kv_cache_manager import KVCacheManager


def test_allocate_free_roundtrip() -> None:
    pool = BlockPool(8)
    a = pool.allocate(5)
    assert pool.num_free == 3 and len(set(a)) == 5
    with pytest.raises(OutOfBlocksError):
        pool.allocate(4)
    pool.incref(a[:2])
    pool.free(a)
    assert pool.num_free == 6
    pool.free(a[:2])
    assert pool.num_free == 8
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0]])
    pool.check_invariants()


def test_manager_slots_follow_block_table() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate("r", 9)
    table = kv.block_table("r")
    assert len(table) == 3
    assert kv.slots("r", 3, 6) == [table[0] * 4 + 3, table[1] * 4 + 0, table[1] * 4 + 1]
    assert not kv.allocate("s", 29)  # 8 blocks needed, 7 free: refused, nothing taken
    assert kv.num_free_blocks == 7
    assert kv.free("r") == 3 and kv.num_free_blocks == 10


def test_build_batch_matches_per_token_construction() -> None:
    """The vectorised batch builder against the obvious per-token loop, on a mixed prefill/decode/draft batch."""
    import torch

    from engine.batch import BatchSeq, build_batch

    kv = KVCacheManager(num_blocks=40, block_size=4)
    seqs = [BatchSeq("a", 0, [5, 6, 7, 8, 9], 1), BatchSeq("b", 13, [3], 1), BatchSeq("c", 6, [1, 2, 3], 3),
            BatchSeq("d", 2, [4, 4], 0)]
    for s in seqs:
        assert kv.allocate(s.request_id, s.start + len(s.token_ids))
    kv.free("a")  # rows are reused: a fresh request takes a released row
    assert kv.allocate("a", 5)
    ids, pos, meta, logits_idx = build_batch(seqs, kv, torch.device("cpu"))
    assert ids.tolist() == [5, 6, 7, 8, 9, 3, 1, 2, 3, 4, 4]
    assert pos.tolist() == [0, 1, 2, 3, 4, 13, 6, 7, 8, 2, 3]
    want_slots = [sl for s in seqs for sl in kv.slots(s.request_id, s.start, s.start + len(s.token_ids))]
    assert meta.slot_mapping.tolist() == want_slots and meta.slot_mapping.dtype == torch.int64
    assert meta.query_start_loc.tolist() == [0, 5, 6, 9, 11] and meta.query_start_loc_cpu == [0, 5, 6, 9, 11]
    assert meta.seq_lens.tolist() == [5, 14, 9, 4] and meta.seq_lens.dtype == torch.int32
    assert logits_idx.tolist() == [4, 5, 6, 7, 8]
    assert (meta.max_query_len, meta.max_seq_len) == (5, 14)
    for i, s in enumerate(seqs):
        table = kv.block_table(s.request_id)
        assert meta.block_tables[i, : len(table)].tolist() == table


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / grow / share / free sequences keep the pool consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(num_blocks=24, block_size=4)
        self.sizes: dict[str, int] = {}
        self.shared: list[list[int]] = []
        self.next = 0

    @rule(tokens=st.integers(1, 40))
    def add(self, tokens: int) -> None:
        rid = f"r{self.next}"
        self.next += 1
        free = self.kv.num_free_blocks
        ok = self.kv.allocate(rid, tokens)
        assert ok == (-(-tokens // 4) <= free)
        if ok:
            self.sizes[rid] = tokens

    @precondition(lambda self: self.sizes)
    @rule(data=st.data(), more=st.integers(1, 20))
    def grow(self, data: st.DataObject, more: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sizes)))
        if self.kv.allocate(rid, self.sizes[rid] + more):
            self.sizes[rid] += more

    @precondition(lambda self: self.sizes)
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sizes)))
        blocks = list(self.kv.block_table(rid))
        self.kv.pool.incref(blocks)
        self.shared.append(blocks)

    @precondition(lambda self: self.sizes)
    @rule(data=st.data())
    def trim(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sizes)))
        keep = data.draw(st.integers(1, -(-self.sizes[rid] // 4)))
        self.kv.trim(rid, keep)
        self.sizes[rid] = min(self.sizes[rid], keep * 4)

    @precondition(lambda self: self.shared)
    @rule()
    def unshare(self) -> None:
        self.kv.pool.free(self.shared.pop())

    @precondition(lambda self: self.sizes)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sizes)))
        del self.sizes[rid]
        self.kv.free(rid)

    @invariant()
    def consistent(self) -> None:
        self.kv.pool.check_invariants()
        owned = [b for rid in self.sizes for b in self.kv.block_table(rid)]
        assert len(owned) == len(set(owned)), "a block is owned by two requests"
        for rid, n in self.sizes.items():
            assert len(self.kv.block_table(rid)) == -(-n // 4)

    def teardown(self) -> None:
        for blocks in self.shared:
            self.kv.pool.free(blocks)
        for rid in list(self.sizes):
            self.kv.free(rid)
        assert self.kv.num_free_blocks == 24


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
