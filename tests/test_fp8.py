"""FP8 weights (engine/fp8.py, engine/kernels/fp8.py, engine/fp8_checkpoint.py): the kernels under triton's
interpreter against their twins, the `_scaled_mm` call as the CUDA path makes it (run on torch's CPU
implementation, which checks the same scale shapes), quantization at load, the CPU fallback, and HF FP8
checkpoints (per tensor and per channel) against the dequantized reference. No GPU runs here."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels, decorated at import) are imported

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.fp8 import (  # noqa: E402
    FP8,
    FP8_MAX,
    dequantize_fp8,
    fp8_linear,
    fp8_linear_ref,
    quantize_fp8,
    scaled_mm_rowwise,
)
from engine.kernels.fp8 import fp8_gemv, fp8_gemv_ref, quantize_rows_fp8, quantize_rows_fp8_ref  # noqa: E402
from engine.loader import WeightLoadError  # noqa: E402
from engine.model_shard import load_model  # noqa: E402
from engine.parallel.group import TPGroup  # noqa: E402
from engine.request import SamplingParams  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402


def fp8_grid(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random FP8 values (finite, both signs, normal and subnormal) as float32."""
    return (torch.randn(shape, generator=gen) * 40).clamp(-FP8_MAX, FP8_MAX).to(FP8).float()


@pytest.mark.parametrize("N, K, dtype, bias, config", [(64, 128, torch.float32, False, (8, 32, 4, 1)),
                                                       (50, 100, torch.bfloat16, True, (8, 32, 4, 1)),
                                                       (96, 96, torch.float16, False, (16, 32, 4, 2)),
                                                       (33, 2048, torch.bfloat16, True, None)])
def test_fp8_gemv_matches_twin(N: int, K: int, dtype: torch.dtype, bias: bool,
                               config: tuple[int, int, int, int] | None) -> None:
    g = torch.Generator().manual_seed(N + K)
    w, scale = quantize_fp8(torch.randn(N, K, generator=g) / K**0.5)
    x = torch.randn(1, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    y = fp8_gemv(x, w, scale, b, config=config)
    assert y.shape == (1, N) and y.dtype == dtype and not y.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), fp8_gemv_ref(x, w, scale, b).float(), rtol=tol, atol=tol)
    with pytest.raises(AssertionError, match="need x"):
        fp8_gemv(torch.randn(2, K).to(dtype), w, scale)
    with pytest.raises(AssertionError):
        fp8_gemv(x, w.float(), scale)


@pytest.mark.parametrize("M, K, dtype", [(1, 16, torch.float32), (5, 100, torch.bfloat16), (3, 3000, torch.float16)])
def test_quantize_rows_exact_on_grid_values(M: int, K: int, dtype: torch.dtype) -> None:
    """Rows of FP8 values times a power of two, each holding +-448 once: every step (absmax, scale, division,
    saturation, store, masking) must match the twin bit for bit, with no rounding involved (the interpreter's
    FP8 rounding is not the GPU's, see the kernel's docstring)."""
    g = torch.Generator().manual_seed(K)
    q = fp8_grid((M, K), g)
    q[torch.arange(M), torch.randint(0, K, (M,), generator=g)] = FP8_MAX * torch.tensor([1.0, -1.0]).repeat(M)[:M]
    x = (q * 2.0 ** torch.randint(-12, 4, (M, 1), generator=g).float()).to(dtype)
    big = torch.cat([x, torch.full((M, 7), float("nan"), dtype=dtype)], dim=1)[:, :K]  # a row stride != K
    got_q, got_s = quantize_rows_fp8(big, block_k=64)
    ref_q, ref_s = quantize_rows_fp8_ref(x)
    assert got_q.dtype == FP8 and got_q.shape == (M, K) and got_s.shape == (M, 1) and got_s.dtype == torch.float32
    assert torch.equal(got_s, ref_s) and torch.equal(got_q.float(), ref_q.float())
    assert torch.equal(ref_q.float() * ref_s, x.float()), "grid values come back exactly"


