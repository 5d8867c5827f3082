"""Request traces on disk: read Mooncake JSON lines, Azure CSV or this project's CSV; write this project's CSV.

Every reader returns (arrival seconds from the first request, input lengths, output lengths), sorted by time.
"""

from __future__ import annotations

import csv
import datetime
import json
from collections.abc import Iterable

from engine.config import ConfigError

Chunk = tuple[list[float], list[int], list[int]]
HEADER = ("timestamp", "input_length", "output_length")


def read_trace(path: str, time_scale: float = 1.0, start_s: float = 0.0, duration_s: float = 0.0) -> Chunk:
    """The trace's requests; `time_scale` > 1 replays it faster; `start_s` / `duration_s` cut a window of it."""
    rows = _read_jsonl(path) if path.endswith((".jsonl", ".json")) else _read_csv(path)
    if not rows:
        raise ConfigError(f"{path}: no requests")
    rows.sort()
    t0 = rows[0][0]
    out: Chunk = ([], [], [])
    for t, n_in, n_out in rows:
        s = (t - t0) / time_scale - start_s
        if s < 0 or (duration_s and s >= duration_s):
            continue
        out[0].append(s)
        out[1].append(max(1, int(n_in)))
        out[2].append(max(1, int(n_out)))
    return out


def trace_chunks(path: str, time_scale: float = 1.0, start_s: float = 0.0, duration_s: float = 0.0) -> list[Chunk]:
    """`read_trace` as the one chunk `Cluster.run` takes (a picklable callable for simulator/fleet.py)."""
    return [read_trace(path, time_scale, start_s, duration_s)]


def write_trace(path: str, chunks: Iterable[Chunk]) -> int:
    """This project's CSV (seconds, input tokens, output tokens); returns the number of requests written."""
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for times, prompts, outputs in chunks:
            for t, p, o in zip(times, prompts, outputs, strict=True):
                w.writerow((f"{t:.6f}", p, o))
                n += 1
    return n


def _read_jsonl(path: str) -> list[tuple[float, int, int]]:
    """Mooncake: timestamp in milliseconds, input_length, output_length (hash_ids ignored: no prefix caching)."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rows.append((float(d["timestamp"]) / 1e3, int(d["input_length"]), int(d["output_length"])))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{path}:{i + 1}: expected timestamp (ms), input_length, output_length: {e}") from None
    return rows


def _read_csv(path: str) -> list[tuple[float, int, int]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= fields:  # Azure LLM inference traces
            return [(_seconds(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in reader]
        if set(HEADER) <= fields:
            return [(float(r["timestamp"]), int(r["input_length"]), int(r["output_length"])) for r in reader]
    raise ConfigError(f"{path}: CSV needs columns {', '.join(HEADER)} (seconds) or Azure's "
                      "TIMESTAMP, ContextTokens, GeneratedTokens")


def _seconds(stamp: str) -> float:
    """An Azure timestamp ('2023-11-16 18:15:46.6805900') as POSIX seconds (fractions beyond microseconds cut)."""
    head, _, frac = stamp.strip().partition(".")
    when = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return when.timestamp() + (float("0." + frac) if frac else 0.0)
