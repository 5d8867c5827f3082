"""How many streamed tokens the router relays per CPU-second, and what ITL its clients see.

`python -m benchmarks.router_capacity --streams 64,256 --processes 1,2 --out results.json`

Fake decode workers (benchmarks/fake_worker.py, their own processes) stream one token per message at a fixed pace
per stream; the real router runs as its own process(es) (`python -m router`); a lean client in this process opens
the streams (`/v1/completions`, `stream: true`) and timestamps every SSE chunk. Router CPU time is read from
/proc for every router process, so "tokens per router CPU-second" does not depend on what else the machine runs.
Writes JSON (every run) and a PNG (delivered vs offered tokens/s, and client ITL against the pace).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from benchmarks.serving import percentile
from worker.ports import free_port

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    streams: int
    processes: int
    pace_ms: float
    tokens_per_request: int
    offered_tok_s: float
    delivered_tok_s: float = 0.0
    delivered_fraction: float = 0.0
    itl_p50_ms: float = 0.0
    itl_p99_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_mean_ms: float = 0.0
    itl_mean_ms: float = 0.0
    request_mean_s: float = 0.0  # first byte sent to [DONE]: delivered = tokens x pace / this, for a stream in a loop
    router_cpu_s: float = 0.0
    wall_s: float = 0.0
    tokens: int = 0
    tokens_per_router_cpu_s: float = 0.0
    ramp_s: float = 0.0  # streams start evenly over this long (0: all at once); the window follows it
    steady_tok_s: float = 0.0  # tokens that reached the clients inside the window [ramp, ramp + duration] / duration
    steady_fraction: float = 0.0  # steady_tok_s / offered: excludes the ramp and the last requests' tail
    client_cpu_s: float = 0.0  # the client (this process) and the fake worker(s): what the router shares cores with
    worker_cpu_s: float = 0.0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children (fields 14-17 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


async def sse_stream(host: str, port: int, body: bytes, chunks: list[float]) -> str | None:
    """One streamed completion over a raw HTTP/1.1 connection; appends each content chunk's arrival time.
    Returns an error string, or None."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            return head.split(b"\r\n", 1)[0].decode() + " " + (await reader.read(500)).decode(errors="replace")
        tail, done = b"", False
        while not done:
            data = await reader.read(65536)
            if not data:
                break
            now = time.monotonic()
            data = tail + data
            # Count whole events: those that carry text (every chunk but the usage/[DONE] ones).
            end = data.rfind(b"\n\n")
            events, tail = data[: end + 2], data[end + 2:]
            chunks.extend([now] * events.count(b'"text":'))
            done = b"data: [DONE]" in events
            if b'data: {"error"' in events:  # the router's mid-stream error event (a token "error" is no error)
                return events.decode(errors="replace")[:300]
        return None if done else "stream ended without [DONE]"
    finally:
        writer.close()


