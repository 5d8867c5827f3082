"""The offline API on the real SmolLM2: text, chat, stop strings, logprobs, bad input."""

from __future__ import annotations

import pytest

from engine.llm import LLM
from engine.request import InvalidRequestError, SamplingParams

pytestmark = pytest.mark.slow  # the real SmolLM2 loaded and run end to end: not in the fast tier


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2", num_blocks=256)


def test_chat_answers_paris(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.model_config.eos_token_ids


def test_generate_batch_in_order_with_lengths(llm: LLM) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [o.prompt for o in outs] == prompts
    assert all(len(o.token_ids) == 8 and o.finish_reason == "length" for o in outs)
    assert outs[1].text.strip().startswith("5")
    alone = llm.generate(prompts[2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert alone.token_ids == outs[2].token_ids
    assert llm.tokenizer.decode(alone.token_ids) == alone.text


def test_stop_string_cuts_text(llm: LLM) -> None:
    full = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert " 7," in full.text
    cut = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=16, temperature=0, stop=[" 7,"]))[0]
    assert cut.text == full.text[: full.text.index(" 7,")]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == " 7,"
    assert llm.engine.load().kv_blocks_free == llm.engine.num_kv_blocks


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]
    assert len(out.outputs[0].logprobs) == len(out.token_ids)
    for tok, (lp, top) in zip(out.token_ids, out.outputs[0].logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == tok and lp == pytest.approx(top[0][1]) and lp <= 0


def test_bad_input(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        llm.generate("word " * 9000, SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    assert not llm.engine.has_unfinished()