def test_quantize_rows_close_on_random_values() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 300, generator=g).to(torch.bfloat16)
    x[2] = 0  # a row of zeros: scale floored, zeros out
    got_q, got_s = quantize_rows_fp8(x)
    ref_q, ref_s = quantize_rows_fp8_ref(x)
    assert torch.equal(got_s, ref_s) and (got_q[2].float() == 0).all()
    agree = (got_q.float() == ref_q.float()).float().mean().item()
    assert agree > 0.97, agree  # the interpreter's FP8 rounding differs from round-to-nearest-even on a few
    assert ((ref_q.float() * ref_s - x.float()).abs() <= ref_s * 16.01).all()  # half an e4m3 step (32 at 448)


def test_quantize_fp8_weights() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 64, generator=g)
    w[3] = 0
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8 and scale.shape == (40,) and scale[3] == 1 and (q[3].float() == 0).all()
    assert torch.equal(q.float().abs().amax(dim=1)[torch.arange(40) != 3], torch.full((39,), FP8_MAX))
    rel = (dequantize_fp8(q, scale, torch.float32) - w).abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-9)
    assert rel.max() <= 16 / FP8_MAX + 1e-6  # half a step (32) of the top binade [256, 448], relative to 448


@pytest.mark.parametrize("M, bias", [(2, False), (7, True)])
def test_scaled_mm_call_matches_twin(M: int, bias: bool) -> None:
    """The exact torch._scaled_mm call of the CUDA path (layouts, scale shapes, bf16 out), run by torch's CPU
    implementation, equals the twin's exact float32 product rounded to bf16."""
    g = torch.Generator().manual_seed(M)
    w, ws = quantize_fp8(torch.randn(48, 32, generator=g))
    x = torch.randn(M, 32, generator=g).to(torch.bfloat16)
    b = torch.randn(48, generator=g).to(torch.bfloat16) if bias else None
    xq, xs = quantize_rows_fp8_ref(x)
    y = scaled_mm_rowwise(xq, xs, w, ws, b)
    assert y.dtype == torch.bfloat16 and y.shape == (M, 48)
    ref = fp8_linear_ref(x, w, ws, b)
    torch.testing.assert_close(y.float(), ref.float(), rtol=8e-3, atol=1e-2)  # both round to bf16 once
    with pytest.raises(AssertionError, match="multiples of 16"):
        scaled_mm_rowwise(xq[:, :24], xs, w[:, :24].contiguous(), ws)


