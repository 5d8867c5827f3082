"""The Triton kernels at real shapes on a GPU: correctness against their torch twins, then timings.

    python -m benchmarks.kernels_gpu [--quick] [--iters 20] [--dtype bfloat16]

Shapes are Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, block size 16) on a block-major
cache with 2 layers, so every kernel reads a strided layer view as the engine does. Decode: batch 1..256 x
context 512..8192, reported as achieved bandwidth (K/V bytes read / time). Prefill: 512..8192 new tokens
(one sequence, and a chunked-prefill batch over a cached prefix), reported as TFLOP/s of the causal work
(4 * D * H flops per visible query-key pair), next to torch's SDPA on the same sequence in contiguous layout.
Times are medians of --iters runs (CUDA events) of a CUDA-graph replay (--no-graph: eager) after warm-up,
with L2 flushed before each run. --sweep times tile/warp/stage choices instead.
Exits 1 if any check fails. GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_ref,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    write_kv,
    write_kv_ref,
)
from engine.kernels.decode_attention import default_num_splits

H, KVH, D, BS, LAYERS = 32, 8, 128, 16, 2
DEV = torch.device("cuda")
FAILURES: list[str] = []
GRAPH = True
_flush = None


def bench(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn over iters runs, L2 flushed before each. With GRAPH (the default) fn is captured
    in a CUDA graph and replayed, so host launch overhead (which the engine's decode graphs remove) is not timed."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEV)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if GRAPH:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
        run()
    times = []
    for _ in range(iters):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    bad = not torch.isfinite(actual).all().item()
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    ok = not bad and torch.allclose(actual.float(), expected.float(), rtol=tol, atol=tol)
    if not ok:
        FAILURES.append(f"{name}: max abs err {err:.3g}{' (non-finite values)' if bad else ''}")
    return f"{'ok' if ok else 'FAIL'} {err:.1e}"


def make_cache(num_blocks: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    big = torch.randn(num_blocks, LAYERS, 2, BS, KVH, D, dtype=dtype, device=DEV)
    return big, big[:, 1]


def tables_for(lens: list[int], num_blocks: int) -> torch.Tensor:
    need = [-(-n // BS) for n in lens]
    perm = torch.randperm(num_blocks, device=DEV).to(torch.int32)
    width = max(need)
    rows, at = [], 0
    for n in need:
        row = torch.zeros(width, dtype=torch.int32, device=DEV)
        row[:n] = perm[at : at + n]
        rows.append(row)
        at += n
    return torch.stack(rows)


def decode_case(B: int, ctx: int, dtype: torch.dtype, iters: int, tol: float) -> str:
    torch.manual_seed(B * 7 + ctx)
    lens = [ctx] * B
    lens[0] = max(1, ctx - 37)  # one ragged row, not a multiple of the block size
    num_blocks = sum(-(-n // BS) for n in lens) + 8
    _, cache = make_cache(num_blocks, dtype)
    tables = tables_for(lens, num_blocks)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(B, H, D, dtype=dtype, device=DEV)
    scale = D**-0.5
    splits = default_num_splits(ctx, B, KVH)
    out = paged_decode_attention(q, cache, tables, seq_lens, scale, max_seq_len=ctx)
    out1 = paged_decode_attention(q, cache, tables, seq_lens, scale, 1)
    n = min(B, 8)  # the twin loops over sequences: check a few rows (rows are independent)
    ref = paged_decode_attention_ref(q[:n], cache, tables[:n], seq_lens[:n], scale)
    status = check(f"decode B={B} ctx={ctx}", out[:n], ref, tol)
    check(f"decode B={B} ctx={ctx} 1 split vs {splits}", out1, out, tol)
    kv_bytes = sum(lens) * KVH * D * 2 * cache.element_size()
    ms = bench(lambda: paged_decode_attention(q, cache, tables, seq_lens, scale, max_seq_len=ctx), iters)
    ms1 = bench(lambda: paged_decode_attention(q, cache, tables, seq_lens, scale, 1), iters)
    return (f"{B:>6} {ctx:>6} {splits:>6} {status:>14} {ms:>9.4f} {kv_bytes / ms / 1e6:>8.0f} "
            f"{ms1:>13.4f} {kv_bytes / ms1 / 1e6:>8.0f}")


def run_decode(batches: list[int], contexts: list[int], dtype: torch.dtype, iters: int, tol: float) -> None:
    print(f"\n## decode  (H={H} KVH={KVH} D={D} block={BS} {dtype}; GB/s = K/V bytes read / time)")
    print(f"{'batch':>6} {'ctx':>6} {'splits':>6} {'check':>14} {'ms':>9} {'GB/s':>8} {'ms (1 split)':>13} {'GB/s':>8}")
    for ctx in contexts:
        for B in batches:
            print(decode_case(B, ctx, dtype, iters, tol), flush=True)
            torch.cuda.empty_cache()


def causal_flops(qlens: list[int], lens: list[int]) -> float:
    pairs = sum(n * (L - n) + n * (n + 1) / 2 for n, L in zip(qlens, lens, strict=True))
    return 4.0 * D * H * pairs


def prefill_twin_check(name: str, q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, qlens: list[int],
                       lens: list[int], out: torch.Tensor, tol: float, rows: int = 1024) -> str:
    """Twin on the first and last `rows` new tokens of each sequence: a chunk of new tokens [a, b) of a sequence
    is itself a valid batch entry (seq_len L - (n - b), q_len b - a), which keeps the twin's memory small."""
    statuses = []
    start = 0
    for b, (n, L) in enumerate(zip(qlens, lens, strict=True)):
        for a, e in {(0, min(rows, n)), (max(0, n - rows), n)}:
            qsl = torch.tensor([0, e - a], dtype=torch.int32, device=DEV)
            sl = torch.tensor([L - (n - e)], dtype=torch.int32, device=DEV)
            ref = paged_prefill_attention_ref(q[start + a : start + e], cache, tables[b : b + 1], qsl, sl, e - a, D**-0.5)
            statuses.append(check(f"{name} seq {b} rows {a}:{e}", out[start + a : start + e], ref, tol))
        start += n
    return next((s for s in statuses if s.startswith("FAIL")), statuses[0])


