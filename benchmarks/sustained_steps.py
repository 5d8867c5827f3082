"""Prompt steps under sustained load against the profile's way of timing them (one prompt, then the device idle),
with the GPU's clocks and power beside them.

    python -m benchmarks.sustained_steps --out benchmarks/results/sustained_steps_h100.json      # GPU, 8B-shaped
    python -m benchmarks.sustained_steps --device cpu --tokens 256 --out ...                    # CPU, SmolLM2

Phases, in order: `burst` (a prompt every 0.5 s, as `disagg profile` times them), `sustained` (prompts back to
back), `duty` (back to back with a short pause after each, like a busy prefill worker), `burst_after` (the
profile's way again after a rest). On a GPU, `nvidia-smi` samples SM clock, power and throttle reasons every
250 ms meanwhile. Prints the median step per phase and the sustained phase by fifths; the JSON keeps every step.
Why: on an H100 serving 256 requests, prompt and mixed steps ran 5-12% over the profile's (benchmarks/RESULTS.md,
"256 requests on the H100").
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import time
from typing import Any

from benchmarks.profile_steps import Tokens, run_prompt
from benchmarks.profiler import build_engine, parse

SMI_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sustained_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (8B-shaped dummy) or cpu (SmolLM2)")
    p.add_argument("--dummy", default="", help="random weights of this shape (disagg profile's --dummy; default "
                   "llama3-8b-v49k on cuda, none on cpu: SmolLM2)")
    p.add_argument("--tokens", type=int, default=2048, help="prompt tokens of every step (default 2048)")
    p.add_argument("--sustained-s", type=float, default=25.0, help="seconds of back-to-back prompts")
    p.add_argument("--duty-s", type=float, default=10.0, help="seconds of prompts with a pause after each")
    p.add_argument("--pause-ms", type=float, default=50.0, help="the duty phase's pause")
    p.add_argument("--burst-s", type=float, default=3.0, help="seconds of each burst phase (a prompt every 0.5 s)")
    p.add_argument("--rest-s", type=float, default=5.0, help="idle seconds before the first burst and the last")
    p.add_argument("--kv-gib", type=float, default=0.0, help="KV cache, GiB (default 10 on cuda, 0.5 on cpu)")
    p.add_argument("--out", required=True, help="JSON output (nvidia-smi samples beside it, .csv)")
    return p


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median step per phase, and the sustained phase's by fifths (a drift shows as a rising list)."""
    summary: dict[str, Any] = {}
    for name in ("burst", "sustained", "duty", "burst_after"):
        ms = [r["ms"] for r in rows if r["phase"] == name]
        summary[name] = {"steps": len(ms), "ms_p50": round(statistics.median(ms), 3), "ms_max": max(ms)}
        print(f"{name:12s} {len(ms):4d} steps, p50 {summary[name]['ms_p50']:.2f} ms, max {max(ms):.2f} ms")
    sus = [r["ms"] for r in rows if r["phase"] == "sustained"]
    k = max(1, len(sus) // 5)
    summary["sustained_by_fifth_ms_p50"] = [round(statistics.median(sus[i:i + k]), 3) for i in range(0, len(sus), k)]
    print("sustained by fifth, p50 ms:", summary["sustained_by_fifth_ms_p50"])
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = build_parser().parse_args(argv)
    if a.tokens < 1 or min(a.sustained_s, a.duty_s, a.pause_ms, a.burst_s, a.rest_s, a.kv_gib) < 0:
        build_parser().error("--tokens must be at least 1 and the durations, --pause-ms and --kv-gib not negative")
    gpu = a.device.startswith("cuda")
    a.kv_gib = a.kv_gib or (10.0 if gpu else 0.5)
    a.dummy = a.dummy or ("llama3-8b-v49k" if gpu else "")
    model = ["--decode-batch", "1,8", *(["--dummy", a.dummy] if a.dummy else [])]
    e = parse(["--device", a.device, *model, "--kv-gib", str(a.kv_gib), "--prefill-tokens", str(a.tokens),
               "--out", a.out])
    eng, _ = build_engine(e)
    toks, ids, rows = Tokens(eng.model_config.vocab_size), itertools.count(), []
    for _ in range(3):  # kernels compiled, caches warm
        run_prompt(eng, f"w{next(ids)}", toks.take(a.tokens), a.device)
    t0 = time.monotonic()

    def phase(name: str, seconds: float, pause_s: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ms = run_prompt(eng, f"r{next(ids)}", toks.take(a.tokens), a.device)
            rows.append({"phase": name, "t_s": round(time.monotonic() - t0, 3), "ms": round(ms, 3)})
            time.sleep(pause_s)

    csv = os.path.splitext(a.out)[0] + ".csv"
    with open(csv, "w") if gpu else contextlib.nullcontext() as log:
        smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "250"],
                               stdout=log) if gpu else None
        try:
            time.sleep(a.rest_s)
            phase("burst", a.burst_s, 0.5)
            phase("sustained", a.sustained_s, 0.0)
            phase("duty", a.duty_s, a.pause_ms / 1e3)
            time.sleep(a.rest_s)
            phase("burst_after", a.burst_s, 0.5)
        finally:
            if smi is not None:
                smi.terminate()
                smi.wait()
    summary = summarize(rows)
    out = {"args": vars(a), "device": e.device, "summary": summary, "steps": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
