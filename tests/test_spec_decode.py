"""Speculative decoding: outputs equal non-speculative decoding (greedy: token for token; sampled: in
distribution, and token for token for seeded n-gram requests), blocks never leak, prefix caching never sees
an unverified token, the counters add up.

Models: the random tiny Llama of conftest (its output depends strongly on context, so a KV mistake changes
tokens), a perturbed copy of it as the draft model (it agrees with the target often, not always), a "cycle"
tiny Llama whose greedy output mostly walks fixed 7-token cycles (so n-gram drafts are accepted often,
rejected sometimes) and two vocabulary-12 Llamas for the statistical tests.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from engine.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.engine import LLMEngine
from engine.kv_cache_manager import KVCacheManager, cdiv, prefix_hashes
from engine.request import FinishReason, Request, SamplingParams
from engine.sampler import Sampler, SampleResult, process_logits
from engine.scheduler import Scheduler
from engine.spec_decode.ngram import ngram_lookup
from engine.spec_decode.rejection_sampler import rejection_sample

BS = 4  # small blocks: drafts cross block boundaries often


def save_llama(folder: str, *, vocab: int = 384, seed: int = 0, cycle_scale: float | None = None,
               perturb: float = 0.0, perturb_seed: int = 1) -> str:
    """A random tiny Llama saved as an HF folder: conftest's model (same config, same seed 0 gives the same weights).

    cycle_scale: the LM head maps each token's embedding to the next token of a fixed 7-cycle and the layers'
    outputs are scaled by this factor (small: the cycle wins mostly). perturb: add N(0, perturb * std) noise
    to every weight (a draft model that mostly agrees with the unperturbed one)."""
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab)).eval()
    with torch.no_grad():
        if cycle_scale is not None:
            order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))
            nxt = torch.empty(vocab, dtype=torch.long)
            for i in range(0, vocab, 7):
                nxt[order[i : i + 7]] = torch.roll(order[i : i + 7], -1)
            emb = model.model.embed_tokens.weight
            head = torch.empty_like(emb)
            head[nxt] = emb  # row nxt[t] is t's embedding: argmax follows the cycle
            model.lm_head.weight.copy_(0.5 * head)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(cycle_scale)
                layer.mlp.down_proj.weight.mul_(cycle_scale)
        if perturb:
            g = torch.Generator().manual_seed(perturb_seed)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb * p.std())
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny models gain nothing from intra-op threads, and on a shared, oversubscribed machine OpenMP barriers
    make each small op wait milliseconds for a descheduled thread (50x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: str) -> dict[str, str]:
    def d(name: str) -> str:
        return str(tmp_path_factory.mktemp(name))

    return {
        "tiny": tiny_llama_dir,
        "tiny_draft": save_llama(d("tiny_draft"), seed=0, perturb=0.01),
        "cycle": save_llama(d("cycle"), seed=0, cycle_scale=0.02),
        "v12": save_llama(d("v12"), vocab=12, seed=3),
        "v12_draft": save_llama(d("v12_draft"), vocab=12, seed=4),
    }


def make_engine(model: str, spec: SpeculativeConfig | None = None, *, num_blocks: int = 256, max_num_seqs: int = 64,
                budget: int = 512, caching: bool = True) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, speculative=spec,
                                  cache=CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
                                  scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)))


def run(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]], abort_at: dict[int, int] | None = None,
        arrive_at: dict[int, int] | None = None) -> tuple[list[list[int]], list[list]]:
    """Run to completion; request i joins at step arrive_at[i] (default 0) and is aborted at step abort_at[i].
    Checks on every step that no request holds more blocks than its next step can use, and at the end that every
    block is free again, the pool is consistent, and every block ever cached holds a prefix of a final sequence."""
    free0 = eng.load().kv_blocks_free
    k = eng._scheduler.num_spec_tokens
    toks: list[list[int]] = [[] for _ in reqs]
    lps: list[list] = [[] for _ in reqs]
    added: dict[str, Request] = {}
    step = 0
    while step == 0 or eng.has_unfinished() or len(added) < len(reqs):
        for i, (prompt, params) in enumerate(reqs):
            if (arrive_at or {}).get(i, 0) == step:
                added[str(i)] = eng.add_request(str(i), prompt, params)
        for i, at in (abort_at or {}).items():
            if at == step:
                eng.abort(str(i))
        for so in eng.step():
            toks[int(so.request_id)].extend(so.new_token_ids)
            lps[int(so.request_id)].extend(so.new_logprobs)
        for r in eng._scheduler.running:
            assert len(eng._kv.block_table(r.request_id)) <= cdiv(r.num_tokens + k, BS), "holds unusable blocks"
            assert not r.spec_token_ids
        step += 1
    assert eng.load().kv_blocks_free == free0, "KV blocks leaked"
    eng._kv.pool.check_invariants()
    final = {h for r in added.values() for h in prefix_hashes(r.all_token_ids, BS)}
    stored = {e.block_hash for e in eng._kv.pool.drain_events() if e.kind == "stored"}
    assert stored <= final, "a cached block holds tokens that are not a prefix of any request's final sequence"
    return toks, lps


# ---- configuration and the n-gram lookup ----------------------------------------------------------------------
def test_config() -> None:
    cfg = EngineConfig.from_dict({"speculative": {"method": "ngram", "num_speculative_tokens": 3, "ngram_max": 5}})
    assert cfg.speculative == SpeculativeConfig("ngram", 3, ngram_max=5)
    assert EngineConfig.from_dict({"speculative": None}).speculative is None
    for bad, match in [({"method": "medusa"}, "method"), ({"method": "draft"}, "draft_model"),
                       ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"ngram_min": 3, "ngram_max": 2}, "ngram_min"), ({"self_draft_layers": 0}, "self_draft"),
                       ({"k": 3}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            EngineConfig.from_dict({"speculative": bad})


def test_ngram_lookup() -> None:
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert ngram_lookup(seq, 1, 3, 3) == [7, 8, 1]  # most recent earlier "1 2 3"
    assert ngram_lookup([5, 6, 7, 5, 6, 4, 6], 1, 2, 2) == [4, 6]  # no 2-gram match: the last "6" was followed by 4
    assert ngram_lookup([4, 5, 4, 5], 2, 2, 5) == [4, 5, 4, 5, 4]  # runs on into its own proposal
    assert ngram_lookup([1, 2, 3, 4], 1, 3, 4) == []
    assert ngram_lookup([7, 7], 1, 1, 3) == [7, 7, 7]


# ---- greedy: token for token equal to no speculation -----------------------------------------------------------
def greedy_workload() -> list[tuple[list[int], SamplingParams]]:
    """Nine requests of different lengths (up to 94 prompt tokens): a shared prefix (prefix-cache hits),
    repetitive prompts, logprobs, max_tokens 1."""
    rng = random.Random(7)
    shared = [rng.randrange(3, 384) for _ in range(24)]
    reqs = []
    for i, n in enumerate([5, 30, 70, 12, 44, 9, 60, 21, 36]):
        if i % 3 == 0:
            motif = [rng.randrange(3, 384) for _ in range(rng.randint(2, 6))]
            prompt = (motif * 40)[:n]
        elif i % 3 == 1:
            prompt = shared + [rng.randrange(3, 384) for _ in range(n)]
        else:
            prompt = [rng.randrange(3, 384) for _ in range(n)]
        params = SamplingParams(max_tokens=[25, 40, 12, 30, 1, 35, 20, 28, 33][i], temperature=0, ignore_eos=True,
                                logprobs=2 if i == 3 else None)
        reqs.append((prompt, params))
    return reqs


ARRIVE = {7: 5, 8: 9}  # requests 7 and 8 join later


GREEDY_CASES = {
    "ngram_cycle": ("cycle", SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=3)),
    "ngram_tiny": ("tiny", SpeculativeConfig("ngram", 3, ngram_min=1, ngram_max=2)),
    "self_1_of_3": ("tiny", SpeculativeConfig("self", 3, self_draft_layers=1)),
    "draft": ("tiny", SpeculativeConfig("draft", 4, draft_model="tiny_draft")),
    "draft_is_target": ("tiny", SpeculativeConfig("draft", 5, draft_model="tiny")),
}


@pytest.fixture(scope="module")
def greedy_refs(models: dict[str, str]) -> dict[str, tuple]:
    """Per target: the workload with request 5 stopping at the token its plain output has at index 9, and the
    plain outputs (request 5's cut after the first occurrence of that token: greedy tokens ignore the batch)."""
    out = {}
    for name in ("tiny", "cycle"):
        reqs = greedy_workload()
        # chunked prefill (budget 40 < prompt lengths), three running at most, few blocks (preemption)
        eng = make_engine(models[name], max_num_seqs=3, budget=40, num_blocks=32)
        toks, lps = run(eng, reqs, arrive_at=ARRIVE)
        assert eng.stats.preemptions > 0 and eng.load().prefix_hit_tokens > 0
        stop = toks[5][9]
        p = reqs[5][1]
        reqs[5] = (reqs[5][0], SamplingParams(max_tokens=p.max_tokens, temperature=0, ignore_eos=True,
                                              stop_token_ids=(stop,)))
        toks[5] = toks[5][: toks[5].index(stop) + 1]
        out[name] = (reqs, toks, lps)
    return out


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_matches_no_spec(case: str, models: dict[str, str], greedy_refs: dict[str, tuple]) -> None:
    """Requests join and leave (three running at most), prompts are prefilled in chunks, requests are preempted
    and hit the prefix cache, one stops on a stop token: every output is the non-speculative one."""
    target, spec = GREEDY_CASES[case]
    if spec.draft_model:
        spec = SpeculativeConfig(spec.method, spec.num_speculative_tokens, draft_model=models[spec.draft_model])
    reqs, ref, ref_lps = greedy_refs[target]
    eng = make_engine(models[target], spec, max_num_seqs=3, budget=40, num_blocks=32)
    toks, lps = run(eng, reqs, arrive_at=ARRIVE)
    assert toks == ref
    assert len(toks[5]) < reqs[5][1].max_tokens  # nothing after the stop token
    for (lp, top), (ref_lp, ref_top) in zip(lps[3], ref_lps[3], strict=True):
        assert lp == pytest.approx(ref_lp, abs=1e-4) and [t for t, _ in top] == [t for t, _ in ref_top]
    st = eng.stats
    assert st.spec_proposed_tokens > 0 and st.spec_steps > 0 and st.preemptions > 0
    assert st.generation_tokens == sum(map(len, toks))
    assert 0 <= st.spec_accepted_tokens <= st.spec_proposed_tokens
    if case == "draft_is_target":
        assert st.acceptance_rate == 1.0  # the draft's KV stays in sync through chunks, preemption and prefix hits
    if case in ("ngram_cycle", "draft"):
        assert 0.3 < st.acceptance_rate < 1.0, st.acceptance_rate  # drafts are accepted and rejected
    if eng._proposer is not None and hasattr(eng._proposer, "_state"):
        assert not eng._proposer._state  # per-request draft state dropped when requests finish


def test_acceptance_counters(models: dict[str, str]) -> None:
    """n-gram on a repetitive prompt the model continues: most drafts are accepted, and the counters add up."""
    plain, _ = run(make_engine(models["cycle"]), [([5], SamplingParams(max_tokens=21, temperature=0, ignore_eos=True))])
    loop = plain[0][-7:]
    assert plain[0][-14:-7] == loop  # the model walks a 7-cycle
    eng = make_engine(models["cycle"], SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=3))
    toks, _ = run(eng, [(loop * 4, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))])
    st = eng.stats
    assert len(toks[0]) == 40 and st.generation_tokens == 40
    assert st.acceptance_rate > 0.6 and st.mean_tokens_per_step > 2.5, st
    assert st.spec_accepted_tokens == 40 - st.sampling_request_steps  # each step: accepted drafts + one token
    assert st.mean_tokens_per_verification == pytest.approx(1 + st.spec_accepted_tokens / st.spec_verifications)


