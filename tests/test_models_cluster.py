"""A mixture-of-experts model through the whole disaggregated cluster: a small random Qwen3-MoE (transformers'
own class, saved as an HF folder with SmolLM2's tokenizer) served by real router, prefill and decode processes
with KV over NIXL; greedy output equal to the single-process engine's."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
import transformers as tf

from engine.llm import LLM
from engine.loader import smollm2_gguf_path
from engine.request import SamplingParams
from engine.tokenizer import Tokenizer
from tests.cluster_util import start_cluster, wait_blocks_free

pytestmark = pytest.mark.cluster  # starts real router/worker processes: not in the fast tier

PROMPTS = ["The capital of France is", "Mixture of experts models route each token"]


def tiny_qwen3_moe(folder: Path) -> None:
    tok = Tokenizer.from_model_path(smollm2_gguf_path())
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                            max_position_embeddings=512, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    tf.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))


def test_qwen3_moe_disaggregated_equals_single_process(tmp_path: Path) -> None:
    folder = tmp_path / "qwen3moe"
    tiny_qwen3_moe(folder)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    reference = [o.text for o in LLM(str(folder)).generate(PROMPTS, params)]
    cluster = start_cluster(tmp_path, "moe", model=str(folder), engine={"cache": {"num_blocks": 64}})
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt, ref in zip(PROMPTS, reference, strict=True):
            out = client.completions.create(model=str(folder), prompt=prompt, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == ref
        for name in ("prefill-0", "decode-0"):
            rep = wait_blocks_free(cluster.procs[name].address)
            assert rep.kv_blocks_free == rep.kv_blocks_total, name
        assert rep.transfers >= len(PROMPTS) and rep.recomputes == 0  # the KV moved, nothing was recomputed
    finally:
        cluster.stop()
