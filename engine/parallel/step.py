"""What rank 0 tells the other ranks: one message each time, a forward to run (a step) or a control request.

A step message is the compact description every rank rebuilds the same batch from: per sequence its first
position, token count and how many logits it wants; the token ids; the block-table rows; which CUDA graph (q) or
how many layers (a self-speculation draft) run; and how many leading token ids come from rank 0's device instead
(a step launched before the previous one's tokens reached the host, engine/lookahead.py: they follow as a
broadcast on the group). No sampling parameters (only rank 0 samples, from the gathered logits) and no Python
objects: one buffer of numbers, about 8 bytes per token plus 4 per block-table entry.

    int64 header[8]  kind, n_seqs, n_tokens, table_rows, table_cols, graph q (0: eager), num_layers (-1: all),
                     n_device_ids
    int64 starts[n_seqs], lens[n_seqs], num_logits[n_seqs], token_ids[n_tokens]
    int32 tables[table_rows, table_cols]

Control messages (graph capture, block copies, a call on every rank, stop) are the header's kind followed by a
pickled payload; they are rare and never part of a step.
"""

from __future__ import annotations

import itertools
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.batch import BatchSeq

STEP, CAPTURE, COPY, CALL, STOP = 1, 2, 3, 4, 5
_HEADER = 8


class StepTables:
    """A step's block-table rows (in sequence order) where the batch builders expect a KVCacheManager: they read
    `block_size` and `table_array.gather(request_ids)`."""

    def __init__(self, tables: np.ndarray, block_size: int) -> None:
        self.tables, self.block_size = tables, block_size
        self.table_array = self

    def gather(self, request_ids: list[str]) -> np.ndarray:
        assert len(request_ids) == self.tables.shape[0], "one table row per sequence of the step"
        return self.tables


@dataclass
class Step:
    """A decoded step message: what `ModelShard.logits` takes."""

    seqs: list[BatchSeq]
    tables: StepTables
    q: int | None  # the CUDA graph's tokens per sequence; None: eager
    num_layers: int | None  # layers to run; None: all
    n_device_ids: int  # leading token ids broadcast from rank 0's device


def encode_step(seqs: list[BatchSeq], tables: np.ndarray, q: int | None, num_layers: int | None,
                n_device_ids: int) -> bytes:
    n = len(seqs)
    lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
    total = int(lens.sum())
    header = np.array([STEP, n, total, tables.shape[0], tables.shape[1], q or 0,
                       -1 if num_layers is None else num_layers, n_device_ids], np.int64)
    ints = np.concatenate([
        header,
        np.fromiter((s.start for s in seqs), np.int64, n),
        lens,
        np.fromiter((s.num_logits for s in seqs), np.int64, n),
        np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int64, total),
    ])
    return ints.tobytes() + np.ascontiguousarray(tables, np.int32).tobytes()


def decode_step(buf: bytes, block_size: int) -> Step:
    head = np.frombuffer(buf, np.int64, _HEADER)
    kind, n, total, rows, cols, q, num_layers, n_ids = (int(x) for x in head)
    assert kind == STEP, f"not a step message (kind {kind})"
    ints = np.frombuffer(buf, np.int64, 3 * n + total, offset=_HEADER * 8)
    starts, lens, num_logits = ints[:n].tolist(), ints[n : 2 * n], ints[2 * n : 3 * n].tolist()
    ids = ints[3 * n :]
    tables = np.frombuffer(buf, np.int32, rows * cols, offset=(_HEADER + 3 * n + total) * 8).reshape(rows, cols)
    bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
    seqs = [BatchSeq(str(i), starts[i], ids[bounds[i] : bounds[i + 1]].tolist(), num_logits[i]) for i in range(n)]
    return Step(seqs, StepTables(tables, block_size), q or None, None if num_layers < 0 else num_layers, n_ids)


def encode_control(kind: int, payload: Any = None) -> bytes:
    return np.array([kind] + [0] * (_HEADER - 1), np.int64).tobytes() + pickle.dumps(payload)


def decode_control(buf: bytes) -> Any:
    return pickle.loads(buf[_HEADER * 8 :])


def message_kind(buf: bytes) -> int:
    return int(np.frombuffer(buf, np.int64, 1)[0])
