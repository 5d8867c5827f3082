"""`disagg profile`: measure one worker's costs on the hardware at hand and write a profile (simulator/profile.py).

    disagg profile --out benchmarks/profiles/cpu_smollm2.json                        # real SmolLM2 on the CPU
    disagg profile --device cuda --dummy llama3-8b --out h200_llama3_8b.json         # dummy weights, 8B shape

Everything goes through the engine's public API, as a worker drives it: prompts with `add_request` + `step`;
decode steps on a batch whose context KV is taken as given (`receive_kv` + `kv_received`, benchmarks/given_kv.py);
chunks after cached context through the prefix cache (a prompt whose first c tokens an earlier prompt left there).
The KV transfer rate is one READ between two agents of the chosen backend (kvtransfer/bench.py), and start-up is
the time to build the engine plus a fresh interpreter's imports of the worker.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.machine_load import Alone
from benchmarks.profile_corun import co_run, co_run_lengths
from benchmarks.profile_serving import loop_overhead_ms, step_overhead_ms
from benchmarks.profile_steps import Tokens, run_prompt
from benchmarks.profile_sustained import sustained_costs
from benchmarks.profile_tables import envelope, fit_attention, measure_chunks, measure_decode, measure_prefill
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.cpu_threads import SHARE_ENV
from engine.engine import LLMEngine
from simulator.profile import (
    DecodeCosts,
    KVCosts,
    PrefillCosts,
    Profile,
    Provenance,
    ServingCosts,
    StartupCosts,
    TransferCosts,
)

SHAPES: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=16384,
                             eos_token_ids=(128001,), bos_token_id=128000),
    # benchmarks/serving_compare.py's GPU workers: the 8B shape with SmolLM2's vocabulary (the router detokenizes)
    "llama3-8b-v49k": ModelConfig(vocab_size=49152, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                  num_heads=32, num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                                  eos_token_ids=(2,), bos_token_id=1),
    "tiny": ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_position_embeddings=4096),
}
# Per device: prefill lengths, decode batches, decode contexts, chunk (tokens, contexts), KV GiB. The CPU's decode
# batches are every size to 8: MKL's fp32 GEMM is not monotonic in rows there (SmolLM2 steps of 1-8 rows at context
# 300 on the 2-core VM: 61, 104-114, 127-132, 90-96, 87-103, 116-137, 118-159, 106-119 ms), and a grid of 1, 4, 16
# made the simulator price 2- and 3-row steps 30% low (`python -m benchmarks.decode_rows` times them).
DEFAULTS = {
    "cpu": ("16,64,128,256,512,1024", "1,2,3,4,5,6,7,8,16,32,64", "64,256,1024", "128:256,768", 2.0),
    "cuda": ("16,64,128,256,512,1024,2048,4096,8192", "1,8,32,64,128,256", "256,1024,4096", "1024:1024,4096", 60.0),
}


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def build_engine(a: argparse.Namespace, cpu_threads: int | None = None) -> tuple[LLMEngine, float]:
    """The engine under test and the seconds it took to build (weights, KV, graphs); `cpu_threads` fixes its CPU
    threads (default: adaptive, as a worker runs)."""
    top = max(ints(a.prefill_tokens) + [a.chunk_tokens + max(ints(a.chunk_context) or [0])])
    sched = SchedulerConfig(max_num_seqs=max(ints(a.decode_batch)), max_num_batched_tokens=max(top, a.max_batched))
    cache = CacheConfig(memory_budget_bytes=int(a.kv_gib * 2**30))
    kw: dict[str, Any] = {"model": a.model, "device": a.device, "dtype": a.dtype, "cache": cache, "scheduler": sched}
    if a.dummy:
        kw.update(model=f"{a.dummy}-dummy", load_format="dummy", dummy_model=SHAPES[a.dummy])
    if cpu_threads:
        kw["cpu_threads"] = cpu_threads
    t0 = time.perf_counter()
    eng = LLMEngine(EngineConfig(**kw))
    return eng, time.perf_counter() - t0


def kv_costs(eng: LLMEngine, budget: int) -> KVCosts:
    cache, bs = eng.kv_cache, eng.config.cache.block_size
    per_token = cache.numel() * cache.element_size() // (eng.num_kv_blocks * bs)
    return KVCosts(block_size=bs, bytes_per_token=int(per_token), capacity_tokens=eng.num_kv_blocks * bs,
                   memory_budget_bytes=budget)


def transfer_costs(backend: str, device: str, repeat: int) -> TransferCosts:
    """Rate from a 64 MiB READ, latency from a one-block (2 MiB) READ less its bytes at that rate."""
    if backend == "none":
        return TransferCosts(backend="none", gib_s=1e6, latency_ms=0.0)
    from kvtransfer.bench import bench

    big = bench(backend, 64, repeat, device)
    small = bench(backend, 2, repeat, device)
    rate = big["median_gib_s"]
    return TransferCosts(backend=backend, gib_s=round(rate, 4),
                         latency_ms=round(max(0.0, small["median_s"] - 2 / 1024 / rate) * 1e3, 4))


def process_start_s() -> float:
    """A fresh interpreter importing the worker (what every new replica pays before building its engine)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import worker.server"], check=True, capture_output=True)
    return time.perf_counter() - t0


def timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def model_summary(eng: LLMEngine, a: argparse.Namespace) -> dict[str, Any]:
    m = eng.model_config
    return {"name": a.dummy or a.model, "weights": "dummy" if a.dummy else "real", "dtype": a.dtype,
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim or m.hidden_size // m.num_heads,
            "vocab_size": m.vocab_size}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads)"


def profile(a: argparse.Namespace) -> Profile:
    eng, engine_s = timed("engine build", lambda: build_engine(a))
    toks = Tokens(eng.model_config.vocab_size)
    run_prompt(eng, "warmup", toks.take(32), a.device)
    table = sorted(set(ints(a.prefill_tokens)) | {a.chunk_tokens})
    # the co-run's prompts are taken over the table at their own lengths: each is a measured point of it
    corun_lengths = tuple(k for k in co_run_lengths(a.device) if k <= table[-1]) or (table[-1],)
    lengths = sorted(set(table) | set(corun_lengths))
    alone = Alone(eng, a.device)
    pre_ms = timed("prefill", lambda: measure_prefill(eng, toks, lengths, a.repeat, a.device, alone))
    chunks = timed("chunks", lambda: measure_chunks(eng, toks, a.chunk_tokens, ints(a.chunk_context), a.repeat,
                                                    a.device, alone))
    attn = fit_attention(chunks, pre_ms[lengths.index(a.chunk_tokens)])
    contexts, batches = ints(a.decode_context), ints(a.decode_batch)
    measured = timed("decode", lambda: measure_decode(eng, toks, batches, contexts, a.decode_steps, a.device, alone))
    grid = envelope(measured)
    serving = timed("serving loop", lambda: serving_costs(eng, toks, contexts[0], a)) if a.serving else None
    transfer = timed("transfer", lambda: transfer_costs(a.transfer_backend, a.device, a.repeat))
    corun = timed("co-run", lambda: co_run(eng, toks, a.device, a.repeat, alone, lambda: build_engine(
        a, len(os.sched_getaffinity(0)))[0], a.argv if a.co_run_with == "engine" else None,
        a.co_run_starts, lambda n: pre_ms[lengths.index(n)], corun_lengths, a.co_run_spread_steps)) if a.co_run else None
    gpu = a.device.startswith("cuda")
    sustained = timed("sustained", lambda: sustained_costs(eng, toks, a.device, min(2048, max(lengths)))) \
        if gpu and a.sustained else None
    when = datetime.date.today().isoformat()
    return Profile(
        name=a.name or f"{a.device}-{a.dummy or a.model}", device=device_name(a.device), model=model_summary(eng, a),
        provenance=Provenance(kind="measured", note=a.note or "measured by disagg profile on this device",
                              date=when, command="disagg profile " + " ".join(a.argv)),
        prefill=PrefillCosts(tokens=tuple(lengths), ms=tuple(round(m, 4) for m in pre_ms),
                             attention_ms_per_pair=attn, chunked=tuple(chunks),
                             max_num_batched_tokens=eng.config.scheduler.max_num_batched_tokens),
        decode=DecodeCosts(tuple(batches), tuple(contexts), tuple(tuple(r) for r in grid)),
        kv=kv_costs(eng, int(a.kv_gib * 2**30)), transfer=transfer,
        startup=StartupCosts(engine_s=round(engine_s, 3), process_s=round(process_start_s(), 3)),
        gpus_per_replica=1 if gpu else 0, co_run=corun, serving=serving, sustained=sustained,
        extra={"torch": torch.__version__, "decode_steps": a.decode_steps, "repeat": a.repeat,
               **({"decode_measured_ms": measured} if grid != measured else {}),
               **({} if a.device.startswith("cuda") else {
                   "cpu_threads": eng.config.cpu_threads, "threads_alone": alone.want or torch.get_num_threads(),
                   "remeasured_short_of_cores": alone.retried, "kept_short_of_cores": alone.short})})


