"""Structured outputs in the engine (engine/grammar.py): every kind of grammar constrains the output, grammars are
compiled once, overlapped steps and speculative decoding change nothing, a grammar that leaves no legal token
ends the request with stop, and bad grammars are refused before anything runs.

The tiny random Llama gets a small byte-level BPE tokenizer trained here, so xgrammar has a vocabulary to mask.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest

from engine.config import CacheConfig, EngineConfig, SpeculativeConfig
from engine.engine import LLMEngine
from engine.grammar import GrammarSpec, trim_drafts
from engine.request import InvalidRequestError, SamplingParams
from engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"capital": {"type": "boolean"}, "name": {"enum": ["Paris", "Rome"]},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["capital", "name", "tags"], "additionalProperties": False}
CORPUS = ['{"name": "Paris", "population": 2102650, "capital": true}', "The capital of France is Paris.",
          '[{"name": "get_weather", "parameters": {"city": "Paris"}}]', "hello world yes no"]


def train_tokenizer(folder: Path, vocab: int = 384) -> None:
    """A byte-level BPE with <unk>, <s>, </s> at ids 0-2 (the tiny Llama's bos 1 and eos 2)."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 50, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama_tokenizer") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    train_tokenizer(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(model_dir: str) -> Tokenizer:
    return Tokenizer.from_hf_dir(model_dir)


def make(model_dir: str, **kw) -> LLMEngine:  # noqa: ANN003 - EngineConfig fields
    return LLMEngine(EngineConfig(model=model_dir, cache=CacheConfig(num_blocks=64), **kw))


def spec(kind: str, value: object = "") -> str:
    return GrammarSpec(kind, value if isinstance(value, str) else json.dumps(value)).to_wire()


def run(engine: LLMEngine, reqs: dict[str, SamplingParams], prompt: list[int] | None = None
        ) -> dict[str, tuple[list[int], str | None]]:
    free0 = engine.load().kv_blocks_free
    for rid, p in reqs.items():
        engine.add_request(rid, prompt or [5, 6, 7, 8], p)
    out: dict[str, list[int]] = {rid: [] for rid in reqs}
    reasons: dict[str, str | None] = {}
    while engine.has_unfinished():
        for so in engine.step():
            out[so.request_id].extend(so.new_token_ids)
            if so.finished:
                reasons[so.request_id] = so.finish_reason
    assert engine.load().kv_blocks_free == free0, "blocks leaked"
    return {rid: (out[rid], reasons[rid]) for rid in reqs}


def workload() -> dict[str, SamplingParams]:
    def p(grammar: str, **kw) -> SamplingParams:  # noqa: ANN003
        return SamplingParams(**{"max_tokens": 48, "temperature": 0.9, "seed": 3, **kw}, structured_output=grammar)

    return {
        "regex": p(spec("regex", "[ab]{3}c"), temperature=0),
        "regex_sampled": p(spec("regex", "(yes|no)[0-9]{2}")),
        "choice": p(spec("choice", ["Paris", "Rome", "hello world"])),
        "schema": p(spec("json", SCHEMA)),
        "schema_greedy": p(spec("json", SCHEMA), temperature=0),
        "ebnf": p(spec("grammar", 'root ::= "[" item ("," item)* "]"\nitem ::= "yes" | "no"'), max_tokens=12),
        "plain": SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
    }


def check(tokenizer: Tokenizer, out: dict[str, tuple[list[int], str | None]]) -> None:
    text = {rid: tokenizer.decode(t) for rid, (t, _) in out.items()}
    assert re.fullmatch("[ab]{3}c", text["regex"]) and re.fullmatch("(yes|no)[0-9]{2}", text["regex_sampled"])
    assert text["choice"] in ("Paris", "Rome", "hello world")
    for rid in ("schema", "schema_greedy"):
        jsonschema.validate(json.loads(text[rid]), SCHEMA)
    assert out["regex"][1] == out["choice"][1] == out["schema"][1] == "stop"
    assert out["regex"][0][-1] == 2  # the grammar ended with EOS, the one token it allowed at its end
    assert re.fullmatch(r"\[(yes|no)(,(yes|no))*\]?", text["ebnf"].rstrip("]") + "]")


def test_every_kind_of_grammar_constrains_the_output(model_dir: str, tokenizer: Tokenizer) -> None:
    engine = make(model_dir)
    out = run(engine, workload())
    check(tokenizer, out)
    assert len(out["plain"][0]) == 10
    compiles = engine._grammars.compiles
    run(engine, workload())
    assert engine._grammars.compiles == compiles, "a grammar seen before was compiled again"


def test_json_object_lark_and_structural_tags_constrain_the_output(model_dir: str, tokenizer: Tokenizer) -> None:
    """The kinds the workload above leaves out: json_object, a Lark grammar, xgrammar's structural tag, and vLLM's
    form of it (structures + triggers: free text until a trigger, then the structure's schema)."""
    def p(grammar: str, **kw) -> SamplingParams:  # noqa: ANN003
        return SamplingParams(**{"max_tokens": 32, "temperature": 0.9, "seed": 5, **kw}, structured_output=grammar)

    city = {"enum": ["Paris", "Rome"]}  # no room for whitespace: a random model ends it in a few tokens
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>",
                                                "content": {"type": "json_schema", "json_schema": city}}}
    vllm_tag = {"structures": [{"begin": "<f>", "schema": city, "end": "</f>"}], "triggers": ["<f"]}
    out = run(make(model_dir), {
        "json_object": p(spec("json_object")),
        "lark": p(spec("grammar", 'start: "[" item ("," item)* "]"\nitem: "yes" | "no"'), max_tokens=12),
        "tag": p(spec("structural_tag", tag)),
        "vllm_tag": p(spec("structural_tag", vllm_tag), max_tokens=16),
    })
    text = {rid: tokenizer.decode(t) for rid, (t, _) in out.items()}
    # A random model writes an object key until max_tokens: an object was begun, and one that ended parses.
    assert text["json_object"].startswith("{"), text
    assert out["json_object"][1] == "length" or isinstance(json.loads(text["json_object"]), dict), text
    assert re.fullmatch(r"\[(yes|no)(,(yes|no))*\]?", text["lark"].rstrip("]") + "]"), text
    assert text["tag"] in ('<f>"Paris"</f>', '<f>"Rome"</f>') and out["tag"][1] == "stop", text
    assert out["vllm_tag"][1] in ("stop", "length")  # free text until a trigger (a random model): it ran and ended


