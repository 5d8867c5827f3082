"""`disagg bench`: load-test any OpenAI-compatible completions endpoint.

Arrivals are Poisson at each --rate (requests/s), or a fixed number in flight (--concurrency).
Prompts are token-id arrays of lengths drawn from --prompt-len (fixed N or uniform A:B), outputs are
forced to --output-len tokens (`ignore_eos`, a vLLM extension this router also speaks). For each run it
reports TTFT, inter-token latency (ITL) and end-to-end latency percentiles, output throughput, and
goodput: requests/s whose TTFT <= --slo-ttft-ms and whose own p99 ITL <= --slo-itl-ms.
Writes JSON (all runs) and a PNG (goodput and p99 latencies against rate).

Shared-prefix workloads (for KV-aware routing):
- `--shared-prefix G:L`: every prompt starts with one of G random L-token prefixes (a "system prompt"),
  followed by --prompt-len tokens of its own;
- `--conversations C --turns T`: C multi-turn conversations run at once, each turn sent when the previous one
  finished: turn 1 is --prompt-len tokens, each later turn resends the whole history plus the previous answer
  (random tokens of the answer's length standing in for its text) and --turn-len new tokens.
With `--metrics`, the router's /metrics is read before and after each run and the run reports the prefill
workers' prefix-cache hit rate, the router's predicted overlap and the decode workers' pulled bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
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


async def run_conversations(a: argparse.Namespace) -> dict:
    """`--conversations` of `--turns` turns each, all at once; a conversation's turns one after another."""
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    lo, hi = parse_range(a.prompt_len)
    out_lo, out_hi = parse_range(a.output_len)
    turn_lo, turn_hi = parse_range(a.turn_len)
    results: list[RequestResult] = []
    bar = tqdm(total=a.conversations * a.turns, desc="conversations", leave=False)
    limits = httpx.Limits(max_connections=max(64, a.conversations) * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.timeout), limits=limits) as client:
        async def conversation(c: int) -> None:
            rng = random.Random(a.seed * 100003 + c)
            history = random_tokens(rng, rng.randint(lo, hi), a.vocab)
            for turn in range(a.turns):
                if turn:
                    history = history + random_tokens(rng, rng.randint(turn_lo, turn_hi), a.vocab)
                out_len = rng.randint(out_lo, out_hi)
                results.append(await one_request(client, a.url, a.model, history, out_len, headers))
                bar.update(1)
                history = history + random_tokens(rng, out_len, a.vocab)  # the answer, as the next turn sends it

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(c) for c in range(a.conversations)))
        duration = time.perf_counter() - t0
    bar.close()
    return summarize(results, duration, None, a)


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randint(100, vocab - 1) for _ in range(n)]


_METRIC = re.compile(r'^(disagg_\w+)\{([^}]*)\} ([0-9.eE+-]+|NaN)$')


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The router's /metrics as {(name, sorted labels): value}; empty when it cannot be read."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m[2])))
            out[(m[1], labels)] = float(m[3])
    return out


def kv_summary(before: dict, after: dict) -> dict:
    """Prefix-cache and pull figures of one run, from two /metrics scrapes."""
    def delta(name: str, **want: str) -> dict[str, float]:
        got: dict[str, float] = {}
        for (n, labels), v in after.items():
            d = dict(labels)
            if n == name and all(d.get(k) == x for k, x in want.items()):
                got[d.get("worker", "")] = v - before.get((n, labels), 0.0)
        return got

    query = delta("disagg_worker_prefix_query_tokens", role="prefill")
    hit = delta("disagg_worker_prefix_hit_tokens", role="prefill")
    blocks = sum(delta("disagg_router_prompt_blocks_total", phase="prefill").values())
    predicted = sum(delta("disagg_router_predicted_hit_blocks_total", phase="prefill").values())
    routed = delta("disagg_router_routed_total", phase="prefill")
    return {
        "prefill_hit_rate": round(sum(hit.values()) / max(1.0, sum(query.values())), 4),
        "prefill_hit_rate_by_worker": {w: round(hit.get(w, 0.0) / q, 4) for w, q in query.items() if q},
        "prefill_routed_by_worker": {w: int(v) for w, v in routed.items()},
        "prefill_predicted_overlap": round(predicted / blocks, 4) if blocks else None,
        "prefill_computed_tokens": int(sum(delta("disagg_worker_prompt_tokens", role="prefill").values())),
        "decode_transfer_bytes": int(sum(delta("disagg_worker_transfer_bytes", role="decode").values())),
        "decode_pull_cached_blocks": int(sum(delta("disagg_worker_pull_cached_blocks", role="decode").values())),
    }


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


def make_prompts(n: int, length: str, vocab: int, seed: int, shared_prefix: str = "") -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = parse_range(length)
    prefixes: list[list[int]] = [[]]
    if shared_prefix:
        groups, prefix_len = (int(x) for x in shared_prefix.split(":"))
        prefixes = [random_tokens(rng, prefix_len, vocab) for _ in range(groups)]
    return [rng.choice(prefixes) + random_tokens(rng, rng.randint(lo, hi), vocab) for _ in range(n)]


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
    p.add_argument("--shared-prefix", default="", metavar="G:L",
                   help="prompts start with one of G shared L-token prefixes; --prompt-len is the rest")
    p.add_argument("--conversations", type=int, default=0,
                   help="multi-turn mode: this many conversations at once (--rate/--concurrency ignored)")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    p.add_argument("--turn-len", default="32", help="new user tokens per later turn: N or A:B (default 32)")
    p.add_argument("--metrics", action="store_true",
                   help="read the router's /metrics around each run: prefix hit rate, predicted overlap, pulls")
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
    if a.conversations:
        rates = [None]
    for rate in rates:
        before = scrape(a.url) if a.metrics else {}
        if a.conversations:
            s = asyncio.run(run_conversations(a))
            s["conversations"], s["turns"] = a.conversations, a.turns
        else:
            prompts = make_prompts(a.num_requests, a.prompt_len, a.vocab, a.seed, a.shared_prefix)
            s = asyncio.run(run_load(a, rate, prompts))
        if a.metrics:
            time.sleep(1.5)  # a Load poll after the last request, so the worker counters are current
            s["kv"] = kv_summary(before, scrape(a.url))
        runs.append(s)
        print(f"[{a.label or 'bench'}] rate={rate or '-'} conc={a.concurrency or '-'}: {s['completed']}/"
              f"{s['requests']} ok, {s['output_tok_s']} tok/s, TTFT p50/p90/p99 {s['ttft_p50_ms']}/"
              f"{s['ttft_p90_ms']}/{s['ttft_p99_ms']} ms, ITL p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} ms, "
              f"goodput {s['goodput_req_s']} req/s" + (f", {s['kv']}" if "kv" in s else ""), flush=True)
    import os

    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    result = {"label": a.label, "url": a.url, "prompt_len": a.prompt_len, "output_len": a.output_len,
              "shared_prefix": a.shared_prefix, "conversations": a.conversations, "turns": a.turns,
              "turn_len": a.turn_len, "runs": runs}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if len(runs) > 1 or rates[0] is not None:
        plot(runs, a.out + ".png", a.label or a.url)
    print(f"wrote {a.out}.json" + (f" and {a.out}.png" if rates[0] is not None else ""))
    return result


if __name__ == "__main__":
    main()
