"""Host time of a decode step: the engine with its model replaced by a stub, so what is timed is scheduling,
batch building, sampling and bookkeeping (the part of a step during which a GPU would sit idle).

    python -m benchmarks.host_overhead [--batches 1,64,256] [--context 2048] [--steps 50] [--profile]

Every request starts with `--context` tokens of KV already computed (the decode role) and decodes greedily.
--profile prints the top functions of one batch size's steps (cProfile, by own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from benchmarks.given_kv import receive_given_kv
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams

TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=8192, eos_token_ids=(0,), bos_token_id=1)


class StubModel(torch.nn.Module):
    """Returns zeros of the right shapes without computing anything."""

    def forward(self, ids: torch.Tensor, *_: object) -> torch.Tensor:
        return torch.zeros(ids.shape[0], TINY.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.zeros(hidden.shape[0], TINY.vocab_size)


def step_ms(batch: int, context: int, steps: int, profile: bool) -> float:
    eng = LLMEngine(EngineConfig(model="tiny", load_format="dummy", dummy_model=TINY, dtype="float32", device="cpu",
                                 cache=CacheConfig(num_blocks=batch * (context // 16 + 8)),
                                 scheduler=SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=8192)))
    eng._runner.model = StubModel()
    for i in range(batch):
        params = SamplingParams(max_tokens=steps + 10, temperature=0, ignore_eos=True)
        receive_given_kv(eng, f"r{i}", [3 + i % 500] * context, params)
    for _ in range(3):
        eng.step()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(steps):
        eng.step()
    if prof:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256", help="decode batch sizes")
    ap.add_argument("--context", type=int, default=2048, help="tokens of context per request")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per batch size")
    ap.add_argument("--profile", action="store_true", help="cProfile the steps (slower: times are not comparable)")
    a = ap.parse_args(argv)
    if a.context < 1 or a.steps < 1:
        ap.error("--context and --steps must be positive")
    for b in (int(x) for x in a.batches.split(",")):
        print(f"batch {b:4d}, context {a.context}: {step_ms(b, a.context, a.steps, a.profile):.3f} ms of host work "
              "per decode step", flush=True)


if __name__ == "__main__":
    main()
