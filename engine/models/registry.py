"""The model families: ModelConfig.architecture -> the class that builds it, and Hugging Face names -> family.

Adding a family is one file in engine/models (the model and a `from_hf(config_json, hf_arch)`) and a line here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ARCHITECTURES, ConfigError, ModelConfig
from engine.models import gemma2, gemma3, llama, mixtral, qwen2_moe, qwen3, qwen3_moe
from engine.models.causal_lm import CausalLM
from engine.models.checkpoint import Slot, checkpoint_layout
from engine.parallel.group import TPGroup, building


@dataclass(frozen=True)
class Family:
    """One architecture: its model class and how a Hugging Face config.json maps onto ModelConfig."""

    model: type[CausalLM]  # built from a ModelConfig
    from_hf: Callable[[dict[str, Any], str], ModelConfig]  # (config.json mapping, HF architecture) -> ModelConfig
    hf_architectures: tuple[str, ...]  # the `architectures` names in config.json it reads


FAMILIES: dict[str, Family] = {
    "llama": Family(llama.LlamaForCausalLM, llama.from_hf,
                    ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")),
    "qwen3": Family(qwen3.Qwen3ForCausalLM, qwen3.from_hf, ("Qwen3ForCausalLM",)),
    "gemma2": Family(gemma2.Gemma2ForCausalLM, gemma2.from_hf, ("Gemma2ForCausalLM",)),
    "gemma3": Family(gemma3.Gemma3ForCausalLM, gemma3.from_hf, ("Gemma3ForCausalLM",)),
    "qwen2_moe": Family(qwen2_moe.Qwen2MoeForCausalLM, qwen2_moe.from_hf, ("Qwen2MoeForCausalLM",)),
    "qwen3_moe": Family(qwen3_moe.Qwen3MoeForCausalLM, qwen3_moe.from_hf, ("Qwen3MoeForCausalLM",)),
    "mixtral": Family(mixtral.MixtralForCausalLM, mixtral.from_hf, ("MixtralForCausalLM",)),
}
assert tuple(FAMILIES) == ARCHITECTURES, "engine.config.ARCHITECTURES lists the families"

HF_ARCHITECTURES = {hf: name for name, fam in FAMILIES.items() for hf in fam.hf_architectures}
# config.json files without `architectures`: model_type -> architecture
HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


def hf_architecture(d: dict[str, Any]) -> str:
    """The architecture a config.json names (its first `architectures` entry, else from model_type)."""
    archs = d.get("architectures") or [HF_MODEL_TYPES.get(d.get("model_type", ""), str(d.get("model_type")))]
    return str(archs[0])


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """ModelConfig for a config.json mapping; ConfigError names an unsupported architecture."""
    arch = hf_architecture(d)
    if arch not in HF_ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {arch!r} (supported: {', '.join(HF_ARCHITECTURES)})")
    return FAMILIES[HF_ARCHITECTURES[arch]].from_hf(d, arch)


def build(cfg: ModelConfig) -> CausalLM:
    """The model for `cfg`, parameters uninitialised on the current default device."""
    return FAMILIES[cfg.architecture].model(cfg)


@functools.lru_cache(maxsize=16)
def layout(cfg: ModelConfig, rank: int = 0, size: int = 1) -> dict[str, Slot]:
    """Checkpoint name -> where it goes, its shape and the slice rank `rank` of `size` holds, for `cfg` (built on
    the meta device: no memory)."""
    with torch.device("meta"), building(TPGroup(rank, size)):
        return checkpoint_layout(build(cfg))