def test_a_request_waits_for_its_grammar_without_blocking_the_caller(model_dir: str) -> None:
    """The first grammar loads the tokenizer on a background thread: make_request returns at once, the request is
    held back until the grammar is compiled, and requests without one run meanwhile."""
    import threading

    engine = make(model_dir)
    gate = threading.Event()
    load = engine._grammars._load_tokenizer
    engine._grammars._load_tokenizer = lambda: (gate.wait(10), load())[1]
    engine.add_request("g", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0,
                                                      structured_output=spec("regex", "[ab]{3}c")))
    engine.add_request("p", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    done = {so.request_id for _ in range(3) for so in engine.step() if so.finished}
    assert done == {"p"} and not engine._kv.has("g")
    gate.set()
    while engine.has_unfinished():
        done |= {so.request_id for so in engine.step() if so.finished}
    assert done == {"p", "g"} and engine._kv.num_free_blocks == engine._kv.num_blocks


@pytest.mark.parametrize("config", [
    dict(overlap_steps=True),
    dict(speculative=SpeculativeConfig("ngram", 3, ngram_min=1, ngram_max=2)),
    dict(speculative=SpeculativeConfig("self", 3, self_draft_layers=1)),
], ids=["overlap", "ngram", "self-draft"])
def test_overlap_and_speculation_keep_the_grammar(model_dir: str, tokenizer: Tokenizer, config: dict) -> None:
    base = run(make(model_dir), workload())
    engine = make(model_dir, **config)
    out = run(engine, workload())
    check(tokenizer, out)
    exact = [rid for rid, p in workload().items() if p.greedy or "self" not in str(config)]
    assert {rid: out[rid] for rid in exact} == {rid: base[rid] for rid in exact}  # sampled + self-draft: same law
    if "speculative" in config:
        assert engine.stats.spec_proposed_tokens > 0


def test_drafts_that_break_the_grammar_are_cut(model_dir: str, tokenizer: Tokenizer) -> None:
    from engine.scheduler import ScheduledRequest

    engine = make(model_dir)
    engine._grammars.compile(spec("regex", "ab+c"))  # compiled already: the state is ready at once
    req = engine.make_request("r", [5, 6], SamplingParams(structured_output=spec("regex", "ab+c")))
    assert req.grammar.ready()
    a, b, c = (tokenizer.encode(x, add_special_tokens=False)[0] for x in "abc")
    req.spec_token_ids = [a, b, b, a, c]
    import torch

    probs = {"r": torch.ones(5, 8)}
    trim_drafts([ScheduledRequest(req, 6, 5)], probs)
    assert req.spec_token_ids == [a, b, b] and probs["r"].shape == (3, 8)


def test_no_legal_token_ends_the_request_with_stop(model_dir: str, tokenizer: Tokenizer) -> None:
    engine = make(model_dir)
    out = run(engine, {
        # after "ab" only EOS is legal, and min_tokens bans it: nothing is legal
        "stuck": SamplingParams(max_tokens=20, temperature=0.8, min_tokens=5, structured_output=spec("regex", "ab")),
        # ignore_eos: the grammar is complete once EOS is taken, so the request ends there anyway
        "complete": SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, structured_output=spec("regex", "ab")),
    })
    assert tokenizer.decode(out["stuck"][0]) == "ab" and out["stuck"][1] == "stop"
    assert tokenizer.decode(out["complete"][0]) == "ab" and out["complete"][1] == "stop"