def prefill_case(case: str, qlens: list[int], lens: list[int], dtype: torch.dtype, iters: int, tol: float) -> str:
    torch.manual_seed(sum(lens) + len(qlens))
    num_blocks = sum(-(-n // BS) for n in lens) + 8
    _, cache = make_cache(num_blocks, dtype)
    tables = tables_for(lens, num_blocks)
    T = sum(qlens)
    q = torch.randn(T, H, D, dtype=dtype, device=DEV)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = D**-0.5

    def fn() -> torch.Tensor:
        return paged_prefill_attention(q, cache, tables, qsl, seq_lens, max(qlens), scale)

    out = fn()
    status = prefill_twin_check(f"prefill {case} T={T}", q, cache, tables, qlens, lens, out, tol)
    ms = bench(fn, iters)
    flops = causal_flops(qlens, lens)
    sdpa = ""
    if len(qlens) == 1:  # the same sequence through torch's SDPA on contiguous K/V, as a yardstick
        qt = q.transpose(0, 1)[None]
        kt = torch.randn(1, KVH, T, D, dtype=dtype, device=DEV)
        vt = torch.randn_like(kt)
        try:
            sms = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), iters)
            sdpa = f"{sms:>9.3f} {flops / sms / 1e9:>8.1f}"
        except RuntimeError as e:  # an SDPA without GQA support: no yardstick
            sdpa = f"sdpa n/a ({type(e).__name__})"
    return f"{case:>26} {T:>7} {status:>14} {ms:>9.3f} {flops / ms / 1e9:>8.1f} {sdpa}"