async def client(url: str, streams: int, tokens: int, duration_s: float, ramp_s: float = 0.0
                 ) -> tuple[list[list[float]], list[float], int, list[str]]:
    """`streams` loops, each sending one request after another until `ramp_s + duration_s`; per request its chunk
    times. Stream i starts at i x ramp_s / streams: with ramp_s = 0 every stream starts at once (and, all requests
    being as long, they stay in step: a burst of `streams` arrivals every request length); with ramp_s = one
    request's length, arrivals spread evenly, a steady load."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": tokens, "stream": True,
                       "ignore_eos": True}).encode()
    per_request: list[list[float]] = []
    starts: list[float] = []
    errors: list[str] = []
    begin = time.monotonic()
    stop_at = begin + ramp_s + duration_s

    async def loop(i: int) -> None:
        await asyncio.sleep(max(0.0, begin + i * ramp_s / streams - time.monotonic()))
        while time.monotonic() < stop_at:
            chunks: list[float] = []
            t0 = time.monotonic()
            err = await sse_stream(host, int(port), body, chunks)
            if err:
                errors.append(err)
                await asyncio.sleep(0.05)
            else:
                per_request.append(chunks)
                starts.append(t0)

    await asyncio.gather(*(loop(i) for i in range(streams)))
    return per_request, starts, len(errors), errors[:3]


class Procs:
    """Fake workers and router processes of one run."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, cmd: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.procs.append(p)
        return p

    def wait_line(self, p: subprocess.Popen, prefix: str, timeout_s: float = 120) -> str:
        """The process's first output line starting with `prefix`; if it exits first, the error carries the
        last lines it printed (its traceback)."""
        deadline = time.monotonic() + timeout_s
        assert p.stdout is not None
        seen: collections.deque[str] = collections.deque(maxlen=30)
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if line.startswith(prefix):
                return line
            seen.append(line)
            if not line and p.poll() is not None:
                raise RuntimeError(f"{p.args} exited with {p.returncode}:\n{''.join(seen)}")
        raise TimeoutError(f"{p.args}: no {prefix!r} line")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_ready(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("router not ready")


def one_run(streams: int, processes: int, a: argparse.Namespace) -> Run:
    procs = Procs()
    try:
        workers = []
        for _ in range(a.workers):
            port = free_port()
            w = procs.spawn([sys.executable, "-m", "benchmarks.fake_worker", "--port", str(port),
                             "--pace-ms", str(a.pace_ms)])
            procs.wait_line(w, "READY")
            workers.append(f"127.0.0.1:{port}")
        port = free_port()
        cmd = [sys.executable, "-m", "router", "--port", str(port), "--log-level", "WARNING"]
        cmd += [x for w in workers for x in ("--worker", w)] + (["--processes", str(processes)] if processes > 1 else [])
        router = procs.spawn(cmd + a.router_args)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        pids = router_pids(router.pid)
        run_loop = asyncio.run if a.client_loop == "asyncio" else uvloop_run()
        run_loop(client(url, min(streams, 8), 4, 1.0))  # warm-up: connections, tokenizer caches
        wpids = [w.pid for w in procs.procs[:a.workers]]
        cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        client0, worker0 = time.process_time(), sum(cpu_seconds(p) for p in wpids)
        ramp = a.tokens * a.pace_ms / 1000 if a.arrivals == "staggered" else 0.0
        per_request, starts, errors, samples = run_loop(client(url, streams, a.tokens, a.duration, ramp))
        wall = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in router_pids(router.pid)) - cpu0
        run = Run(streams, processes, a.pace_ms, a.tokens, streams * 1000 / a.pace_ms, ramp_s=ramp,
                  client_cpu_s=time.process_time() - client0,
                  worker_cpu_s=sum(cpu_seconds(p) for p in wpids) - worker0)
    finally:
        procs.stop()
    run = summarize(run, per_request, starts, errors, samples, wall, cpu)
    in_window = sum(1 for chunks in per_request for t in chunks if t0 + ramp < t <= t0 + ramp + a.duration)
    run.steady_tok_s = in_window / a.duration
    run.steady_fraction = run.steady_tok_s / run.offered_tok_s
    return run


def uvloop_run() -> Callable[[Coroutine[Any, Any, T]], T]:
    """asyncio.run on uvloop: the client's own CPU per chunk is what the router's cores lose to it."""
    import uvloop

    return uvloop.run