# ---- blocks -------------------------------------------------------------------------------------------------
def verdict(*tokens: int) -> list[SampleResult]:
    return [SampleResult(t, None, None) for t in tokens]


def test_scheduler_rollback_stop_and_reclaim() -> None:
    """Without a model: draft slots, the computed count after rejections, prefix caching of verified blocks only,
    draft-slot blocks reclaimed instead of preempting, a stop inside accepted drafts."""
    kv = KVCacheManager(num_blocks=5, block_size=4)
    sched = Scheduler(SchedulerConfig(), kv, max_model_len=64, eos_token_ids=(2,), num_spec_tokens=4)
    a = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(99,)))
    b = Request("b", [20, 21, 22, 23, 24, 25], SamplingParams(max_tokens=20, temperature=0))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # both prompts (2 blocks each)
    sched.update(out, [verdict(50), verdict(51)])
    out = sched.schedule()  # own tokens at position 6; a takes the free block for 4 slots, b fits 1 in its blocks
    sa, sb = out.scheduled
    assert (sa.num_new_tokens, sa.num_spec_tokens, sb.num_spec_tokens) == (5, 4, 1) and kv.num_free_blocks == 0
    a.spec_token_ids, b.spec_token_ids = [60, 61, 62], [70]
    sched.apply_proposals(out)
    assert (sa.num_new_tokens, sa.num_spec_tokens) == (4, 3)
    sched.update(out, [verdict(80), verdict(70, 81)])  # a: first draft rejected, 80 instead; b: draft accepted, 81
    assert a.output_token_ids == [50, 80] and a.num_computed_tokens == 7 and sa.num_accepted_tokens == 0
    assert b.output_token_ids == [51, 70, 81] and b.num_computed_tokens == 8 and sb.num_accepted_tokens == 1
    assert not a.spec_token_ids and len(kv.block_table("a")) == 3  # a keeps its slot blocks for its next drafts
    assert kv.pool.num_cached == 3  # full blocks of verified tokens only: a's tokens 0..3, b's 0..7
    out = sched.schedule()  # b's own token needs a third block: a's draft-only block goes back, nobody is preempted
    assert not out.preempted and [s.num_spec_tokens for s in out.scheduled] == [0, 3]
    assert len(kv.block_table("a")) == 2 and len(kv.block_table("b")) == 3
    b.spec_token_ids = []
    sched.apply_proposals(out)
    sched.update(out, [verdict(90), verdict(91)])
    sched.finish(b, FinishReason.ABORT)
    out = sched.schedule()
    sa = out.scheduled[0]
    assert sa.num_spec_tokens == 4
    a.spec_token_ids = [99, 61, 62, 63]
    sched.apply_proposals(out)
    finished = sched.update(out, [verdict(99, 61, 5)])  # two drafts accepted, but 99 is a stop token
    assert finished == [a] and a.finish_reason == FinishReason.STOP and a.output_token_ids == [50, 80, 90, 99]
    assert a.num_computed_tokens == a.num_tokens == 10 and not kv.has("a") and kv.num_free_blocks == 5
    kv.pool.check_invariants()


