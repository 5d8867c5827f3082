"""GGUF files (llama.cpp's format) as a ModelConfig and weights named as the family's Hugging Face checkpoint.

llama.cpp architecture -> family: llama (Llama, Mistral; Mixtral when it has experts), qwen2 (-> llama), qwen3,
qwen2moe, qwen3moe, gemma2, gemma3. What llama.cpp's converter changed is undone here:
- llama and Mixtral Q/K rows are permuted (each head's rotary halves interleaved): unpermuted;
- Gemma's norm weights are stored as 1 + w: w;
- an MoE layer keeps each projection of all experts in one [E, rows, cols] tensor: one tensor per expert;
- Llama-3.1 RoPE scaling is a rope_freqs tensor of divisors: RopeScaling.
Names and shapes of every tensor are checked before the first one is dequantized. A tensor-parallel rank gets
only its slice of each tensor (`shards`): tensors are dequantized one at a time and the slice kept, so a rank's
memory holds its shard plus one whole tensor at most.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from engine.config import ConfigError, ModelConfig, MoEConfig, RopeScaling
from engine.gguf_file import GGUFFile, GGUFTensor, read_gguf
from engine.loader import Shards, WeightLoadError, check_shapes, checked

FAMILIES = {"llama": "llama", "qwen2": "llama", "qwen3": "qwen3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
            "gemma2": "gemma2", "gemma3": "gemma3"}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# Gemma's sandwich norms: ffn_norm is the norm before the MLP, two more follow attention and the MLP
GEMMA_LAYER = {**LAYER, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
MIXTRAL_NAMES = ((".mlp.", ".block_sparse_moe."), ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))
IGNORED = {"rope_freqs.weight"}
_REQUIRED: Any = object()


def open_gguf(path: str) -> GGUFFile:
    try:
        return read_gguf(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _meta(reader: GGUFFile, path: str, key: str, default: Any = _REQUIRED) -> Any:
    if key not in reader.metadata:
        if default is _REQUIRED:
            raise WeightLoadError(f"{path}: GGUF metadata lacks {key!r}")
        return default
    return reader.metadata[key]


def _architecture(reader: GGUFFile, path: str) -> str:
    arch = _meta(reader, path, "general.architecture")
    if arch not in FAMILIES:
        raise WeightLoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(FAMILIES)})")
    return arch


def gguf_config(path: str) -> ModelConfig:
    """The model shape from GGUF metadata (and which tensors exist: tied head, biases, dense layers)."""
    reader = open_gguf(path)
    arch = _architecture(reader, path)
    meta = functools.partial(_meta, reader, path)
    tensors = {t.name for t in reader.tensors}
    fields = {**_common_fields(reader, path, arch, tensors), **_family_fields(meta, arch, tensors)}
    config = checked(path, lambda: ModelConfig(**fields))
    scaling = _rope_scaling(reader, path, arch, config)
    return config if scaling is None else checked(path, lambda: dataclasses.replace(config, rope_scaling=scaling))


def _common_fields(reader: GGUFFile, path: str, arch: str, tensors: set[str]) -> dict[str, Any]:
    meta = functools.partial(_meta, reader, path)
    eos = [meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot")]
    bos = meta("tokenizer.ggml.bos_token_id", None)
    heads = int(meta(f"{arch}.attention.head_count"))
    return dict(
        vocab_size=int(meta(f"{arch}.vocab_size", None) or _token_count(reader, path, arch)),
        hidden_size=int(meta(f"{arch}.embedding_length")),
        intermediate_size=int(meta(f"{arch}.feed_forward_length")),
        num_layers=int(meta(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta(f"{arch}.attention.head_count_kv", None) or heads),
        head_dim=int(meta(f"{arch}.attention.key_length", None) or meta(f"{arch}.rope.dimension_count", 0)),
        rms_norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        o_proj_bias="blk.0.attn_output.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )


def _family_fields(meta: Callable[..., Any], arch: str, tensors: set[str]) -> dict[str, Any]:
    """What the family decides: QK-norm, Gemma's scale, caps and local layers, the experts."""
    n, window = int(meta(f"{arch}.block_count")), meta(f"{arch}.attention.sliding_window", None)
    out: dict[str, Any] = {"architecture": FAMILIES[arch], "qk_norm": arch in ("qwen3", "qwen3moe", "gemma3")}
    if window:
        out["sliding_window"] = int(window)
    if arch.startswith("gemma"):
        # llama.cpp's rule: the 27B models scale by (hidden / heads)^-1/2, every other size by head_dim^-1/2
        heads, hidden = int(meta(f"{arch}.attention.head_count")), int(meta(f"{arch}.embedding_length"))
        big = n == (46 if arch == "gemma2" else 62)
        out.update(hidden_act="gelu_tanh", query_pre_attn_scalar=float(
            hidden // heads if big else meta(f"{arch}.attention.key_length")),
            final_logit_softcap=meta(f"{arch}.final_logit_softcapping", None),
            layer_types=_gemma_layer_types(meta(f"{arch}.attention.sliding_window_pattern", None), arch, n))
    if arch == "gemma2":
        out["attn_logit_softcap"] = meta("gemma2.attn_logit_softcapping", None)
    if arch == "gemma3":
        out["rope_local_theta"] = float(meta("gemma3.rope.freq_base_swa", 10000.0))
    experts = meta(f"{arch}.expert_count", None)
    if experts:
        out["moe"] = _moe(meta, arch, int(experts), n, tensors)
        out["architecture"] = "mixtral" if arch == "llama" else out["architecture"]
    return out


def _gemma_layer_types(pattern: int | list[bool] | None, arch: str, n: int) -> tuple[str, ...]:
    """Which layers slide: a per-layer list, or every layer but each `pattern`-th (2 for Gemma 2, 6 for Gemma 3)."""
    if isinstance(pattern, list):
        return tuple("sliding_attention" if slides else "full_attention" for slides in pattern)
    every = int(pattern or (2 if arch == "gemma2" else 6))
    return tuple("sliding_attention" if (i + 1) % every else "full_attention" for i in range(n))


def _moe(meta: Callable[..., Any], arch: str, experts: int, n: int, tensors: set[str]) -> MoEConfig:
    return MoEConfig(
        num_experts=experts,
        num_experts_per_tok=int(meta(f"{arch}.expert_used_count")),
        intermediate_size=int(meta(f"{arch}.expert_feed_forward_length", None) or meta(f"{arch}.feed_forward_length")),
        # without the key llama.cpp renormalises for Mixtral and Qwen3-MoE, not for Qwen2-MoE
        norm_topk_prob=bool(meta(f"{arch}.expert_weights_norm", arch != "qwen2moe")),
        shared_expert_intermediate_size=int(meta(f"{arch}.expert_shared_feed_forward_length", None) or 0),
        dense_layers=tuple(i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in tensors),
    )


def _token_count(reader: GGUFFile, path: str, arch: str) -> int:
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise WeightLoadError(f"{path}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    return len(tokens)


def _rope_scaling(reader: GGUFFile, path: str, arch: str, config: ModelConfig) -> RopeScaling | None:
    meta = functools.partial(_meta, reader, path)
    kind = meta(f"{arch}.rope.scaling.type", None)
    if kind == "linear":
        return checked(path, lambda: RopeScaling(factor=float(meta(f"{arch}.rope.scaling.factor")), rope_type="linear"))
    if kind == "llama3":
        return checked(path, lambda: RopeScaling(
            factor=float(meta(f"{arch}.rope.scaling.factor")),
            low_freq_factor=float(meta(f"{arch}.rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=float(meta(f"{arch}.rope.scaling.high_freq_factor", 4.0)),
            original_max_position_embeddings=int(meta(f"{arch}.rope.scaling.original_context_length", 8192)),
        ))
    if kind not in (None, "none"):
        raise WeightLoadError(f"{path}: unsupported RoPE scaling type {kind!r}")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_from_rope_freqs(path, config, _dequantize(path, freqs))


def _llama3_from_rope_freqs(path: str, config: ModelConfig, freqs: torch.Tensor) -> RopeScaling:
    """llama.cpp stores Llama-3.1 scaling as per-frequency divisors; accept them when they match the standard
    parameters (low 1, high 4, original context 8192, as in Llama 3.1 and 3.2)."""
    guess = checked(path, lambda: RopeScaling(factor=float(freqs.max())))
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


def hf_names(gguf_name: str, config: ModelConfig) -> list[tuple[str, int | None]]:
    """The checkpoint names one GGUF tensor holds, each with its expert index (None: the whole tensor)."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    layer = GEMMA_LAYER if config.architecture.startswith("gemma") else LAYER
    if kind not in ("weight", "bias"):
        return []
    if len(parts) == 1 and stem in TOP:
        return [(f"{TOP[stem]}.{kind}", None)]
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return []
    prefix = f"model.layers.{int(parts[1])}."
    if parts[2] in EXPERTS and config.moe is not None:
        names = [(f"{prefix}mlp.experts.{e}.{EXPERTS[parts[2]]}.{kind}", e) for e in range(config.moe.num_experts)]
    elif parts[2] in layer:
        names = [(f"{prefix}{layer[parts[2]]}.{kind}", None)]
    else:
        return []
    if config.architecture == "mixtral":
        names = [(_renamed(n, MIXTRAL_NAMES), e) for n, e in names]
    return names


def _renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for ours, theirs in renames:
        name = name.replace(ours, theirs)
    return name


def _torch_shape(t: GGUFTensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape))


def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    traits = getattr(gguf.quants, "_type_traits", None)
    return traits is None or qtype in traits or qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def gguf_weights(path: str, config: ModelConfig, dtype: torch.dtype, shards: Shards | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor in `dtype`) for every weight (its slice where `shards` names one), each GGUF
    tensor dequantized once."""
    reader = open_gguf(path)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    plan: list[tuple[GGUFTensor, list[tuple[str, int | None]]]] = []
    for t in reader.tensors:
        if t.name in IGNORED:
            continue
        names = hf_names(t.name, config)
        if not names:
            raise WeightLoadError(f"{path}: unexpected GGUF tensor {t.name}")
        if not _dequantizable(t.tensor_type):
            raise WeightLoadError(f"{path}: tensor {t.name} uses unsupported quantization type {t.tensor_type.name}")
        shape = _torch_shape(t)
        for name, e in names:
            found[name] = (f"{path} [{t.name}]", _hf_shape(name, shape[1:] if e is not None else shape))
        plan.append((t, names))
    check_shapes(found, config, path)
    return _stream(path, plan, config, dtype, _architecture(reader, path) == "llama", shards or {})


def _hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """llama.cpp keeps Qwen2-MoE's shared-expert gate [1, H] as a vector."""
    return (1, *shape) if name.endswith("shared_expert_gate.weight") and len(shape) == 1 else shape


def _stream(path: str, plan: list[tuple[GGUFTensor, list[tuple[str, int | None]]]], config: ModelConfig,
            dtype: torch.dtype, permuted: bool, shards: Shards) -> Iterator[tuple[str, torch.Tensor]]:
    """permuted: Q/K rows in llama.cpp's interleaved order (the llama architecture, Mixtral included). The whole
    tensor is dequantized (and unpermuted) first: a shard is then a plain slice of the checkpoint tensor."""
    gemma = config.architecture.startswith("gemma")
    for t, names in tqdm(plan, desc="Loading weights", unit="tensor"):
        w = _dequantize(path, t)
        if permuted and ".q_proj." in names[0][0]:
            w = _unpermute_rope(w, config.num_heads)
        elif permuted and ".k_proj." in names[0][0]:
            w = _unpermute_rope(w, config.num_kv_heads)
        if gemma and names[0][0].endswith("norm.weight"):
            w = w - 1
        for name, e in names:
            x = w if e is None else w[e]
            x = x.reshape(_hf_shape(name, tuple(x.shape)))
            shard = shards.get(name)
            yield name, (x if shard is None else shard.take(x)).to(dtype)


def _dequantize(path: str, t: GGUFTensor) -> torch.Tensor:
    try:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # Read-only memmap views (F32 tensors) are copied so torch never aliases the file.
        return torch.from_numpy(np.require(data, np.float32, ["C", "W"])).reshape(_torch_shape(t))
    except NotImplementedError as e:
        raise WeightLoadError(f"{path}: tensor {t.name} uses unsupported quantization type {t.tensor_type.name}") from e
    except (ValueError, RuntimeError, TypeError, ConfigError) as e:
        raise WeightLoadError(f"{path}: tensor {t.name} is corrupt ({e})") from e


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (as transformers' `_reverse_permute_weights`): llama.cpp interleaves
    each head's two rotary halves, HF keeps them as contiguous halves (rotate_half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
