"""The batch-1 GEMV kernel at Llama-3-8B's projection shapes against cuBLAS (F.linear), on a GPU.

    python -m benchmarks.gemv_gpu [--sweep] [--iters 20] [--dtype bfloat16]

For each weight shape: the kernel checked against its torch twin, then its time and bandwidth (weight bytes /
time) next to F.linear's on the same [1, K] input, both as CUDA-graph replays with L2 flushed (kernels_gpu's
`bench`). --sweep times every (BLOCK_N, BLOCK_K, warps, stages) choice per shape and prints the best, to fill
`engine.kernels.gemv.CONFIGS`. Exits 1 if a check fails. GPU only.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from benchmarks import kernels_gpu
from benchmarks.kernels_gpu import bench, check
from engine.kernels.gemv import CONFIGS, DEFAULT_CONFIG, gemv, gemv_ref

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
TILES = [(4, 256), (4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256)]


def operands(N: int, K: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(N + K)
    return torch.randn(1, K, dtype=dtype, device="cuda"), torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5


def compare(dtype: torch.dtype, iters: int, tol: float) -> None:
    print(f"\n## gemv vs F.linear, one row ({dtype}); GB/s = weight bytes / time")
    print(f"{'shape':>8} {'N x K':>14} {'check':>12} {'gemv ms':>9} {'GB/s':>6} {'cuBLAS ms':>10} {'GB/s':>6} {'config':>18}")
    for name, (N, K) in SHAPES.items():
        x, w = operands(N, K, dtype)
        status = check(f"gemv {name}", gemv(x, w), gemv_ref(x, w), tol)
        ms = bench(lambda: gemv(x, w), iters)  # noqa: B023
        ms_ref = bench(lambda: F.linear(x, w), iters)  # noqa: B023
        gb = w.numel() * w.element_size() / 1e6
        print(f"{name:>8} {f'{N} x {K}':>14} {status:>12} {ms:>9.4f} {gb / ms:>6.0f} {ms_ref:>10.4f} {gb / ms_ref:>6.0f}"
              f" {str(CONFIGS.get((N, K), DEFAULT_CONFIG)):>18}")


def sweep(dtype: torch.dtype, iters: int) -> None:
    print(f"\n## gemv sweep ({dtype}): shape -> (BLOCK_N, BLOCK_K, warps, stages): ms, GB/s (best 4)")
    for name, (N, K) in SHAPES.items():
        x, w = operands(N, K, dtype)
        gb = w.numel() * w.element_size() / 1e6
        results = [(bench(lambda: F.linear(x, w), iters), "F.linear")]  # noqa: B023
        for (bn, bk), warps, stages in itertools.product(TILES, [4, 8], [1, 2, 3, 4]):
            cfg = (bn, bk, warps, stages)
            try:
                results.append((bench(lambda cfg=cfg: gemv(x, w, config=cfg), iters), str(cfg)))  # noqa: B023
            except Exception as e:  # noqa: BLE001 - out of resources and the like
                print(f"  {name} {cfg}: {type(e).__name__}")
        results.sort()
        ranked = [f"{label} {ms:.4f} ms {gb / ms:.0f}" for ms, label in results[:4]]
        cublas = next(ms for ms, label in results if label == "F.linear")
        print(f"  {name:>8} (N={N}, K={K}): " + " | ".join(ranked) + f" || F.linear {cublas:.4f} ms {gb / cublas:.0f}",
              flush=True)
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--sweep", action="store_true", help="time every tile/warp/stage choice per shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemv_gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {__import__('triton').__version__}")
    if args.sweep:
        sweep(dtype, args.iters)
    compare(dtype, args.iters, {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype])
    if kernels_gpu.FAILURES:
        print("\nFAILED checks:\n  " + "\n  ".join(kernels_gpu.FAILURES))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