def test_mixed_batch_with_aborts(models: dict[str, str]) -> None:
    """Greedy and sampled requests, with and without drafts, joining and aborted mid-flight (the draft model
    proposes): no block leaks (run() checks), greedy outputs unchanged, and a seeded sampled request gets the same
    tokens alone as in the crowd."""
    spec = SpeculativeConfig("draft", 4, draft_model=models["tiny_draft"])
    rng = random.Random(3)
    reqs = [([rng.randrange(384) for _ in range(rng.randint(3, 50))],
             SamplingParams(max_tokens=rng.randint(15, 40), temperature=0.0 if i % 2 == 0 else 1.0, seed=i,
                            ignore_eos=True)) for i in range(8)]
    arrive, abort = {5: 2, 6: 3, 7: 1}, {1: 3, 2: 4, 6: 6, 7: 1}
    eng = make_engine(models["tiny"], spec, max_num_seqs=4, budget=48, num_blocks=40)
    toks, _ = run(eng, reqs, abort_at=abort, arrive_at=arrive)
    assert eng.stats.spec_proposed_tokens > eng.stats.spec_accepted_tokens > 0
    assert not eng._proposer._state  # type: ignore[union-attr]
    assert toks[7] == [] and len(toks[1]) < reqs[1][1].max_tokens
    plain, _ = run(make_engine(models["tiny"], max_num_seqs=4, budget=48, num_blocks=40), reqs, arrive_at=arrive)
    for i in (0, 4):  # greedy, not aborted
        assert toks[i] == plain[i]
    alone, _ = run(make_engine(models["tiny"], spec), [reqs[3]])
    assert alone[0] == toks[3] and len(toks[3]) == reqs[3][1].max_tokens


