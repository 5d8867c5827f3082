"""A serving process's garbage collector (engine/gc_heap.py): the start-up heap frozen, every pause timed; and the
decode worker's note of each output batch (decode_worker/subscriber.py), which shows where a token's gap grew."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from decode_worker.subscriber import Subscriber
from engine import gc_heap
from engine.engine import StepOutput
from engine.gc_heap import FREEZE_ENV, GCPauses, freeze_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's objects stay collectable for the tests after this one


def test_freeze_moves_every_live_object_out_of_collections(unfrozen: None) -> None:
    frozen = freeze_heap("test")
    # at least as many: a server an earlier test left running in this process may freeze its own start-up too (a
    # pytest-xdist worker's order of tests once put one 2 objects past this call's count)
    assert gc.get_freeze_count() >= frozen > 1000
    before = len(gc.get_objects())  # the permanent generation is not listed: what a full collection would walk
    gc.unfreeze()
    assert len(gc.get_objects()) > before + frozen // 2


def test_freeze_can_be_turned_off(unfrozen: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FREEZE_ENV, "0")
    assert freeze_heap("test") == 0 and gc.get_freeze_count() == 0


def test_pauses_are_counted_by_generation_and_long_ones_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_heap, "LONG_PAUSE_S", 0.0)  # every collection counts as long here
    pauses = GCPauses(keep=4).start()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.stop()
    s = pauses.stats
    assert s.gc_collections >= 2 and s.gc_full_collections >= 1
    assert 0 < s.gc_longest_pause_seconds <= s.gc_pause_seconds
    long = pauses.take_long()
    assert [p.generation for p in long][-2:] == [0, 2] and all(p.seconds > 0 for p in long)
    assert pauses.take_long() == []  # taken once
    gc.collect()  # stopped: nothing more is counted
    assert pauses.stats.gc_collections == s.gc_collections and pauses.take_long() == []


def test_the_long_pause_queue_is_bounded_when_nobody_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc_heap, "LONG_PAUSE_S", 0.0)
    pauses = GCPauses(keep=3).start()
    try:
        for _ in range(10):
            gc.collect(0)
    finally:
        pauses.stop()
    assert len(pauses.take_long()) == 3 and pauses.stats.gc_collections >= 10


def test_a_batch_note_says_how_long_its_outputs_waited_and_what_merged() -> None:
    notes: list[tuple[str, str, dict]] = []

    async def run() -> None:
        sub = Subscriber("router-a", lambda event, rid, **f: notes.append((event, rid, f)))
        batches = sub.batches()
        assert not (await anext(batches)).chunks  # the subscription's empty first batch
        sub.push(StepOutput("r1", [5], False))
        sub.push(StepOutput("r2", [6], False))
        sub.push(StepOutput("r1", [7], False))  # r1's next step before the stream took the outbox
        await asyncio.sleep(0.01)
        batch = await anext(batches)
        assert {c.request_id: list(c.token_ids) for c in batch.chunks} == {"r1": [5, 7], "r2": [6]}
        sub.push(StepOutput("r2", [8], True, "length"))
        await anext(batches)  # resuming the generator writes the first batch's note

    asyncio.run(run())
    assert len(notes) == 1
    event, rid, f = notes[0]
    assert (event, rid, f["chunks"], f["merged"]) == ("batch_sent", "router-a", 2, 1)
    assert f["wait_ms"] >= 10 and f["write_ms"] >= 0
