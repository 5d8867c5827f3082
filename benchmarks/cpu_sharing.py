"""What two worker processes sharing a CPU machine's cores cost each other, by thread count.

    python -m benchmarks.cpu_sharing --out benchmarks/results/cpu_sharing_DATE.json

One engine (real SmolLM2, fixed threads: 2 = every core of this VM, or 1) times a prefill of 512 tokens and a
decode step of 4 rows at context 256, alone and beside a second engine process that prefills 512-token prompts
back to back on 2 or 1 threads. engine/cpu_threads.py's adaptive rule picks every core for a step that starts
while the machine is idle and keeps them to the step's end, so "2 beside 1" is what a worker's long step meets
when the other worker wakes up meanwhile (the simulator's `co_run.oversubscribed_*`).

    python -m benchmarks.cpu_sharing --wake --out benchmarks/results/cpu_share_DATE.json

Both engines adaptive (floor 1, as `disagg serve` starts them), without and then with a CoreShare between them
(engine/cpu_threads.py), in the same run: "decode wakes" - this engine prefills 512 tokens, starting alone, and the
other starts a burst of decode steps (4 x 256) 150 ms in; "prefill wakes" - this engine decodes steps back to
back and the other prefills 512 tokens 150 ms in. Each against the same engine's figures alone; modes in the
order off, on, on, off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks.given_kv import receive_given_kv
from benchmarks.profile_steps import Tokens, _decode_once, run_prompt
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cpu_threads import SHARE_ENV
from engine.engine import LLMEngine
from engine.request import SamplingParams

WAKE_S, REPEATS, BURST = 0.15, 5, 16  # the other engine's wake-up into a step; scenarios per mode; decode steps


def engine(threads: int) -> LLMEngine:
    torch.set_num_threads(threads)
    return LLMEngine(EngineConfig(model="smollm2", device="cpu", dtype="float32", cpu_threads=threads,
                                  cache=CacheConfig(memory_budget_bytes=2**29),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)))


def adaptive_engine(share: str) -> LLMEngine:
    torch.set_num_threads(1)  # the floor: OMP_NUM_THREADS as `disagg serve` sets it on 2 cores
    return LLMEngine(EngineConfig(model="smollm2", device="cpu", dtype="float32", cpu_share=share,
                                  cache=CacheConfig(memory_budget_bytes=2**29),
                                  scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)))


def decode_steps(eng: LLMEngine, toks: Tokens, steps: int, before: Callable[[], None] = lambda: None) -> list[float]:
    """ms of each of `steps` decode steps of 4 rows at context 256, `before` called once they are set up."""
    rids = [f"d{i}-{time.monotonic_ns()}" for i in range(4)]
    for rid in rids:
        receive_given_kv(eng, rid, toks.take(256), SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True))
    before()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.step()
        times.append(round((time.perf_counter() - t0) * 1e3, 1))
    for rid in rids:
        eng.abort(rid)
    return times


def waker(share: str) -> None:
    """The other engine of `--wake`: runs `decode STEPS` or `prefill` from stdin WAKE_S after each line, printing
    its ms as a JSON list; prints "go" once it runs."""
    eng, toks = adaptive_engine(share), Tokens(49152)
    run_prompt(eng, "w", toks.take(32), "cpu")
    print("go", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "decode":
            out = decode_steps(eng, toks, int(cmd[1]), lambda: time.sleep(WAKE_S))
        else:
            time.sleep(WAKE_S)
            out = [round(run_prompt(eng, f"p{time.monotonic_ns()}", toks.take(512), "cpu"), 1)]
        print(json.dumps(out), flush=True)


def wake_mode(share: str) -> dict[str, object]:
    """One mode of `--wake` (share "" is off): alone, then both scenarios REPEATS times."""
    eng, toks = adaptive_engine(share), Tokens(49152)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_sharing", "--waker", share or "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None

    def other(cmd: str) -> None:
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()

    def quiet() -> None:  # a step that reads /proc, then a period with nothing running: the next step sees an
        run_prompt(eng, f"q{time.monotonic_ns()}", toks.take(8), "cpu")  # idle machine (not the last scenario)
        time.sleep(0.3)

    def settle() -> list[float]:
        out = json.loads(proc.stdout.readline())
        time.sleep(0.5)
        quiet()
        return out

    try:
        assert proc.stdout.readline().strip() == "go"
        run_prompt(eng, "w", toks.take(32), "cpu")
        prefill = []
        for i in range(3):
            quiet()
            prefill.append(run_prompt(eng, f"a{i}", toks.take(512), "cpu"))
        quiet()
        decode = decode_steps(eng, toks, BURST)
        quiet()
        a_prefill, a_steps, b_steps, b_prefill = [], [], [], []
        for i in range(REPEATS):
            other(f"decode {BURST}")
            a_prefill.append(round(run_prompt(eng, f"A{i}", toks.take(512), "cpu"), 1))
            a_steps += settle()
            b_steps += decode_steps(eng, toks, BURST, lambda: other("prefill"))
            b_prefill += settle()
    finally:
        proc.kill()
        proc.wait()
        eng.close()
    med = statistics.median
    return {"alone": {"prefill_ms": round(med(prefill), 1), "decode_step_ms": round(med(decode), 1)},
            "decode wakes": {"prefill_ms": a_prefill,
                             "other_decode_step_ms_median_max": [round(med(a_steps), 1), max(a_steps)]},
            "prefill wakes": {"decode_step_ms_median_p90_max": [round(med(b_steps), 1), _p90(b_steps), max(b_steps)],
                              "other_prefill_ms": b_prefill}}


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def wake(out: str) -> dict[str, object]:
    os.environ.pop(SHARE_ENV, None)  # "off" means no share, whatever launched this
    path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), f"cores-{os.getpid()}")
    load_before = os.getloadavg()
    try:  # off, on, on, off: a drift of the machine's load shows as a difference between the rounds
        modes = {f"share {m} ({i})": wake_mode(path if m == "on" else "")
                 for i, m in enumerate(["off", "on", "on", "off"], 1)}
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    result = {"what": "adaptive engines (floor 1) without / with a CoreShare; ms", "modes": modes,
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(json.dumps(result), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def co_runner(threads: int) -> None:
    """The second process: prefills back to back until killed; prints "go" once it runs."""
    eng, toks = engine(threads), Tokens(49152)
    run_prompt(eng, "w", toks.take(32), "cpu")
    print("go", flush=True)
    for i in range(10**9):
        run_prompt(eng, f"c{i}", toks.take(512), "cpu")


def measure(eng: LLMEngine, toks: Tokens) -> list[float]:
    pre = statistics.median(run_prompt(eng, f"m{time.monotonic_ns()}", toks.take(512), "cpu") for _ in range(3))
    dec = statistics.median(_decode_once(eng, toks, 4, 256, 8, "cpu") for _ in range(2))
    return [round(pre, 1), round(dec, 1)]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--co-runner", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--waker", default="", help=argparse.SUPPRESS)
    p.add_argument("--wake", action="store_true", help="adaptive threads without / with a CoreShare (see above)")
    p.add_argument("--out", default="", help="JSON to write")
    a = p.parse_args(argv)
    if a.co_runner:
        co_runner(a.co_runner)
    if a.waker:
        waker("" if a.waker == "-" else a.waker)
        return {}
    if a.wake:
        wake(a.out)
        return {}
    out: dict[str, list[float]] = {}
    for mine in (2, 1):
        eng, toks = engine(mine), Tokens(49152)
        run_prompt(eng, "w", toks.take(32), "cpu")
        out[f"{mine} alone"] = measure(eng, toks)
        for co in (2, 1):
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.cpu_sharing", "--co-runner", str(co)],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
                time.sleep(1)
                out[f"{mine} beside {co}"] = measure(eng, toks)
            finally:
                proc.kill()
                proc.wait()
    result = {"what": "[prefill 512 tokens ms, decode step 4 x 256 ms] by 'threads of this engine [beside threads of "
                      "a co-runner prefilling back to back]'", "ms": out, "load_average_after": os.getloadavg()}
    print(json.dumps(result), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return out


if __name__ == "__main__":
    main()
