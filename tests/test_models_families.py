"""Every model family against Hugging Face transformers: greedy output equal token for token in float32.

For each family a small random model is built with transformers' own classes, saved as an HF folder and loaded
by the engine from that folder. Four prompts of 5..60 tokens run together under continuous batching (at most 3
running, so requests join mid-flight) and chunked prefill (a 32-token budget), 24 new tokens each. Windows are
20 keys, so three prompts and every continuation run past a sliding window. A second run adds prefix caching
(the same prompts again, after a first wave registered their blocks) and self-speculative decoding.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from tests.hf_reference import compare_greedy, hf_greedy

VOCAB, WINDOW, NEW = 256, 20, 24
LENGTHS = [5, 23, 41, 60]
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}

# family -> (what it exercises, builder of the transformers model)
FAMILIES: dict[str, tuple[str, Callable[[], tf.PreTrainedModel]]] = {
    "mistral": ("every layer slides", lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=WINDOW))),
    "qwen3": ("QK-norm, head_dim 32 != hidden/heads, layers 1+ slide", lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
        **COMMON, head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1))),
    "gemma2": ("local/global layers, both soft-caps, GeGLU, (1 + w) norms", lambda: tf.Gemma2ForCausalLM(
        tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=False,
                        attn_implementation="eager"))),
    "gemma3": ("QK-norm, local/global rope bases, linear rope scaling", lambda: tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
                            query_pre_attn_scalar=16, rope_parameters=GEMMA_ROPE, tie_word_embeddings=False,
                            attn_implementation="eager"))),
    "qwen3_moe": ("8 experts top-2 normalised, a dense layer", lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **COMMON, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1]))),
    "mixtral": ("4 experts top-2, sliding window", lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        **COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW))),
    "qwen2_moe": ("shared expert, raw top-k weights, q/k/v bias", lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        **COMMON, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48))),
}


def build_hf(family: str, folder: Path) -> tf.PreTrainedModel:
    """The family's random model (norm weights random too, so (1 + w) vs w mistakes show), saved to `folder`."""
    torch.manual_seed(0)
    model = FAMILIES[family][1]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = tmp_path_factory.mktemp(request.param)
    model = build_hf(request.param, folder)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    ref = [hf_greedy(model, p, NEW) for p in prompts]
    return request.param, str(folder), prompts, [r[0] for r in ref], [r[1] for r in ref]


def run(eng: LLMEngine, prompts: list[list[int]], tag: str) -> tuple[list[list[int]], list]:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, logprobs=2)
    ids = [f"{tag}{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        eng.add_request(rid, p, params)
    toks: dict[str, list[int]] = {rid: [] for rid in ids}
    lps: dict[str, list] = {rid: [] for rid in ids}
    while eng.has_unfinished():
        for so in eng.step():
            toks[so.request_id].extend(so.new_token_ids)
            lps[so.request_id].extend(so.new_logprobs)
    return [toks[r] for r in ids], [lps[r] for r in ids]


def engine(folder: str, backend: str = "torch", speculative: SpeculativeConfig | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(model=folder, attention_backend=backend, speculative=speculative,
                                  cache=CacheConfig(num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=32)))


def test_continuous_batching_matches_hf(family: tuple) -> None:
    name, folder, prompts, ref, ref_top2 = family
    eng = engine(folder)
    free0 = eng.load().kv_blocks_free
    ours, lps = run(eng, prompts, "a")
    assert compare_greedy(ours, lps, ref, ref_top2) <= 1, name
    assert eng.load().kv_blocks_free == free0, "KV blocks leaked"


@pytest.mark.slow  # every family twice more: not in the fast tier
def test_prefix_cache_and_self_speculation_match_hf(family: tuple) -> None:
    name, folder, prompts, ref, ref_top2 = family
    eng = engine(folder, speculative=SpeculativeConfig(method="self", num_speculative_tokens=3, self_draft_layers=1))
    for wave in ("a", "b"):  # the second wave finds the prompts' full blocks in the prefix cache
        ours, lps = run(eng, prompts, wave)
        assert compare_greedy(ours, lps, ref, ref_top2) <= 1, f"{name}, wave {wave}"
    assert eng.load().prefix_hit_tokens > 0 and eng.stats.spec_verifications > 0


@pytest.mark.parametrize("name", ["gemma2", "mixtral"])
def test_triton_backend_matches_hf(name: str, tmp_path: Path) -> None:
    """The Triton kernels (interpreted) in the whole engine: windows, soft-caps, GQA, chunked prefill, decode."""
    model = build_hf(name, tmp_path)
    prompts = [list(range(3, 3 + n)) for n in (9, 30)]
    ref = [hf_greedy(model, p, 12) for p in prompts]
    eng = engine(str(tmp_path), backend="triton")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    toks: dict[str, list[int]] = {"0": [], "1": []}
    lps: dict[str, list] = {"0": [], "1": []}
    while eng.has_unfinished():
        for so in eng.step():
            toks[so.request_id].extend(so.new_token_ids)
            lps[so.request_id].extend(so.new_logprobs)
    assert compare_greedy([toks["0"], toks["1"]], [lps["0"], lps["1"]], [r[0] for r in ref], [r[1] for r in ref]) == 0


def test_sliding_window_changes_the_output(tmp_path: Path) -> None:
    """The window matters at these lengths: the same weights without it generate something else."""
    model = build_hf("gemma2", tmp_path / "window")
    prompt = list(range(3, 3 + 41))
    with_window = hf_greedy(model, prompt, NEW)[0]
    model.config.sliding_window = 4096
    model.config.layer_types = ["full_attention"] * 3
    model.save_pretrained(tmp_path / "full")
    ours, _ = run(engine(str(tmp_path / "full")), [prompt], "f")
    assert ours[0] != with_window


def test_sliding_window_releases_blocks_behind_it(tmp_path: Path) -> None:
    """Every layer slides (Mistral): blocks wholly before the window are freed while the request runs, so a
    request longer than the whole pool is served, with HF's greedy output and never more blocks than the window
    and one step need."""
    model = build_hf("mistral", tmp_path)
    prompt = torch.randint(3, VOCAB, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    ref, ref_top2 = hf_greedy(model, prompt, 40)
    eng = LLMEngine(EngineConfig(model=str(tmp_path), cache=CacheConfig(block_size=4, num_blocks=16),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=16)))
    eng.add_request("long", prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2))
    toks: list[int] = []
    lps: list = []
    least_free = 16
    while eng.has_unfinished():
        for so in eng.step():
            toks.extend(so.new_token_ids)
            lps.extend(so.new_logprobs)
        least_free = min(least_free, eng.load().kv_blocks_free)
    assert compare_greedy([toks], [lps], [ref], [ref_top2]) == 0
    assert 16 - least_free <= -(-(16 + WINDOW - 1) // 4) + 1 < -(-100 // 4), "blocks behind the window were kept"
    assert eng.load().kv_blocks_free == 16
