"""Greedy output equals Hugging Face transformers, token for token, under continuous batching.

Eight prompts of 5..300 tokens run together, 64 new tokens each, under four scheduler/cache settings:
(a) room for all, (b) at most 3 running (requests join mid-flight), (c) few blocks (preemption),
(d) a small token budget (chunked prefill).
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from tests.hf_reference import compare_greedy, hf_greedy, hf_greedy_batch

LENGTHS = [5, 17, 40, 64, 100, 150, 222, 300]
NEW = 64
SETTINGS = {
    "room_for_all": dict(scheduler=SchedulerConfig(), cache=CacheConfig(num_blocks=256)),
    "max_3_running": dict(scheduler=SchedulerConfig(max_num_seqs=3), cache=CacheConfig(num_blocks=256)),
    "preemption": dict(scheduler=SchedulerConfig(), cache=CacheConfig(num_blocks=40)),
    "chunked_prefill": dict(scheduler=SchedulerConfig(max_num_batched_tokens=48), cache=CacheConfig(num_blocks=256)),
}


def run_engine(cfg: EngineConfig, prompts: list[list[int]]) -> tuple[list[list[int]], list, LLMEngine]:
    eng = LLMEngine(cfg)
    free0 = eng.load().kv_blocks_free
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    toks: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    lps: dict[str, list] = {str(i): [] for i in range(len(prompts))}
    max_running = 0
    while eng.has_unfinished():
        for so in eng.step():
            toks[so.request_id].extend(so.new_token_ids)
            lps[so.request_id].extend(so.new_logprobs)
        max_running = max(max_running, len(eng._scheduler.running))
    assert eng.load().kv_blocks_free == free0, "KV blocks leaked"
    eng._kv.pool.check_invariants()
    eng.max_running_seen = max_running  # type: ignore[attr-defined]
    keys = [str(i) for i in range(len(prompts))]
    return [toks[k] for k in keys], [lps[k] for k in keys], eng


def check_setting(name: str, cfg: EngineConfig, prompts, ref, ref_top2) -> None:  # noqa: ANN001
    ours, ours_lp, eng = run_engine(cfg, prompts)
    ties = compare_greedy(ours, ours_lp, ref, ref_top2)
    assert ties <= 1, f"{name}: {ties} prompts ended at a near-tie"
    if name == "preemption":
        assert eng.stats.preemptions > 0, "the small block budget did not cause preemption"
    if name == "max_3_running":
        assert eng.max_running_seen == 3
    if name == "chunked_prefill":
        assert max(LENGTHS) > cfg.scheduler.max_num_batched_tokens


# ---- the real SmolLM2 weights (GGUF, read by both sides) ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf):  # noqa: ANN001
    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    with open(__file__) as f:
        text = f.read() + json.dumps(SETTINGS, default=str)
    base = tok.encode("The history of the city begins with a small fishing village. " + text)
    prompts = [base[i * 7 : i * 7 + n] for i, n in enumerate(LENGTHS)]
    ref = hf_greedy_batch(smollm2_hf, prompts, NEW)
    return prompts, [r[0] for r in ref], [r[1] for r in ref]


@pytest.mark.slow  # real SmolLM2 against HF transformers: over a minute in all, not in the fast tier
@pytest.mark.parametrize("name", list(SETTINGS))
def test_smollm2_matches_hf(name: str, smollm2_reference) -> None:  # noqa: ANN001
    prompts, ref, ref_top2 = smollm2_reference
    check_setting(name, EngineConfig(model="smollm2", **SETTINGS[name]), prompts, ref, ref_top2)


# ---- a random tiny Llama: GQA, Llama-3.1 rope scaling, untied embeddings, HF safetensors folder --------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):  # noqa: ANN001
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                      rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.3,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 384, (n,), generator=g).tolist() for n in LENGTHS]
    ref = [hf_greedy(model, p, NEW) for p in prompts]
    return str(folder), prompts, [r[0] for r in ref], [r[1] for r in ref]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_tiny_llama_matches_hf(name: str, tiny_llama) -> None:  # noqa: ANN001
    folder, prompts, ref, ref_top2 = tiny_llama
    check_setting(name, EngineConfig(model=folder, **SETTINGS[name]), prompts, ref, ref_top2)