def test_a_resumed_request_replays_its_tokens(model_dir: str, tokenizer: Tokenizer) -> None:
    engine = make(model_dir)
    p = SamplingParams(max_tokens=48, temperature=0, structured_output=spec("json", SCHEMA))
    whole = run(engine, {"w": p})["w"][0]
    engine.add_request("r", [5, 6, 7, 8], p, output_token_ids=whole[:5])  # e.g. migrated after 5 tokens
    rest: list[int] = []
    while engine.has_unfinished():
        rest += [t for so in engine.step() for t in so.new_token_ids]
    assert whole[:5] + rest == whole
    with pytest.raises(InvalidRequestError, match="does not follow the request's grammar"):
        engine.make_request("x", [5, 6], p, output_token_ids=tokenizer.encode("nope", add_special_tokens=False))


@pytest.mark.parametrize(("grammar", "match"), [
    (spec("regex", "(ab"), "invalid regex: .*parenthesis"),
    (spec("json", {"type": "frobnicate"}), "invalid JSON schema"),
    (spec("grammar", "root ::= missing"), "invalid grammar: .*missing"),
    (spec("choice", []), "guided_choice must be a non-empty list"),
    (spec("structural_tag", {"structures": [{"begin": "<f>"}], "triggers": ["<f"]}),
     "invalid structural tag: each structure needs begin, schema and end"),
    ('{"kind": "yaml"}', "kind must be one of"),
    ("not json", "not a grammar spec"),
])
def test_bad_grammars_are_refused(model_dir: str, grammar: str, match: str) -> None:
    engine = make(model_dir)
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", [5, 6], SamplingParams(structured_output=grammar))
    assert not engine.has_unfinished()


def test_a_model_without_a_tokenizer_refuses_grammars(tiny_llama_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, cache=CacheConfig(num_blocks=16)))
    with pytest.raises(InvalidRequestError, match="need the model's tokenizer"):
        engine.add_request("g", [5, 6], SamplingParams(structured_output=spec("regex", "a")))
