"""Shared fixtures. Everything runs offline on the CPU."""

from __future__ import annotations

import os

# Triton decides at decoration time whether a kernel runs in its CPU interpreter, and the engine imports
# the kernels (engine.models.ops) long before tests/test_kernels.py runs: set the mode for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def make_tiny_llama(folder: str, seed: int = 0):  # noqa: ANN201 - transformers model
    """A random tiny Llama (GQA, Llama-3.1 rope scaling, untied embeddings) saved as an HF safetensors folder."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(folder)
    return model


def tiny_llama_config(vocab: int = 384):  # noqa: ANN201 - transformers LlamaConfig
    """The tiny Llama's shape: GQA, Llama-3.1 rope scaling, untied embeddings, large init (peaked logits)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                       rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.3,
                       bos_token_id=1, eos_token_id=2,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny_llama_shared"))
    make_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_hf():  # noqa: ANN201 - transformers model
    """transformers' SmolLM2, read from the packaged GGUF once for the session (its load is the slow part)."""
    from tests.hf_reference import smollm2_hf_model

    return smollm2_hf_model()
