"""Profiles for hardware this repository has measured but cannot measure now: derived from recorded results, or
analytic (a roofline with efficiencies taken from those results). Every file says which, and from what.

    python -m benchmarks.profile_derive [--out benchmarks/profiles]

- h200_llama3_8b.json (derived): the H200's recorded prefill table and copy rate; decode steps = the H200's HBM
  floor x the step/floor ratio the current code reached on the H100 at the same (batch, context) (the recorded
  H200 decode run predates the GEMV kernel and overlapped steps); context beyond 2,048 extends the floor linearly.
- h100_llama3_8b_v49k_no_overlap.json (derived): the H100's recorded decode (overlapped steps off) and prefill
  with the 49,152-token vocabulary benchmarks/serving_compare.py gives its workers, for checking the simulator
  against the recorded one-GPU serving runs.
- h200_llama3_70b_tp4.json (analytic): Llama-3-70B over 4 H200s; no multi-GPU run exists yet.

Parts with no measurement behind them in any profile (labelled in each file): the cross-node KV transfer rate
(400 Gb/s RDMA per GPU at 80%; the recorded NIXL run found no GPU transport), start-up times, and for 70B
the all-reduce cost (NVLink, 12 us + bytes at 360 GB/s per all-reduce, two per layer).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from simulator.profile import DecodeCosts, KVCosts, PrefillCosts, Profile, Provenance, StartupCosts, TransferCosts

RESULTS = "benchmarks/results"
H200_RUN = f"{RESULTS}/gpu_bench_h200_2026-11-25.json"
H100_DECODE = f"{RESULTS}/gpu_bench_h100_2026-11-25_gemv_decode.json"
H100_PREFILL = f"{RESULTS}/gpu_bench_h100_2026-11-25_host_path.json"
ATTN_TFLOPS = 302.0  # paged prefill attention, 4 x 1024 new tokens on 1024 cached (RESULTS.md, kernels alone, H100)
RDMA_GIB_S = 400e9 / 8 * 0.8 / 2**30  # one 400 Gb/s NIC per GPU at 80%
ALLREDUCE_US, NVLINK_BUS_GB_S = 12.0, 360.0
BATCHES, CONTEXTS = (1, 8, 32, 64, 128, 256), (512, 2048, 8192, 32768)


def shape(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int) -> dict[str, Any]:
    hd = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * hd + 3 * hidden * inter
    params = layers * per_layer + 2 * vocab * hidden
    return {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": hd,
            "intermediate_size": inter, "vocab_size": vocab, "dtype": "bfloat16", "weights": "dummy",
            "parameters": params, "weight_bytes": 2 * params, "kv_bytes_per_token": 2 * layers * kv_heads * hd * 2}


LLAMA3_8B = shape(32, 4096, 32, 8, 14336, 128256)
LLAMA3_70B = shape(80, 8192, 64, 8, 28672, 128256)


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def step_floor_ratios(run: dict[str, Any], key: str = "ms_step") -> dict[tuple[int, int], float]:
    """(batch, context) -> measured step (`key`: ms_step, overlapped; ms_step_no_overlap) / HBM floor; a missing
    cell takes its batch's ratio at the shortest context."""
    out = {(r["batch"], r["ctx"]): r[key] / r["floor_ms"] for r in run["decode"] if key in r}
    for (b, _c) in list(out):
        for c in {r["ctx"] for r in run["decode"]}:
            out.setdefault((b, c), out[(b, min(c2 for b2, c2 in out if b2 == b))])
    return out


def ratio_at(ratios: dict[tuple[int, int], float], batch: int, ctx: int) -> float:
    measured = sorted({c for _, c in ratios})
    return ratios[(batch, max([c for c in measured if c <= ctx] or measured[:1]))]


def floor_ms(m: dict[str, Any], batch: int, ctx: int, copy_tb_s: float, shards: int = 1) -> float:
    """benchmarks/gpu_bench.py's floor: every weight byte and every KV byte read once per step, per device."""
    return (m["weight_bytes"] + batch * (ctx + 12) * m["kv_bytes_per_token"]) / shards / (copy_tb_s * 1e12) * 1e3


def attention_ms_per_pair(m: dict[str, Any], shards: int = 1) -> float:
    """QK^T and PV for one (query, key) pair over every layer and head, at the measured paged-attention rate."""
    return 4 * m["num_layers"] * m["num_heads"] * m["head_dim"] / shards / (ATTN_TFLOPS * 1e12) * 1e3