# ---- sampled requests -------------------------------------------------------------------------------------------
def test_seeded_sampling_ngram_identical_to_no_spec(models: dict[str, str]) -> None:
    """n-gram drafts are verified as a coupling with the sampler's own draw: seeded outputs are unchanged."""
    rng = random.Random(5)
    reqs = []
    for i in range(6):
        motif = [rng.randrange(3, 384) for _ in range(5)]
        params = dict(max_tokens=30, temperature=[0.3, 0.6, 0.5, 0.8, 0.3, 0.4][i], seed=100 + i, ignore_eos=True)
        params.update([{}, {"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.1}, {"repetition_penalty": 1.3},
                       {"presence_penalty": 0.5, "frequency_penalty": 0.3, "logprobs": 1}][i])
        reqs.append((motif * rng.randint(2, 8), SamplingParams(**params)))
    arrive = {4: 3, 5: 7}
    ref, ref_lps = run(make_engine(models["cycle"], max_num_seqs=3, budget=40), reqs, arrive_at=arrive)
    eng = make_engine(models["cycle"], SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=3), max_num_seqs=3,
                      budget=40)
    toks, lps = run(eng, reqs, arrive_at=arrive)
    assert toks == ref
    assert [lp for lp, _ in lps[5]] == pytest.approx([lp for lp, _ in ref_lps[5]], abs=1e-4)
    assert eng.stats.spec_accepted_tokens > 20, eng.stats


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty); z = 3.719 is the 1e-4 tail of a normal."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts: torch.Tensor, p: torch.Tensor, what: str) -> None:
    """Chi-square goodness of fit (tokens expected fewer than 5 times pooled); impossible tokens never appear."""
    counts, p = counts.double(), p.double()
    n = counts.sum().item()
    assert n >= 200, f"{what}: too few samples ({n})"
    assert counts[p == 0].sum() == 0, f"{what}: sampled a token of probability 0"
    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([p[big], p[~big].sum()[None]]) * n
    keep = expected > 0
    stat = ((obs[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert stat < chi2_critical(df), f"{what}: chi2 {stat:.1f} >= {chi2_critical(df):.1f} (df {df})"


def test_rejection_sampler_distribution() -> None:
    """Synthetic target rows p_0..p_2 and draft distributions q_0, q_1 (k = 2); drafts drawn from q. Token j of
    the output must follow p_j (among requests that got that far), for temperature + top-k processing."""
    V, N = 8, 6000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, V, generator=g) * 1.5
    q = torch.softmax(target[:2] / 0.8 + torch.randn(2, V, generator=g), dim=-1)  # a noisy draft, also of top-k cuts
    params = [SamplingParams(temperature=0.8, top_k=6, seed=i, max_tokens=8) for i in range(N)]
    reqs = [Request(str(i), [1, 2, 3], params[i]) for i in range(N)]
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=g) for j in range(2)], dim=1).tolist()
    logits = target.repeat(N, 1)
    out = rejection_sample(Sampler(0), logits, reqs, drafts, [q] * N)
    p = process_logits(target, reqs[:3]).softmax(dim=-1)  # the same processing for every row (no penalties)
    counts = torch.zeros(3, V)
    for tokens, d in zip(out, drafts, strict=True):
        assert 1 <= len(tokens) <= 3 and [t.token_id for t in tokens[:-1]] == d[: len(tokens) - 1]
        for j, t in enumerate(tokens):
            counts[j, t.token_id] += 1
    for j in range(3):
        assert_matches(counts[j], p[j], f"output token {j}")
    accepted = sum(len(t) - 1 for t in out) / (2 * N)
    assert 0.2 < accepted < 0.9, accepted
    # seeded: the same verdicts whatever else is in the batch
    again = rejection_sample(Sampler(1), logits[-3 * 7 :], reqs[-7:], drafts[-7:], [q] * 7)
    assert [[t.token_id for t in x] for x in again] == [[t.token_id for t in x] for x in out[-7:]]