def serving_costs(eng: LLMEngine, toks: Tokens, ctx: int, a: argparse.Namespace) -> ServingCosts:
    """The worker loop's cost per step at a small and a mid batch (benchmarks/profile_serving.py); the simulator
    adds it to every step (`loop_overhead_ms`)."""
    batches = [1, 32] if a.device.startswith("cuda") else [1, 8]
    by_batch = step_overhead_ms(eng, toks, batches, ctx, max(a.decode_steps, 32), a.device, a.repeat)
    overlapped = eng.config.overlaps_steps(a.device.startswith("cuda"))
    return ServingCosts(step_overhead_ms=loop_overhead_ms(by_batch, overlapped), by_batch=by_batch)


@contextlib.contextmanager
def core_share(wanted: bool) -> Iterator[None]:
    """The engine under test and its engine co-runner in one core share (engine/cpu_threads.py), as a cluster's
    workers are: $DISAGG_CPU_SHARE set for this process and its children (unless set already), removed after."""
    if not wanted or os.environ.get(SHARE_ENV):
        yield
        return
    path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                        f"disagg-profile-cores-{os.getpid()}")
    os.environ[SHARE_ENV] = path
    try:
        yield
    finally:
        del os.environ[SHARE_ENV]
        with contextlib.suppress(OSError):
            os.remove(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (packaged), an HF folder or a .gguf file")
    p.add_argument("--dummy", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (default: what a worker started "
                   "by disagg serve gets, half the cores)")
    p.add_argument("--prefill-tokens", help="prompt lengths to time, comma-separated (default per device)")
    p.add_argument("--chunk", help="N:C1,C2: time a chunk of N new tokens after C1, C2 cached ones (default per device)")
    p.add_argument("--decode-batch", help="decode batch sizes, comma-separated (default per device)")
    p.add_argument("--decode-context", help="decode context lengths, comma-separated (default per device)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps timed per grid cell (default 8)")
    p.add_argument("--max-batched", type=int, default=0, help="engine step token budget (default: the longest prompt)")
    p.add_argument("--kv-gib", type=float, help="KV cache budget, GiB (default 2 on cpu, 60 on cuda)")
    p.add_argument("--transfer-backend", help="KV transfer backend to time: tcp, nixl, cuda_ipc or none "
                   "(default tcp on cpu, cuda_ipc on cuda)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions per prefill point, median kept (default 3)")
    p.add_argument("--no-co-run", dest="co_run", action="store_false", help="skip timing steps beside a busy "
                   "co-runner process (what a second worker on the same host or GPU costs; ~30 s beside matmuls, "
                   "~90 s beside an engine on a 2-core CPU)")
    p.add_argument("--co-run-with", choices=["engine", "matmul"], help="the co-runner: this engine running the "
                   "other role's steps (a prefill beside decode steps, a decode step beside prefills; the pairing of a "
                   "1P+1D cluster on one device) or a process of matmuls (default: engine on cpu; matmul on cuda, "
                   "where a second engine needs a second copy of the weights beside this one's KV cache)")
    p.add_argument("--co-run-starts", type=int, default=0, help="co-runner starts each busy figure is the median "
                   "over (a prompt beside one start of a GPU's decode co-runner moved 1.95-2.19x between starts; "
                   "each costs an engine start; 0, the default: 3 with the engine co-runner on a GPU, else 1)")
    p.add_argument("--co-run-spread-steps", type=int, default=-1, metavar="N", help="with the engine co-runner: "
                   "decode steps timed one by one beside a prefill co-runner that idles between its prompts as a "
                   "serving prefill worker does, N at each of 1, 4, 8, 16, 32 rows up to the co-run's batch, for the "
                   "co-run's spread (co_run.decode_spread and spread_by_batch: the simulator draws each decode step "
                   "beside a prompt from the spread at its rows; it sets the ITL p99); 0: none (default: 256 on cuda, "
                   "0 on cpu, whose steps a shared machine's noise spreads more than the co-run does)")
    p.add_argument("--no-serving", dest="serving", action="store_false", help="skip timing decode steps through "
                   "the worker's serving loop (worker/async_engine.py) against engine.step alone (~10 s on a GPU)")
    p.add_argument("--no-sustained", dest="sustained", action="store_false", help="GPU: skip timing prompts back "
                   "to back against one at a time (a busy card lowers its clocks at its power limit; ~4 s)")
    p.add_argument("--name", default="", help="profile name (default DEVICE-MODEL)")
    p.add_argument("--note", default="", help="a sentence on what was measured, kept in the file")
    p.add_argument("--out", required=True, help="the profile JSON to write")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["--"] else argv  # `disagg profile -- --help` passes the separator on
    a = build_parser().parse_args(argv)
    gpu = a.device.startswith("cuda")
    pre, batch, ctx, chunk, kv = DEFAULTS["cuda" if gpu else "cpu"]
    limit = SHAPES[a.dummy].max_position_embeddings if a.dummy else None  # a prompt plus its one sampled token
    if limit is not None and not a.prefill_tokens:
        pre = ",".join(x for x in pre.split(",") if int(x) < limit)
    elif limit is not None and any(n >= limit for n in ints(a.prefill_tokens)):
        build_parser().error(f"--prefill-tokens: the {a.dummy} shape holds {limit} positions; prompts must be "
                             f"shorter (one more for the sampled token)")
    a.prefill_tokens, a.decode_batch = a.prefill_tokens or pre, a.decode_batch or batch
    a.decode_context, a.kv_gib = a.decode_context or ctx, a.kv_gib or kv
    n, _, cs = (a.chunk or chunk).partition(":")
    a.chunk_tokens, a.chunk_context = int(n), cs
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.transfer_backend = a.transfer_backend or ("cuda_ipc" if gpu else "tcp")
    a.co_run_with = a.co_run_with or ("matmul" if gpu else "engine")
    if a.co_run_starts < 0:
        build_parser().error(f"--co-run-starts must be >= 0, got {a.co_run_starts}")
    a.co_run_starts = a.co_run_starts or (3 if gpu and a.co_run_with == "engine" else 1)
    if a.co_run_spread_steps < -1:
        build_parser().error(f"--co-run-spread-steps must be >= 0, got {a.co_run_spread_steps}")
    if a.co_run_spread_steps == -1:
        a.co_run_spread_steps = 256 if gpu else 0
    a.argv = argv
    return a


def main(argv: list[str] | None = None) -> Profile:
    a = parse(argv)
    if not a.device.startswith("cuda"):
        torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 2) // 2))
    with core_share(not a.device.startswith("cuda") and a.co_run and a.co_run_with == "engine"):
        prof = profile(a)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    prof.save(a.out)
    print(f"wrote {a.out}: prefill {dict(zip(prof.prefill.tokens, prof.prefill.ms, strict=True))} ms, decode batch "
          f"{prof.decode.batch[0]} ctx {prof.decode.context[0]}: {prof.decode.ms[0][0]} ms, transfer "
          f"{prof.transfer.gib_s} GiB/s, start-up {prof.startup.total_s:.1f}s", flush=True)
    return prof


if __name__ == "__main__":
    main()
