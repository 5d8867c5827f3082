"""benchmarks/token_delivery.py on hand-made logs: a decode worker's output batches paired with their arrival at
the router, and the gaps of each request as sent and as received."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.token_delivery import delivery


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _logs(folder: Path, late_ms: list[float], other_worker: bool = False) -> None:
    """Batch i handed over at 8 ms x i carrying requests a (every batch) and b (from the second), arriving
    late_ms[i] later; a step line and a handoff event beside, as real logs have."""
    sent, got = [], []
    for i, late in enumerate(late_ms):
        handed = 100.0 + 0.008 * i
        reqs = ["a"] if i == 0 else ["a", "b"]
        sent.append({"t": handed + 0.0005, "event": "batch_sent", "rid": "router-x", "wait_ms": 0.1,
                     "write_ms": 0.5, "chunks": len(reqs), "merged": 0})
        got.append({"t": handed + late / 1e3, "event": "batch_received", "rid": "router-x",
                    "worker": "127.0.0.1:5", "requests": reqs})
    steps = [{"t": 99.0, "ms": 5.0, "prompt_tokens": 0, "pairs": 0.0, "decode_rows": 1, "decode_context": 9.0}]
    _write(folder / "decode-0.jsonl", steps + [{"t": 99.5, "event": "pull_read", "rid": "a"}] + sent)
    _write(folder / "router-7.jsonl", got)
    if other_worker:  # another subscriber's batches in another worker's log must not pair with these
        _write(folder / "decode-1.jsonl", [{**s, "rid": "router-y", "chunks": 9} for s in sent])


def test_batches_pair_in_order_and_the_gaps_they_add(tmp_path: Path) -> None:
    _logs(tmp_path, [1.0, 1.0, 26.0, 1.0, 1.0], other_worker=True)
    got = delivery(str(tmp_path), 0.0, 1e10)
    assert got is not None and got["batches"] == 5
    assert got["delivery_ms"]["p50"] == pytest.approx(1.0) and got["delivery_ms"]["max"] == pytest.approx(26.0)
    # As sent every gap is 8 ms; the late third batch makes one gap of 33 ms for each request (a: 4 gaps,
    # b: 3), and the next one 8 - 25 = -17 ms.
    assert got["gaps"] == 7 and got["sent_share_over"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert got["received_share_over"] == [pytest.approx(x, abs=1e-4) for x in (5 / 7, 2 / 7, 2 / 7, 2 / 7, 0.0)]
    # each request's own p99 gap: a's gaps 8, 33, -17, 8 ms (p99 32.25), b's 33, -17, 8 (p99 32.5); as sent 8 ms
    own = got["own_p99_gap_ms"]
    assert own["sent"] == {"requests": 2, "p50": 8.0, "p90": 8.0, "max": 8.0, "over": [2, 0, 0, 0, 0]}
    assert own["received"]["requests"] == 2 and own["received"]["max"] == pytest.approx(32.5, abs=0.01)
    assert own["received"]["over"] == [2, 2, 2, 2, 0]


def test_a_window_keeps_the_batches_received_in_it_and_no_router_log_gives_none(tmp_path: Path) -> None:
    _logs(tmp_path, [1.0] * 6)
    got = delivery(str(tmp_path), 100.015, 1e10)  # the last four batches
    assert got is not None and got["batches"] == 4
    (tmp_path / "router-7.jsonl").unlink()
    assert delivery(str(tmp_path), 0.0, 1e10) is None


def test_logs_that_disagree_on_the_chunks_do_not_pair(tmp_path: Path) -> None:
    _logs(tmp_path, [1.0] * 3)
    rows = [json.loads(x) for x in (tmp_path / "router-7.jsonl").read_text().splitlines()]
    rows[1]["requests"] = ["a"]  # the worker sent two chunks in that batch
    _write(tmp_path / "router-7.jsonl", rows)
    assert delivery(str(tmp_path), 0.0, 1e10) is None


def test_two_workers_sending_the_same_chunk_counts_pair_by_time(tmp_path: Path) -> None:
    _logs(tmp_path, [1.0] * 4)
    (tmp_path / "decode-0.jsonl").rename(tmp_path / "decode-2.jsonl")  # the real sender, read last
    sent = [json.loads(x) for x in (tmp_path / "decode-2.jsonl").read_text().splitlines()]
    # two other decode workers sent the same subscriber batches of the same counts: 40 ms later (after the
    # arrivals) and 30 ms earlier (long before them); neither is the sender
    _write(tmp_path / "decode-0.jsonl", [{**r, "t": r["t"] + 0.04} for r in sent if r.get("event") == "batch_sent"])
    _write(tmp_path / "decode-1.jsonl", [{**r, "t": r["t"] - 0.03} for r in sent if r.get("event") == "batch_sent"])
    got = delivery(str(tmp_path), 0.0, 1e10)
    assert got is not None and got["batches"] == 4 and got["delivery_ms"]["max"] == pytest.approx(1.0)


def test_requests_relayed_in_the_window_give_their_own_gaps(tmp_path: Path) -> None:
    _logs(tmp_path, [1.0] * 5)
    relay = [{"t": 100.1, "event": "tokens_relayed", "rid": "a", "times": [100.0, 100.01, 100.05, 100.1]},
             {"t": 200.0, "event": "tokens_relayed", "rid": "b", "times": [199.0, 200.0]}]  # ends after the window
    with open(tmp_path / "router-7.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in relay))
    got = delivery(str(tmp_path), 0.0, 150.0)
    assert got is not None and got["batches"] == 5  # the relay lines are no arrivals
    relayed = got["own_p99_gap_ms"]["relayed"]  # a's gaps 10, 40, 50 ms: p99 49.8
    assert relayed["requests"] == 1 and relayed["max"] == pytest.approx(49.8, abs=0.01)
    assert relayed["over"] == [1, 1, 1, 1, 0]