def decode_grid(m: dict[str, Any], ratios: dict[tuple[int, int], float], copy_tb_s: float, shards: int = 1,
                extra_ms: float = 0.0) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(round(floor_ms(m, b, c, copy_tb_s, shards) * ratio_at(ratios, b, c) + extra_ms, 4)
                       for c in CONTEXTS) for b in BATCHES)


def prefill_from(run: list[dict[str, Any]]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return tuple(r["tokens"] for r in run), tuple(r["ms"] for r in run)


def rdma(gpus: int) -> TransferCosts:
    return TransferCosts(backend="rdma (analytic)", gib_s=round(RDMA_GIB_S * gpus, 3), latency_ms=0.5)


def kv(m: dict[str, Any], budget_gib: float) -> KVCosts:
    per = m["kv_bytes_per_token"]
    return KVCosts(block_size=16, bytes_per_token=per, capacity_tokens=int(budget_gib * 2**30 // per),
                   memory_budget_bytes=int(budget_gib * 2**30))


def h200_8b() -> Profile:
    run, h100 = load(H200_RUN), load(H100_DECODE)
    copy = run["ceilings"]["copy_tb_s"]
    tokens, ms = prefill_from(run["prefill"])
    return Profile(
        name="h200-llama3-8b", device="NVIDIA H200 (141 GB HBM3e), one GPU per replica", model=LLAMA3_8B,
        provenance=Provenance("derived", note=(
            "derived from recorded measurements: prefill = the H200's own recorded table (bf16, dummy weights); "
            f"decode = the H200's HBM floor at its recorded copy rate ({copy:.2f} TB/s) x the step/floor ratio the "
            "current code (GEMV kernel, overlapped steps) measured on the H100 at the same batch and context (the H200 "
            "decode run predates both: its ratios were 1.31-1.62); contexts past 2,048 extend the floor linearly; "
            f"attention per cached pair at the measured paged-attention rate ({ATTN_TFLOPS:.0f} TFLOP/s). Analytic, not "
            "measured: the KV transfer (400 Gb/s RDMA per GPU at 80%) and start-up (60 s engine + 5 s process)."),
            sources=(H200_RUN, H100_DECODE, "benchmarks/RESULTS.md (kernels alone: paged prefill attention)"),
            date="2026-12-04", command="python -m benchmarks.profile_derive"),
        prefill=PrefillCosts(tokens, ms, attention_ms_per_pair=attention_ms_per_pair(LLAMA3_8B),
                             max_num_batched_tokens=8192),
        decode=DecodeCosts(BATCHES, CONTEXTS, decode_grid(LLAMA3_8B, step_floor_ratios(h100), copy)),
        kv=kv(LLAMA3_8B, 100.0), transfer=rdma(1), startup=StartupCosts(engine_s=60.0, process_s=5.0),
        gpus_per_replica=1, extra={"copy_tb_s": copy, "matmul_tflop_s": run["ceilings"]["matmul_tflop_s"],
                                   "kv_budget_note": "100 GiB of the 141 GB: 16 GB weights, the rest activations, "
                                                     "graphs, logits"})


def h100_8b_v49k() -> Profile:
    """The recorded one-GPU serving runs that are complete for both modes ran with overlapped steps off, so this
    profile's decode steps are the no-overlap ones."""
    h100 = load(H100_DECODE)
    m = shape(32, 4096, 32, 8, 14336, 49152)
    copy = h100["ceilings"]["copy_tb_s"]
    tokens, ms = prefill_from(load(H100_PREFILL)["prefill_offline_run"]["prefill"])
    return Profile(
        name="h100-llama3-8b-v49k-no-overlap", device="NVIDIA H100 80GB HBM3, one GPU per replica",
        model={**m, "note": "Llama-3-8B shape with SmolLM2's 49,152-token vocabulary (benchmarks/serving_compare.py)"},
        provenance=Provenance("derived", note=(
            "derived from recorded measurements on the H100: decode = floor (this vocabulary's weights) x the "
            "recorded step/floor ratios of the current code without overlapped steps (ms_step_no_overlap, as the "
            "serving runs it is compared with); prefill = the recorded table; a cuda_ipc pull on one "
            "GPU at ~0.75 of its copy rate with 0.5 ms of start_read host time (RESULTS.md). Start-up not measured."),
            sources=(H100_DECODE, H100_PREFILL, "benchmarks/RESULTS.md (CUDA IPC KV transfer, ids as arrays)"),
            date="2026-12-04", command="python -m benchmarks.profile_derive"),
        prefill=PrefillCosts(tokens, ms, attention_ms_per_pair=attention_ms_per_pair(m), max_num_batched_tokens=8192),
        decode=DecodeCosts(BATCHES, CONTEXTS, decode_grid(m, step_floor_ratios(h100, "ms_step_no_overlap"), copy)),
        kv=kv(m, 10.0), transfer=TransferCosts("cuda_ipc", gib_s=1000.0, latency_ms=0.5),
        startup=StartupCosts(engine_s=60.0, process_s=5.0), gpus_per_replica=1, extra={"copy_tb_s": copy})


def allreduce_ms(layers: int, rows: int, hidden: int, tp: int) -> float:
    """Two all-reduces per layer of `rows` x `hidden` bf16 activations (ring: 2 (tp-1)/tp of the bytes each)."""
    bytes_moved = 2 * (tp - 1) / tp * rows * hidden * 2
    return 2 * layers * (ALLREDUCE_US / 1e3 + bytes_moved / (NVLINK_BUS_GB_S * 1e9) * 1e3)


def prefill_70b(run: dict[str, Any], tp: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Dense FLOPs split over `tp` GPUs at the fraction of the matmul rate the 8B reached at that length."""
    m, matmul = LLAMA3_70B, run["ceilings"]["matmul_tflop_s"]
    fractions = {r["tokens"]: r["fraction_of_matmul"] for r in run["prefill"]}
    tokens = (*sorted(fractions), 16384)
    out = []
    for n in tokens:
        frac = fractions.get(n, fractions[max(fractions)])
        dense = 2 * n * (m["parameters"] - 2 * m["vocab_size"] * m["hidden_size"]) + 2 * m["vocab_size"] * m["hidden_size"]
        ms = dense / tp / (frac * matmul * 1e12) * 1e3 + attention_ms_per_pair(m, tp) * n * (n + 1) / 2
        out.append(round(ms + allreduce_ms(m["num_layers"], n, m["hidden_size"], tp), 3))
    return tokens, tuple(out)


def h200_70b_tp4() -> Profile:
    run, tp, m = load(H200_RUN), 4, LLAMA3_70B
    copy, ratios = run["ceilings"]["copy_tb_s"], step_floor_ratios(load(H100_DECODE))
    grid = tuple(tuple(round(floor_ms(m, b, c, copy, tp) * ratio_at(ratios, b, c)
                             + allreduce_ms(m["num_layers"], b, m["hidden_size"], tp), 4) for c in CONTEXTS)
                 for b in BATCHES)
    return Profile(
        name="h200-llama3-70b-tp4", device="4x NVIDIA H200 (NVLink) per replica, tensor parallel", model=m,
        provenance=Provenance("analytic", note=(
            "ANALYTIC, no measurement of this model or of tensor parallelism exists: weights and KV split over 4 "
            "GPUs; decode = per-GPU HBM floor x the 8B's measured step/floor ratio + two all-reduces per layer "
            f"({ALLREDUCE_US:.0f} us + bytes at {NVLINK_BUS_GB_S:.0f} GB/s); prefill = dense FLOPs / 4 at the "
            "fraction of the matmul rate the 8B reached at that length + attention + all-reduces; KV 96 GiB per GPU; "
            "transfer 4 NICs of 400 Gb/s at 80%; start-up 150 s engine (141 GB of weights) + 5 s process. Replace with "
            "`disagg profile` on a 4-GPU machine once tensor parallelism runs."),
            sources=(H200_RUN, H100_DECODE), date="2026-12-04", command="python -m benchmarks.profile_derive"),
        prefill=PrefillCosts(*prefill_70b(run, tp), attention_ms_per_pair=attention_ms_per_pair(m, tp),
                             max_num_batched_tokens=8192),
        decode=DecodeCosts(BATCHES, CONTEXTS, grid), kv=kv(m, 4 * 96.0), transfer=rdma(tp),
        startup=StartupCosts(engine_s=150.0, process_s=5.0), gpus_per_replica=tp,
        extra={"tensor_parallel": tp, "copy_tb_s": copy, "matmul_tflop_s": run["ceilings"]["matmul_tflop_s"]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/profiles", help="folder for the profile files")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for name, build in (("h200_llama3_8b", h200_8b), ("h100_llama3_8b_v49k_no_overlap", h100_8b_v49k),
                        ("h200_llama3_70b_tp4", h200_70b_tp4)):
        prof = build()
        prof.save(os.path.join(a.out, f"{name}.json"))
        print(f"{name}: {prof.provenance.kind}; prefill {dict(zip(prof.prefill.tokens, prof.prefill.ms, strict=True))} "
              f"ms; decode batch 64: {dict(zip(prof.decode.context, prof.decode.ms[3], strict=True))} ms")


if __name__ == "__main__":
    main()