def run_prefill(totals: list[int], dtype: torch.dtype, iters: int, tol: float) -> None:
    print(f"\n## prefill  (H={H} KVH={KVH} D={D} block={BS} {dtype}; TFLOP/s of causal work)")
    print(f"{'case':>26} {'tokens':>7} {'check':>14} {'ms':>9} {'TFLOP/s':>8} {'sdpa ms':>9} {'TFLOP/s':>8}")
    for total in totals:
        print(prefill_case("1 seq", [total], [total], dtype, iters, tol), flush=True)
        if total >= 2048:  # chunked prefill: 4 sequences each with 1024 tokens already cached
            print(prefill_case("4 seqs + 1024 cached", [total // 4] * 4, [total // 4 + 1024] * 4, dtype, iters, tol),
                  flush=True)
        torch.cuda.empty_cache()


def run_write_kv(token_counts: list[int], dtype: torch.dtype, iters: int) -> None:
    from engine.kernels.kv_write import rotary_write_kv, rotary_write_kv_ref
    from engine.kernels.rotary import apply_rotary

    print(f"\n## write_kv, and rotary + write_kv fused  (H={H} KVH={KVH} D={D} block={BS} {dtype})")
    print(f"{'tokens':>7} {'check':>14} {'ms':>9} {'GB/s':>8} {'fused check':>14} {'fused ms':>9} {'apart ms':>9}")
    cos, sin = (f(torch.rand(8192, D, device=DEV) * 6) for f in (torch.cos, torch.sin))
    for T in token_counts:
        num_blocks = -(-T // BS) * 2 + 4
        big, cache = make_cache(num_blocks, dtype)
        big_ref = big.clone()
        slots = torch.randperm(num_blocks * BS, device=DEV)[:T]
        slots[::7] = -1
        q, k, v = (torch.randn(T, n, D, dtype=dtype, device=DEV) for n in (H, KVH, KVH))
        pos = torch.randint(0, 8192, (T,), device=DEV)
        write_kv(k, v, cache, slots)
        write_kv_ref(k, v, big_ref[:, 1], slots)
        status = check(f"write_kv T={T}", big, big_ref, 0.0)
        ms = bench(lambda: write_kv(k, v, cache, slots), iters)  # noqa: B023
        q_ref = q.clone()
        rotary_write_kv(pos, q, k, v, cos, sin, cache, slots)
        rotary_write_kv_ref(pos, q_ref, k, v, cos, sin, big_ref[:, 1], slots)
        fused = check(f"rotary_write_kv T={T}", torch.cat([q.flatten(), big.flatten()]),
                      torch.cat([q_ref.flatten(), big_ref.flatten()]), 2e-2 if dtype != torch.float32 else 1e-5)
        ms_fused = bench(lambda: rotary_write_kv(pos, q, k, v, cos, sin, cache, slots), iters)  # noqa: B023
        ms_apart = bench(lambda: (apply_rotary(pos, q, k, cos, sin), write_kv(k, v, cache, slots)), iters)  # noqa: B023
        moved = 2 * 2 * T * KVH * D * k.element_size()  # read k, v; write them
        print(f"{T:>7} {status:>14} {ms:>9.4f} {moved / ms / 1e6:>8.0f} {fused:>14} {ms_fused:>9.4f} {ms_apart:>9.4f}")


def run_rmsnorm(rows: list[int], dtype: torch.dtype, iters: int, tol: float, hidden: int = 4096) -> None:
    print(f"\n## fused_add_rmsnorm  (hidden={hidden} {dtype})")
    print(f"{'rows':>7} {'check':>14} {'ms':>9} {'GB/s':>8}")
    for N in rows:
        x, r = (torch.randn(N, hidden, dtype=dtype, device=DEV) for _ in range(2))
        w = torch.rand(hidden, dtype=dtype, device=DEV) + 0.5
        out, h = fused_add_rmsnorm(x, r, w, 1e-5)
        out_ref, h_ref = fused_add_rmsnorm_ref(x, r, w, 1e-5)
        check(f"rmsnorm residual N={N}", h, h_ref, 0.0)
        status = check(f"rmsnorm N={N}", out, out_ref, tol)
        ms = bench(lambda: fused_add_rmsnorm(x, r, w, 1e-5), iters)  # noqa: B023
        moved = 4 * N * hidden * x.element_size()  # read x, residual; write out, h
        print(f"{N:>7} {status:>14} {ms:>9.4f} {moved / ms / 1e6:>8.0f}")


def sweep(dtype: torch.dtype, iters: int) -> None:
    """Time the attention kernels over tile/warp/stage choices at a few shapes (to pick the defaults)."""
    import itertools

    scale = D**-0.5
    print("\n## decode sweep: batch ctx -> block_n warps stages splits: ms")
    for B, ctx in [(1, 8192), (8, 2048), (64, 2048), (256, 4096)]:
        lens = [ctx] * B
        num_blocks = sum(-(-n // BS) for n in lens) + 8
        _, cache = make_cache(num_blocks, dtype)
        tables = tables_for(lens, num_blocks)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        q = torch.randn(B, H, D, dtype=dtype, device=DEV)
        auto = default_num_splits(ctx, B, KVH)
        results = []
        for bn, nw, ns, sp in itertools.product([32, 64, 128], [4, 8], [2, 3], sorted({auto, 2 * auto})):
            def fn(bn: int = bn, nw: int = nw, ns: int = ns, sp: int = sp) -> torch.Tensor:
                return paged_decode_attention(q, cache, tables, seq_lens, scale, sp, block_n=bn, num_warps=nw,  # noqa: B023
                                              num_stages=ns)
            try:
                results.append((bench(fn, iters), bn, nw, ns, sp))
            except Exception as e:  # noqa: BLE001 - out of resources and the like
                print(f"  B={B} ctx={ctx} bn={bn} w={nw} s={ns} sp={sp}: {type(e).__name__}")
        kv_bytes = sum(lens) * KVH * D * 2 * cache.element_size()
        results.sort()
        for ms, bn, nw, ns, sp in results[:5]:
            print(f"  B={B:<4} ctx={ctx:<5} block_n={bn:<4} warps={nw} stages={ns} splits={sp:<3} {ms:.4f} ms "
                  f"{kv_bytes / ms / 1e6:.0f} GB/s")
        torch.cuda.empty_cache()
    print("\n## prefill sweep: tokens -> block_m block_n warps stages: ms")
    for T in (2048, 8192):
        num_blocks = -(-T // BS) + 8
        _, cache = make_cache(num_blocks, dtype)
        tables = tables_for([T], num_blocks)
        q = torch.randn(T, H, D, dtype=dtype, device=DEV)
        qsl = torch.tensor([0, T], dtype=torch.int32, device=DEV)
        seq_lens = torch.tensor([T], dtype=torch.int32, device=DEV)
        results = []
        for bm, bn, nw, ns in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3]):
            def fn(bm: int = bm, bn: int = bn, nw: int = nw, ns: int = ns) -> torch.Tensor:
                return paged_prefill_attention(q, cache, tables, qsl, seq_lens, T, scale, block_m=bm, block_n=bn,  # noqa: B023
                                               num_warps=nw, num_stages=ns)
            try:
                results.append((bench(fn, iters), bm, bn, nw, ns))
            except Exception as e:  # noqa: BLE001
                print(f"  T={T} bm={bm} bn={bn} w={nw} s={ns}: {type(e).__name__}")
        flops = causal_flops([T], [T])
        results.sort()
        for ms, bm, bn, nw, ns in results[:6]:
            print(f"  T={T:<5} block_m={bm:<4} block_n={bn:<4} warps={nw} stages={ns} {ms:.3f} ms "
                  f"{flops / ms / 1e9:.1f} TFLOP/s")
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--only", default="", help="comma list of: decode,prefill,write_kv,rmsnorm")
    ap.add_argument("--no-graph", action="store_true", help="time eager launches (host overhead included)")
    ap.add_argument("--sweep", action="store_true", help="time tile/warp/stage choices of the attention kernels")
    args = ap.parse_args()
    global GRAPH
    GRAPH = not args.no_graph
    if not torch.cuda.is_available():
        print("kernels_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    only = set(args.only.split(",")) - {""}
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}"
          f"  timing: {'CUDA graph replay' if GRAPH else 'eager launches'}")
    if args.sweep:
        sweep(dtype, args.iters)
        return 0
    if args.quick:
        batches, contexts, totals, tokens, rows = [1, 64, 256], [512, 8192], [512, 4096], [256], [256]
    else:
        batches, contexts = [1, 8, 32, 64, 128, 256], [512, 2048, 8192]
        totals, tokens, rows = [512, 1024, 2048, 4096, 8192], [1, 256, 8192], [1, 256, 8192]
    if not only or "write_kv" in only:
        run_write_kv(tokens, dtype, args.iters)
    if not only or "decode" in only:
        run_decode(batches, contexts, dtype, args.iters, tol)
    if not only or "prefill" in only:
        run_prefill(totals, dtype, args.iters, tol)
    if not only or "rmsnorm" in only:
        run_rmsnorm(rows, dtype, args.iters, tol)
    if FAILURES:
        print("\nFAILED checks:\n  " + "\n  ".join(FAILURES))
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
