"""Weights quantized at load (engine/quantization.py): the int8 kernel against its twin, and a whole model."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, EngineConfig
from engine.engine import LLMEngine
from engine.quantization import int8_linear, int8_linear_ref, quantize_int8
from engine.request import SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_int8_linear_matches_its_twin(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and (w - q.float() * scale[:, None]).abs().max() <= scale.max() / 2 + 1e-6
    x = torch.randn(rows, 64, generator=g).to(dtype)
    got, ref = int8_linear(x, q, scale.to(torch.bfloat16)), int8_linear_ref(x, q, scale)
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=6e-2)  # activations go through bf16


def test_int8_engine_stays_close_to_float32(tiny_llama_dir: str) -> None:
    """Every projection and the LM head are int8: the random tiny model (peaked, chaotic logits) starts the same
    greedy continuation as float32, with close logprobs of those tokens. SmolLM2's figures: benchmarks/RESULTS.md."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    outs = []
    for quantization in (None, "int8"):
        eng = LLMEngine(EngineConfig(model=tiny_llama_dir, quantization=quantization))
        eng.add_request("a", list(range(3, 40)), params)
        toks, lps = [], []
        while eng.has_unfinished():
            for so in eng.step():
                toks += so.new_token_ids
                lps += [lp[0] for lp in so.new_logprobs]
        outs.append((toks, lps))
    (ref, ref_lp), (q, q_lp) = outs
    agree = next((i for i, (a, b) in enumerate(zip(ref, q, strict=True)) if a != b), len(ref))
    assert agree >= 2, (ref, q)
    assert max(abs(a - b) for a, b in zip(ref_lp[:agree], q_lp[:agree], strict=True)) < 0.25


def test_int8_is_a_cpu_path() -> None:
    with pytest.raises(ConfigError, match="quantization"):
        EngineConfig(quantization="int4")
