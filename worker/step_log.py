"""A worker's record of its engine steps, for benchmarks that hold a real cluster against the simulator.

With $DISAGG_STEP_LOG naming a folder, a worker appends one JSON line per step that ran the model to
`<folder>/<worker id>.jsonl`: when it started (`t`, Unix seconds, so the logs of a machine's workers line up), how
long it took (`ms`, the engine's `step` alone, on its executor thread), what it computed (`StepShape`: prompt
tokens, attention pairs, decode rows, their mean context) and how many requests were still running after it; and
where the time went: `sched_ms` until the step was scheduled, `launch_ms` queueing its model work (on a GPU the
kernel launches), `wait_ms` waiting for its results (for the device), `cpu_ms` the stepping
thread's CPU time (on a GPU the wait for the device spins, so `ms - cpu_ms` is time off the CPU: waiting for the
GIL, or preempted), `loop_cpu_ms` the CPU time of the thread that made the log (the serving loop's) meanwhile, and
`gc_ms` garbage collection meanwhile (any thread's).
Between them, event lines (`event`, `rid`, `t`) mark where a request's handoff stood (`note`): the prefill worker
answering the router with the KV's handle, and on the decode worker the pull's arrival, its reserved blocks and
its read done, so a benchmark can split the first gap (first token to second) into the router's relay, the wait
for a step's end, the read, and the step that decodes it.
benchmarks/sim_validate.py sets it for its real runs and compares each worker's steps with the profile's cost
model, apart and while the machine's other worker was in a step (what the simulator's sharing of cores has to
model), and the time between steps. Without it nothing is observed or written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO

from engine.engine import LLMEngine, StepOutput
from engine.gc_heap import GCPauses
from engine.stats import StepShape

STEP_LOG_ENV = "DISAGG_STEP_LOG"


class StepLog:
    """Times `engine.step` and writes each step's line (call `step` on the engine's thread)."""

    def __init__(self, engine: LLMEngine, path: str) -> None:
        self.engine = engine
        self._file: IO[str] = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()
        self._shape: StepShape | None = None
        self._lock = threading.Lock()  # steps are written from the engine's thread, events from the serving loop's
        self._loop_clock = time.pthread_getcpuclockid(threading.get_ident())  # the serving loop's thread's CPU clock
        self._scheduled = 0.0  # perf_counter when the step running now was scheduled
        self._gc = GCPauses().start()  # this process's collections, any thread's
        engine.observe_steps(self._observe)

    @classmethod
    def from_env(cls, engine: LLMEngine, worker_id: str) -> StepLog | None:
        folder = os.environ.get(STEP_LOG_ENV, "")
        if not folder:
            return None
        path = os.path.join(folder, f"{worker_id.replace('@', '-').replace('/', '-')}.jsonl")
        try:
            os.makedirs(folder, exist_ok=True)
            return cls(engine, path)
        except OSError as e:  # at start, before the worker serves: a clear reason rather than a traceback
            raise SystemExit(f"${STEP_LOG_ENV}={folder!r}: cannot write the step log {path!r}: {e.strerror}") from e

    def _observe(self, shape: StepShape) -> None:
        self._shape, self._scheduled = shape, time.perf_counter()

    def step(self) -> list[StepOutput]:
        t, start = time.time(), time.perf_counter()
        cpu, loop_cpu, gc_s = time.thread_time(), time.clock_gettime(self._loop_clock), self._gc.stats.gc_pause_seconds
        stats = self.engine.stats
        launch_s, wait_s = stats.launch_seconds, stats.wait_seconds
        out = self.engine.step()
        end = time.perf_counter()
        shape, self._shape = self._shape, None
        if shape is not None:  # a step that scheduled nothing ran no model
            self._write({"t": round(t, 6), "ms": _ms(end - start), "prompt_tokens": shape.prompt_tokens,
                         "pairs": shape.pairs, "decode_rows": shape.decode_rows,
                         "decode_context": round(shape.decode_context, 1), "prompts": shape.prompts,
                         "running_after": self.engine.load().num_running,
                         "sched_ms": _ms(self._scheduled - start), "launch_ms": _ms(stats.launch_seconds - launch_s),
                         "wait_ms": _ms(stats.wait_seconds - wait_s), "cpu_ms": _ms(time.thread_time() - cpu),
                         "loop_cpu_ms": _ms(time.clock_gettime(self._loop_clock) - loop_cpu),
                         "gc_ms": _ms(self._gc.stats.gc_pause_seconds - gc_s)})
        return out

    def note(self, event: str, rid: str, **fields: float | int) -> None:
        """An event of request `rid` now (any thread)."""
        self._write({"t": round(time.time(), 6), "event": event, "rid": rid, **fields})

    def _write(self, row: dict[str, object]) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.engine.observe_steps(None)
        self._gc.stop()
        with self._lock:
            self._file.close()


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def read_step_log(path: str) -> list[dict[str, float]]:
    """The steps of a worker's log."""
    return [r for r in _lines(path) if "event" not in r]


def read_step_events(path: str) -> list[dict[str, float | str]]:
    """The request events of a worker's log."""
    return [r for r in _lines(path) if "event" in r]


def _lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
