"""`disagg bench`: load-test any OpenAI-compatible completions endpoint.

Arrivals are Poisson at each --rate (requests/s), or a fixed number in flight (--concurrency).
Prompts are token-id arrays of lengths drawn from --prompt-len (fixed N or uniform A:B), outputs are
forced to --output-len tokens (`ignore_eos`, a vLLM extension this router also speaks). For each run it
reports TTFT, inter-token latency (ITL) and end-to-end latency percentiles, output throughput, and
goodput: requests/s whose TTFT <= --slo-ttft-ms and whose own p99 ITL <= --slo-itl-ms.
Writes JSON (all runs) and a PNG (goodput and p99 latencies against rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    error: str = ""


def parse_range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    return xs[f] + (xs[min(f + 1, len(xs) - 1)] - xs[f]) * (k - f)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], out_len: int,
                      headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    r = RequestResult(ok=False, prompt_len=len(prompt))
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    r.error = str(chunk["error"])
                    return r
                if chunk.get("usage"):
                    r.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if r.ttft == 0.0:
                        r.ttft = now - t0
                    else:
                        r.itls.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    r.e2e = time.perf_counter() - t0
    r.ok = True
    return r


async def run_load(a: argparse.Namespace, rate: float | None, prompts: list[list[int]]) -> dict:
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=max(64, a.concurrency or 0) * 2)
    rng = random.Random(a.seed + 1)
    out_lo, out_hi = parse_range(a.output_len)
    results: list[RequestResult] = []
    sem = asyncio.Semaphore(a.concurrency) if a.concurrency else None
    bar = tqdm(total=len(prompts), desc=f"rate {rate or 'max'}", leave=False)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits) as client:
        async def fire(p: list[int]) -> None:
            if sem:
                async with sem:
                    res = await one_request(client, a.url, a.model, p, rng.randint(out_lo, out_hi), headers)
            else:
                res = await one_request(client, a.url, a.model, p, rng.randint(out_lo, out_hi), headers)
            results.append(res)
            bar.update(1)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(fire(p)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return summarize(results, duration, rate, a)


def summarize(results: list[RequestResult], duration: float, rate: float | None, a: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    good = [r for r in ok if r.ttft * 1e3 <= a.slo_ttft_ms and percentile(r.itls, 99) * 1e3 <= a.slo_itl_ms
            or (r.ok and not r.itls and r.ttft * 1e3 <= a.slo_ttft_ms)]
    ms = 1e3
    s = {"rate": rate, "concurrency": a.concurrency, "requests": len(results), "completed": len(ok),
         "failed": len(results) - len(ok), "duration_s": round(duration, 3),
         "output_tokens": sum(r.output_tokens for r in ok),
         "output_tok_s": round(sum(r.output_tokens for r in ok) / duration, 2),
         "request_rate": round(len(ok) / duration, 3), "goodput_req_s": round(len(good) / duration, 3),
         "slo": {"ttft_ms": a.slo_ttft_ms, "itl_ms": a.slo_itl_ms}}
    for name, xs in (("ttft", [r.ttft for r in ok]), ("itl", itls), ("e2e", [r.e2e for r in ok])):
        for p in (50, 90, 99):
            s[f"{name}_p{p}_ms"] = round(percentile(xs, p) * ms, 2)
    errors = [r.error for r in results if not r.ok]
    if errors:
        s["errors"] = errors[:5]
    return s


def make_prompts(n: int, length: str, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = parse_range(length)
    return [[rng.randint(100, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def plot(runs: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] or 0 for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(rates, [r["goodput_req_s"] for r in runs], "o-", label="goodput")
    ax1.plot(rates, [r["request_rate"] for r in runs], "s--", label="completed req/s")
    ax1.set(xlabel="offered rate (req/s)", ylabel="req/s", title="goodput under SLO")
    ax1.legend()
    ax2.plot(rates, [r["ttft_p99_ms"] for r in runs], "o-", label="TTFT p99")
    ax2.plot(rates, [r["itl_p99_ms"] for r in runs], "s-", label="ITL p99")
    ax2.set(xlabel="offered rate (req/s)", ylabel="ms", yscale="log", title="tail latency")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default="smollm2", help="model name to send")
    p.add_argument("--api-key", default="", help="Bearer key, if the server wants one")
    p.add_argument("--num-requests", type=int, default=64, help="requests per run (default 64)")
    p.add_argument("--rate", default="", help="comma-separated Poisson rates in req/s, one run each (e.g. 1,2,4)")
    p.add_argument("--concurrency", type=int, default=0, help="fixed requests in flight instead of a rate")
    p.add_argument("--prompt-len", default="32:256", help="prompt tokens: N or uniform A:B (default 32:256)")
    p.add_argument("--output-len", default="32", help="output tokens: N or uniform A:B (default 32)")
    p.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this (default 49152)")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0, help="goodput SLO on time to first token")
    p.add_argument("--slo-itl-ms", type=float, default=30.0, help="goodput SLO on a request's p99 inter-token gap")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrivals")
    p.add_argument("--label", default="", help="name of this configuration in outputs")
    p.add_argument("--out", default="benchmarks/out/bench", help="output prefix: writes PREFIX.json and PREFIX.png")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    if not a.rate and not a.concurrency:
        a.concurrency = 8
    rates: list[float | None] = [float(x) for x in a.rate.split(",") if x] or [None]
    runs = []
    for rate in rates:
        prompts = make_prompts(a.num_requests, a.prompt_len, a.vocab, a.seed)
        s = asyncio.run(run_load(a, rate, prompts))
        runs.append(s)
        print(f"[{a.label or 'bench'}] rate={rate or '-'} conc={a.concurrency or '-'}: {s['completed']}/"
              f"{s['requests']} ok, {s['output_tok_s']} tok/s, TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} "
              f"ms, ITL p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} ms, goodput {s['goodput_req_s']} req/s",
              flush=True)
    import os

    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    result = {"label": a.label, "url": a.url, "prompt_len": a.prompt_len, "output_len": a.output_len, "runs": runs}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if len(runs) > 1 or rates[0] is not None:
        plot(runs, a.out + ".png", a.label or a.url)
    print(f"wrote {a.out}.json" + (f" and {a.out}.png" if rates[0] is not None else ""))
    return result


if __name__ == "__main__":
    main()