def test_fp8_linear_ref_tracks_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """One row (weight-only) and several rows (W8A8 per token) both stay within FP8's error of the float product;
    on the CPU fp8_linear is the twin."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g) / 128**0.5
    q, scale = quantize_fp8(w)
    for rows in (1, 9):
        x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
        exact = x.float() @ w.t()
        y = fp8_linear(x, q, scale)
        assert torch.equal(y, fp8_linear_ref(x, q, scale)) and y.dtype == torch.bfloat16
        err = (y.float() - exact).abs().mean() / exact.abs().mean()
        assert err < (0.04 if rows == 1 else 0.06), (rows, err)  # e4m3 keeps 3 mantissa bits


# --- whole models: quantized at load, and Hugging Face FP8 checkpoints ---------------------------------------------

CT_CHANNEL = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": {
                  "num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
                  "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}}
FORMATS = {  # name -> (quantization_config, per-channel scales, with input scales)
    "fp8-per-tensor": ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}, False, True),
    "compressed-tensors-channel": (CT_CHANNEL, True, False),
    "fbgemm-channel": ({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                        "modules_to_not_convert": ["lm_head"]}, True, False),
}


def write_fp8_checkpoint(src: Path, dst: Path, fmt: str) -> Path:
    """Copy the HF folder `src` to `dst` with every decoder projection stored as FP8 + `weight_scale` (+
    `input_scale`), as the format writes them; also write `dst`-dequantized (the same values in float32)."""
    qconfig, per_channel, input_scales = FORMATS[fmt]
    tensors = load_file(src / "model.safetensors")
    out, ref = {}, {}
    for name, t in tensors.items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            if per_channel:
                q, s = quantize_fp8(t)
                scale = s[:, None]
            else:
                scale = t.float().abs().max() / FP8_MAX
                q = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            out[name], out[name.replace(".weight", ".weight_scale")] = q, scale
            if input_scales:
                out[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
            ref[name] = q.float() * scale
        else:
            out[name] = ref[name] = t
    config = json.loads((src / "config.json").read_text())
    deq = dst.parent / f"{dst.name}-dequantized"
    for folder, state, cfg in ((dst, out, {**config, "quantization_config": qconfig}), (deq, ref, config)):
        folder.mkdir()
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg))
    return deq


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """format -> (FP8 checkpoint, its dequantized twin), from one tiny random Llama."""
    root = tmp_path_factory.mktemp("fp8")
    make_tiny_llama(str(root / "src"))
    return {fmt: (root / fmt, write_fp8_checkpoint(root / "src", root / fmt, fmt)) for fmt in FORMATS}


def greedy(config: EngineConfig, n: int = 10) -> tuple[list[int], list[float]]:
    eng = LLMEngine(config)
    eng.add_request("a", list(range(3, 40)), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
    toks, lps = [], []
    while eng.has_unfinished():
        for so in eng.step():
            toks += so.new_token_ids
            lps += [lp[0] for lp in so.new_logprobs]
    return toks, lps


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fp8_checkpoint_on_cpu_is_its_dequantized_twin(fp8_dirs: dict[str, tuple[Path, Path]], fmt: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Without FP8 matmuls the checkpoint's FP8 weights are dequantized at load (one warning): every parameter
    equals the dequantized folder's, and so does the output."""
    fp8, deq = fp8_dirs[fmt]
    with caplog.at_level(logging.WARNING, logger="engine.fp8"):
        model = load_model(EngineConfig(model=str(fp8)), torch.device("cpu"))
    assert [r.message for r in caplog.records if r.name == "engine.fp8"] == [
        "FP8 weights: cpu has no FP8 matmul path (needs CUDA sm90+ and triton); the checkpoint's 12 FP8 weights are "
        "dequantized to float32 (FP8 values, float32 speed and memory)"]
    want = dict(load_model(EngineConfig(model=str(deq)), torch.device("cpu")).named_parameters())
    got = dict(model.named_parameters())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert greedy(EngineConfig(model=str(fp8))) == greedy(EngineConfig(model=str(deq)))