def exact_distributions(model_dir: str, prompt: list[int], temperature: float, depth: int) -> list[torch.Tensor]:
    """Exact marginal distribution of output tokens 0..depth-1 under plain sampling (by enumeration, HF model)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    V = model.config.vocab_size
    paths = torch.ones(1)  # probability of each prefix of length j, over V**j prefixes
    seqs = [list(prompt)]
    marginals = []
    with torch.no_grad():
        for _ in range(depth):
            ids = torch.tensor(seqs)
            probs = torch.softmax(model(ids).logits[:, -1].double() / temperature, dim=-1)  # [len(seqs), V]
            joint = paths[:, None] * probs
            marginals.append(joint.sum(0))
            paths = joint.flatten()
            seqs = [s + [t] for s in seqs for t in range(V)]
    return marginals


@pytest.mark.parametrize("method", ["draft", "self"])
def test_sampled_distribution_matches_no_spec(method: str, models: dict[str, str]) -> None:
    """Vocabulary 12, temperature 1, 1500 seeded requests: output tokens 1 and 2 (decided by speculation) follow
    the exact distribution of non-speculative sampling."""
    spec = (SpeculativeConfig("draft", 3, draft_model=models["v12_draft"]) if method == "draft"
            else SpeculativeConfig("self", 3, self_draft_layers=1))
    prompt = [3, 7, 1, 9, 4]
    eng = make_engine(models["v12"], spec, max_num_seqs=512, budget=4096, num_blocks=4096)
    N = 1500
    reqs = [(prompt, SamplingParams(max_tokens=3, temperature=1.0, seed=i, ignore_eos=True)) for i in range(N)]
    toks, _ = run(eng, reqs)
    exact = exact_distributions(models["v12"], prompt, 1.0, 3)
    for j in (1, 2):
        counts = torch.bincount(torch.tensor([t[j] for t in toks]), minlength=12).double()
        assert_matches(counts, exact[j], f"{method}: output token {j}")
    st = eng.stats
    assert 0.1 < st.acceptance_rate < 0.95, st.acceptance_rate  # both acceptance and the residual draw happen


# ---- the real SmolLM2 -----------------------------------------------------------------------------------------
@pytest.mark.slow  # the real SmolLM2: not in the fast tier
def test_smollm2_greedy_ngram_and_self() -> None:
    from engine.loader import smollm2_gguf_path
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    text = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Repeat this sentence exactly: {text}"}]))
    eng = LLMEngine(EngineConfig(model="smollm2", cache=CacheConfig(num_blocks=64)))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    def generate() -> list[int]:
        out: list[int] = []
        eng.add_request(f"r{eng.stats.steps}", ids, params)
        while eng.has_unfinished():
            for so in eng.step():
                out.extend(so.new_token_ids)
        return out

    ref = generate()
    for spec in (SpeculativeConfig("ngram", 4, ngram_min=1, ngram_max=3), SpeculativeConfig("self", 3, self_draft_layers=8)):
        eng.set_speculative(spec)
        before = (eng.stats.spec_proposed_tokens, eng.stats.spec_accepted_tokens)
        assert generate() == ref, spec.method
        proposed, accepted = (eng.stats.spec_proposed_tokens - before[0], eng.stats.spec_accepted_tokens - before[1])
        if spec.method == "ngram":
            assert accepted > 0.5 * proposed > 0, (accepted, proposed)  # copying text: drafts are mostly right
    assert eng.load().kv_blocks_free == eng.num_kv_blocks
