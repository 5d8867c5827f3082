"""One client, one stream at a time: the per-token latency a single user sees on this machine.

    python -m benchmarks.single_stream --url http://127.0.0.1:8000 --repeats 5 --out single_stream.json

A streaming chat request through the official `openai` client: a prompt of about 260 tokens, 64 tokens out at
temperature 0, `--repeats` times in a row. Reports TTFT and inter-token latency (ITL, the gaps between streamed
chunks) medians with their range over the repeats. Point it at `./dev.sh serve` (or any OpenAI-compatible server:
llama.cpp's, vLLM's) to compare them on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import openai

PROMPT = ("Here is a short passage. The river runs through the old town, past the mill and the market square, "
          "where on Saturdays farmers sell cheese, bread, apples and honey. Children play by the bridge while "
          "their parents talk about the weather, the harvest and the news from the capital. In the evening the "
          "lamps are lit one by one and the bells of the church ring seven times. ") * 3 + \
    "Summarize the passage in a few sentences, then list every food it mentions."


def one(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, list[float]]:
    t0 = time.monotonic()
    stamps = []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_stream", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default="smollm2", help="model id to send (default smollm2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens out per request (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="requests, one after another (default 5)")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    one(client, a.model, 4)  # warm-up
    runs = [one(client, a.model, a.max_tokens) for _ in range(a.repeats)]
    ttfts, itl_medians = [r[0] for r in runs], [statistics.median(r[1]) for r in runs]
    res = {"label": a.label, "url": a.url, "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats,
           "ttft_ms_median": round(statistics.median(ttfts) * 1e3, 1),
           "ttft_ms_range": [round(min(ttfts) * 1e3, 1), round(max(ttfts) * 1e3, 1)],
           "itl_ms_median": round(statistics.median(itl_medians) * 1e3, 1),
           "itl_ms_range": [round(min(itl_medians) * 1e3, 1), round(max(itl_medians) * 1e3, 1)],
           "itl_p99_ms": round(sorted(g for r in runs for g in r[1])[int(0.99 * sum(len(r[1]) for r in runs))] * 1e3, 1)}
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