@pytest.mark.parametrize("fmt, rank", [("fp8-per-tensor", 0), ("compressed-tensors-channel", 1)])
def test_fp8_checkpoint_keeps_fp8_storage(fp8_dirs: dict[str, tuple[Path, Path]], fmt: str, rank: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Where FP8 matmuls run (forced here), each projection keeps the checkpoint's FP8 bytes with one scale per row
    (a per-tensor scale repeated over its part of the stacked q|k|v and gate|up), also for a tensor-parallel
    rank's slice: dequantized, they are exactly the dequantized folder's parameters."""
    monkeypatch.setattr("engine.fp8_checkpoint.fp8_native", lambda device: True)
    fp8, deq = fp8_dirs[fmt]
    tp = TPGroup(rank, 2)
    model = load_model(EngineConfig(model=str(fp8)), torch.device("cpu"), tp)
    want = dict(load_model(EngineConfig(model=str(deq)), torch.device("cpu"), tp).named_parameters())
    quantized = {k: p for k, p in model.named_parameters() if p.dtype == FP8}
    assert len(quantized) == 3 * 4 and all(k.endswith("_proj.weight") for k in quantized)  # qkv, o, gate_up, down
    for k, p in model.named_parameters():
        got = dequantize_fp8(p, p.quant_scale, torch.float32) if k in quantized else p
        assert torch.equal(got, want[k]), k
    qkv = quantized["model.layers.0.self_attn.qkv_proj.weight"].quant_scale
    assert (len(qkv.unique()) == 3) != FORMATS[fmt][1]  # per tensor: one scale each for q, k and v


def scored(config: EngineConfig, ids: list[int], n: int) -> list[float]:
    """The logprobs of the last `n` tokens of `ids` given the ones before (teacher-forced, one prefill)."""
    eng = LLMEngine(config)
    eng.add_request("a", ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    out = []
    while eng.has_unfinished():
        out += [r[0] for so in eng.step() if so.prompt_logprobs for r in so.prompt_logprobs if r is not None]
    return out[-n:]


def w8a8_drift(ref: EngineConfig, got: EngineConfig) -> float:
    """Mean |logprob difference| of ref's greedy continuation scored by both (prefill: W8A8 on the FP8 path), after
    checking both greedy continuations start with the same token."""
    (want, _), (have, _) = greedy(ref), greedy(got)
    assert want[0] == have[0], (want, have)
    prompt = list(range(3, 40))
    a, b = scored(ref, prompt + want, len(want)), scored(got, prompt + want, len(want))
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_fp8_checkpoint_output_tracks_dequantized(fp8_dirs: dict[str, tuple[Path, Path]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With FP8 storage the CPU runs the GPU path's twin (weight-only at one row, W8A8 per token above). The tiny
    random model's logits are large and chaotic: FP8 activations move its logprobs by ~0.5 nats (a broken scale
    moves them by many); SmolLM2's figures are in benchmarks/RESULTS.md."""
    monkeypatch.setattr("engine.fp8_checkpoint.fp8_native", lambda device: True)
    fp8, deq = fp8_dirs["compressed-tensors-channel"]
    assert w8a8_drift(EngineConfig(model=str(deq)), EngineConfig(model=str(fp8))) < 1.0


def edit_checkpoint(src: Path, dst: Path, config: dict[str, Any] | None = None,
                    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None) -> str:
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    if tensors is not None:
        state = load_file(dst / "model.safetensors")
        tensors(state)
        save_file(state, dst / "model.safetensors")
    return str(dst)


def test_unsupported_fp8_checkpoints_are_named(fp8_dirs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    fp8, _ = fp8_dirs["fp8-per-tensor"]
    name = "model.layers.1.mlp.down_proj"
    cases = [
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, None, "quant_method 'gptq' is not supported"),
        ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}},
         None, r"block-wise FP8 \(weight_block_size \[128, 128\]\) is not supported"),
        ({"quantization_config": {**CT_CHANNEL, "format": "pack-quantized"}}, None, "format 'pack-quantized'"),
        (None, lambda s: s.pop(f"{name}.weight_scale"), f"{name}.weight is stored as F8_E4M3 .no weight_scale"),
        (None, lambda s: s.update({f"{name}.weight_scale": torch.ones(4, 1)}), r"weight_scale has shape \(4, 1\)"),
        (None, lambda s: s.update({f"{name}.weight": s[f"{name}.weight"].to(torch.float8_e5m2)}), "F8_E5M2"),
    ]
    for i, (config, tensors, match) in enumerate(cases):
        folder = edit_checkpoint(fp8, tmp_path / str(i), config, tensors)
        with pytest.raises(WeightLoadError, match=match):
            load_model(EngineConfig(model=folder), torch.device("cpu"))


@pytest.mark.parametrize("native", [False, True])
def test_quantization_fp8_at_load(tiny_llama_dir: str, native: bool, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    """`engine.quantization: fp8` on float weights: FP8 projections and LM head where FP8 matmuls run (forced
    here; the CPU then runs the GPU path's twin), FP8-rounded float weights and one warning where they do not.
    Either way the output stays close to float32's."""
    monkeypatch.setattr("engine.quantization.fp8_native", lambda device: native)
    with caplog.at_level(logging.WARNING, logger="engine.fp8"):
        model = load_model(EngineConfig(model=tiny_llama_dir, quantization="fp8"), torch.device("cpu"))
    fp8_params = [k for k, p in model.named_parameters() if p.dtype == FP8]
    assert len(fp8_params) == (3 * 4 + 1 if native else 0) and (model.head_weight.dtype == FP8) == native
    assert ("no FP8 matmul path" in caplog.text) != native
    ref, cfg = EngineConfig(model=tiny_llama_dir), EngineConfig(model=tiny_llama_dir, quantization="fp8")
    if native:  # W8A8 in the prefill, as on a GPU
        assert w8a8_drift(ref, cfg) < 1.0
        return
    (want, want_lp), (got, got_lp) = greedy(ref), greedy(cfg)  # weight-only: as close as int8
    agree = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), len(want))
    assert agree >= 2, (want, got)
    assert max(abs(a - b) for a, b in zip(want_lp[:agree], got_lp[:agree], strict=True)) < 0.25
