"""guidellm (the vLLM project's load generator) and `disagg bench` against one server at the same load.

Both send streamed completions of --prompt-tokens synthetic tokens and force --output-tokens (ignore_eos) with
--streams requests in flight, --requests in all; the script prints and writes (--out, JSON) each tool's TTFT and
ITL (median and p90, ms), its successful and failed requests, and the ratio of the two tools' figures. guidellm
needs its own virtualenv (it pulls torch, pandas and pyarrow): --guidellm or $GUIDELLM names its executable.

    python -m benchmarks.guidellm_compare --url http://127.0.0.1:8000 --guidellm /path/to/venv/bin/guidellm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving import RequestResult, make_prompts, one_request, percentile


def save_tokenizer(folder: Path) -> str:
    """SmolLM2's tokenizer as an HF folder, for guidellm's synthetic prompts (it cannot reach a hub)."""
    from transformers import PreTrainedTokenizerFast

    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.special_tokens.get("eos_token"),
                            bos_token=tok.special_tokens.get("bos_token")).save_pretrained(folder)
    return str(folder)


def run_guidellm(exe: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "guidellm.json"
    cmd = [exe, "run",
           "--backend", f"kind=openai_http,target={a.url},model={a.model},request_format=/v1/completions",
           "--profile", f"kind=concurrent,streams={a.streams}",
           "--constraint", f"kind=max_requests,count={a.requests}",
           "--data", f"kind=synthetic_text,prompt_tokens={a.prompt_tokens},output_tokens={a.output_tokens}",
           "--tokenizer", f"kind=huggingface_auto,model={save_tokenizer(work / 'tokenizer')}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    # guidellm's worker processes: its default is one per stream (up to 10), each a Python process with its own
    # event loop; on a small machine they take the CPU the server needs, so by default one, like the bench's client.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GUIDELLM__MAX_WORKER_PROCESSES": str(getattr(a, "guidellm_processes", 1))}
    subprocess.run(cmd, check=True, env=env, timeout=a.timeout)
    return guidellm_figures(json.loads(out.read_text()))


def guidellm_figures(report: dict[str, Any]) -> dict[str, Any]:
    """TTFT / ITL (ms, successful requests) and request counts from guidellm's JSON report (its first benchmark)."""
    metrics = report["benchmarks"][0]["metrics"]

    def stat(name: str, p: str) -> float:
        return float(metrics[name]["successful"]["percentiles"][p])

    totals = metrics["request_totals"]
    return {"ttft_p50_ms": stat("time_to_first_token_ms", "p50"), "ttft_p90_ms": stat("time_to_first_token_ms", "p90"),
            "itl_p50_ms": stat("inter_token_latency_ms", "p50"), "itl_p90_ms": stat("inter_token_latency_ms", "p90"),
            "successful": int(totals["successful"]), "errored": int(totals["errored"]),
            "incomplete": int(totals["incomplete"])}


async def _closed_loop(a: argparse.Namespace) -> list[RequestResult]:
    """--requests of `disagg bench`'s own requests (benchmarks/serving.py one_request), --streams at a time."""
    prompts = make_prompts(a.requests, str(a.prompt_tokens), 49152, seed=0)
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout)) as client:
        async def stream() -> None:
            while not queue.empty():
                results.append(await one_request(client, a.url, a.model, queue.get_nowait(), a.output_tokens, {}))

        await asyncio.gather(*(stream() for _ in range(a.streams)))
    return results


def run_disagg_bench(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`disagg bench`'s client at the same load. Its own report takes percentiles over every gap between tokens;
    guidellm's ITL is per request, (latency - TTFT) / (output tokens - 1), so both figures are given here: the
    `_ms` ones per request as guidellm computes them, `gap_` the bench's own."""
    del work
    results = asyncio.run(_closed_loop(a))
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [(r.e2e - r.ttft) * 1e3 / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    gaps = [g for r in ok for g in r.itls]
    return {"ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
            "itl_p50_ms": percentile(itl, 50), "itl_p90_ms": percentile(itl, 90),
            "gap_p50_ms": percentile(gaps, 50) * 1e3, "gap_p90_ms": percentile(gaps, 90) * 1e3,
            "successful": len(ok), "errored": len(results) - len(ok), "incomplete": 0}


def compare(g: dict[str, Any], d: dict[str, Any]) -> dict[str, float]:
    keys = ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p90_ms")
    return {k: round(g[k] / d[k], 3) if d[k] else float("nan") for k in keys}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--streams", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--requests", type=int, default=64, help="requests per tool (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--guidellm", default=os.environ.get("GUIDELLM", "guidellm"), help="guidellm executable")
    p.add_argument("--guidellm-processes", type=int, default=1,
                   help="guidellm's worker processes (default 1; guidellm's own default is one per stream, up to 10)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", default="benchmarks/out/guidellm_compare.json")
    a = p.parse_args(argv)
    # The machine's load average (1, 5, 15 min, as `uptime` prints it) around each tool's run: on a shared machine
    # it says how much of a difference between the two is other work.
    loadavg = {"before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        g = run_guidellm(a.guidellm, a, work)
        loadavg["after_guidellm"] = os.getloadavg()
        d = run_disagg_bench(a, work)
        loadavg["after_disagg_bench"] = os.getloadavg()
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
              "load": {k: getattr(a, k) for k in ("streams", "requests", "prompt_tokens", "output_tokens",
                                                  "guidellm_processes")},
              "loadavg": {k: [round(x, 2) for x in v] for k, v in loadavg.items()},
              "guidellm": g, "disagg_bench": d, "guidellm_over_disagg_bench": compare(g, d)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