def router_pids(pid: int) -> list[int]:
    """The router process and its children (the extra processes of `--processes N`)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid, *map(int, out)]


def summarize(run: Run, per_request: list[list[float]], starts: list[float], errors: int, samples: list[str],
              wall: float, cpu: float) -> Run:
    itls = [b - a for chunks in per_request for a, b in zip(chunks, chunks[1:], strict=False)]
    ttfts = [c[0] - s for c, s in zip(per_request, starts, strict=True) if c]
    run.tokens = sum(len(c) for c in per_request)
    run.wall_s, run.router_cpu_s = wall, cpu
    run.delivered_tok_s = run.tokens / wall
    run.delivered_fraction = run.delivered_tok_s / run.offered_tok_s
    run.itl_p50_ms, run.itl_p99_ms = percentile(itls, 50) * 1000, percentile(itls, 99) * 1000
    run.ttft_p50_ms = percentile(ttfts, 50) * 1000
    run.ttft_mean_ms = sum(ttfts) / max(1, len(ttfts)) * 1000
    run.itl_mean_ms = sum(itls) / max(1, len(itls)) * 1000
    spans = [c[-1] - s for c, s in zip(per_request, starts, strict=True) if c]
    run.request_mean_s = sum(spans) / max(1, len(spans))
    run.tokens_per_router_cpu_s = run.tokens / cpu if cpu else 0.0
    run.errors, run.error_samples = errors, samples
    return run


def plot(runs: list[Run], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for procs in sorted({r.processes for r in runs}):
        rs = sorted((r for r in runs if r.processes == procs), key=lambda r: r.streams)
        ax1.plot([r.offered_tok_s for r in rs], [r.delivered_tok_s for r in rs], "o-", label=f"{procs} router proc")
        ax2.plot([r.streams for r in rs], [r.itl_p99_ms for r in rs], "o-", label=f"p99, {procs} proc")
        ax2.plot([r.streams for r in rs], [r.itl_p50_ms for r in rs], "x--", label=f"p50, {procs} proc")
    top = max(r.offered_tok_s for r in runs)
    ax1.plot([0, top], [0, top], ":", color="gray", label="offered")
    ax1.set(xlabel="offered tokens/s", ylabel="delivered tokens/s", title="Router throughput")
    ax2.axhline(runs[0].pace_ms, color="gray", linestyle=":", label="pace")
    ax2.set(xlabel="concurrent streams", ylabel="client ITL (ms)", xscale="log", yscale="log", title="Client ITL")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.router_capacity", description=__doc__.split("\n")[0])
    p.add_argument("--streams", default="1,16,64,256", help="concurrent streams per run, comma-separated")
    p.add_argument("--processes", default="1", help="router processes per run (router --processes), comma-separated")
    p.add_argument("--pace-ms", type=float, default=10.0, help="ms between a stream's tokens at the fake worker")
    p.add_argument("--tokens", type=int, default=200, help="tokens per request (max_tokens, ignore_eos)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of the measurement window (after the ramp of --arrivals staggered)")
    p.add_argument("--arrivals", choices=["synchronized", "staggered"], default="synchronized",
                   help="synchronized: every stream starts at once, so (all requests being as long) 'streams' requests "
                   "arrive together every request length, as in the recorded tables; staggered: stream i starts at "
                   "i/streams of one request's length, a steady load, and the window starts after that ramp")
    p.add_argument("--workers", type=int, default=1, help="fake decode worker processes")
    p.add_argument("--client-loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the client's event loop (uvloop spends ~20%% less CPU on the client; asyncio as in the "
                   "recorded tables)")
    p.add_argument("--router-arg", dest="router_args", action="append", default=[],
                   help="extra argument for `python -m router` (repeatable)")
    p.add_argument("--out", default="router_capacity.json", help="JSON output; the PNG goes beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    combos = [(int(s), int(n)) for n in a.processes.split(",") for s in a.streams.split(",")]
    runs = []
    for streams, procs in tqdm(combos, desc="router capacity"):
        r = one_run(streams, procs, a)
        runs.append(r)
        tqdm.write(f"{streams:5d} streams x{procs}: offered {r.offered_tok_s:8.0f} delivered {r.delivered_tok_s:8.0f} "
                   f"tok/s ({r.delivered_fraction:.2f}), ITL p50/p99 {r.itl_p50_ms:6.1f}/{r.itl_p99_ms:6.1f} ms, "
                   f"router {r.router_cpu_s:5.1f} CPU-s = {r.tokens_per_router_cpu_s:7.0f} tok/CPU-s, "
                   f"steady {r.steady_tok_s:8.0f} tok/s ({r.steady_fraction:.2f}), CPU-s client "
                   f"{r.client_cpu_s:.1f} worker {r.worker_cpu_s:.1f}, errors {r.errors}; means: TTFT "
                   f"{r.ttft_mean_ms:.1f} ms, ITL {r.itl_mean_ms:.2f} ms, request {r.request_mean_s:.3f} s")
    with open(a.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "args": vars(a),
                   "runs": [asdict(r) for r in runs]}, f, indent=1)
    plot(runs, a.out.rsplit(".", 1)[0] + ".png")


if __name__ == "__main__":
    main()
