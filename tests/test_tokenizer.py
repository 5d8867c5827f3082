"""engine.tokenizer against transformers' own GGUF tokenizer for SmolLM2-135M-Instruct."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as FastTokenizer

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.loader import smollm2_gguf_path
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\tindented\r\nwindows",
    "digits 0123456789 and 3.14159, 1e-9, 1,000,000",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "emoji 😀🎉👩‍👩‍👧 flags 🇫🇷",
    "日本語のテキストと中文字符",
    "café naïve Ångström façade Ωμέγα",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y",
    "mixed <|im_end|>text<|im_start|> with specials",
    "a\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me about 日本 😀"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf(gguf_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def hf_dir(hf: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(folder)
    return folder


def test_metadata(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.all_special_ids == list(range(17))
    assert tok.convert_ids_to_tokens([1, 2, 28, 216]) == ["<|im_start|>", "<|im_end|>", ",", "Ġ"]
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    with pytest.raises(ValueError, match="out of vocabulary"):
        tok.convert_ids_to_tokens([10**7])


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text == hf.decode(ids)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(tok: Tokenizer, hf: Any, messages: list[dict]) -> None:
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == no_prompt


def test_custom_template_environment_matches_transformers(tok: Tokenizer, hf: Any) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 5 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n"
        "  {% if m.role == 'user' %}[{{ m.content | upper }}]{% endif %}\n{% endfor %}"
        "{{ tools | tojson(indent=2) }}{{ extra }}{{ eos_token }}"
    )
    messages = [{"role": "user", "content": "héllo <b>&</b>", "name": None}, {"role": "assistant", "content": "日本"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    expected = hf.apply_chat_template(messages, chat_template=template, tools=tools, tokenize=False, extra=42)
    assert tok.apply_chat_template(messages, False, tools, chat_template=template, extra=42) == expected


def test_chat_template_errors(tok: Tokenizer) -> None:
    raising = "{{ raise_exception('only user messages, got ' + messages[0].role) }}"
    with pytest.raises(ValueError, match="only user messages, got system"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], chat_template=raising)
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    bare = Tokenizer(tok.backend, tok.special_tokens)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    assert "2" in tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ strftime_now('%Y') }}")


def test_from_hf_dir_matches(tok: Tokenizer, hf_dir: Path) -> None:
    loaded = Tokenizer.from_hf_dir(hf_dir)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.all_special_ids) == (1, 2, tok.all_special_ids)
    assert loaded.apply_chat_template(CONVERSATIONS[0]) == tok.apply_chat_template(CONVERSATIONS[0])
    assert Tokenizer.from_model_path(hf_dir).encode("x y") == tok.encode("x y")


def test_hf_dir_template_sources(hf_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(hf_dir, folder)
    (folder / "chat_template.jinja").unlink()
    assert Tokenizer.from_hf_dir(folder).chat_template is None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "T"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_hf_dir(folder)
    message = [{"role": "user", "content": "x"}]
    assert (loaded.apply_chat_template(message), loaded.apply_chat_template(message, tools=[{}])) == ("A", "T")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer.from_hf_dir(folder).chat_template == "J"


def test_missing_and_corrupt_files(hf_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(hf_dir, folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_hf_dir(folder)
    (folder / "tokenizer.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(folder)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        Tokenizer.from_model_path(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.gguf"):
        Tokenizer.from_model_path(bad)


def test_from_model_path_gguf(gguf_path: str, tok: Tokenizer) -> None:
    assert Tokenizer.from_model_path(gguf_path).encode(TEXTS[8]) == tok.encode(TEXTS[8])


def test_tokenizer_only_gguf_tokenizes_the_same(gguf_path: str, tok: Tokenizer, tmp_path: Path) -> None:
    """scripts/tokenizer_gguf.py: the metadata-only copy GPU benchmarks carry instead of the 98 MB model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenizer_gguf", Path(__file__).parents[1] / "scripts/tokenizer_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    small = tmp_path / "tok.gguf"
    assert module.strip_tensors(gguf_path, str(small)) < os.path.getsize(gguf_path) // 20
    copy = Tokenizer.from_model_path(small)
    assert [copy.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert copy.special_tokens == tok.special_tokens and copy.chat_templates == tok.chat_templates


def stream(tok: Tokenizer, ids: list[int], prompt: list[int], skip: bool) -> list[str]:
    """Deltas of an IncrementalDetokenizer, checking each partial text is a prefix of the full decode."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas = []
    for token_id in ids:
        deltas.append(detok.push(token_id))
        assert full.startswith(detok.text)
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


def check_deltas(tok: Tokenizer, ids: list[int], prompt: list[int], skip: bool) -> None:
    deltas = stream(tok, ids, prompt, skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
UNICODE = st.lists(
    st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(["😀", "🎉", "👩\u200d👧", "🇫🇷", "日本語", "é", " ñ", "\n", "\t"]),
        st.sampled_from(["<|im_end|>", "<|im_start|>", " 42", "  "]),
    ),
    max_size=30,
).map("".join)


@HYPO
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip=st.booleans(), with_prompt=st.booleans())
def test_detokenizer_random_ids(tok: Tokenizer, ids: list[int], skip: bool, with_prompt: bool) -> None:
    prompt = tok.encode("<|im_start|>assistant\n") if with_prompt else []
    check_deltas(tok, ids, prompt, skip)


@HYPO
@given(text=UNICODE, skip=st.booleans())
def test_detokenizer_unicode_text(tok: Tokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    check_deltas(tok, ids, tok.encode("Hello there."), skip)
    check_deltas(tok, ids, [], skip)


class SlowPath(Tokenizer):
    """The same tokenizer without the byte-level fast path: the prefix/read-offset scheme."""

    def token_bytes(self, skip_special_tokens: bool = True) -> tuple[bytes, ...] | None:
        return None


@HYPO
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip=st.booleans(), with_prompt=st.booleans())
def test_both_detokenizer_paths_equal_the_full_decode(tok: Tokenizer, ids: list[int], skip: bool,
                                                      with_prompt: bool) -> None:
    assert tok.token_bytes(skip) is not None  # SmolLM2 is byte-level BPE: the router's path is the fast one
    slow = SlowPath(tok.backend, tok.special_tokens, tok.chat_templates)
    prompt = tok.encode("<|im_start|>assistant\n") if with_prompt else []
    check_deltas(slow, ids, prompt, skip)
    check_deltas(tok, ids, prompt, skip)


def test_token_bytes_only_for_a_pure_byte_level_decoder(tok: Tokenizer) -> None:
    from tokenizers import decoders, models

    table = tok.token_bytes(False)
    assert table is not None and len(table) == tok.vocab_size
    assert table[tok.encode("Hello", add_special_tokens=False)[0]] == b"Hello"
    assert tok.token_bytes(True)[tok.eos_token_id] == b"" and table[tok.eos_token_id] == b"<|im_end|>"
    word_piece = FastTokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    word_piece.decoder = decoders.WordPiece()
    assert Tokenizer(word_piece, {}).token_bytes() is None
    byte_level_plus = FastTokenizer.from_str(tok.backend.to_str())
    byte_level_plus.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    assert Tokenizer(byte_level_plus, tok.special_tokens).token_bytes() is None


def test_detokenizer_holds_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji's 4 bytes are split over tokens
    deltas = stream(tok, ids, [], True)
    assert deltas[-2:] == ["😀", ""] and set(deltas[:-2]) == {""}
    held = IncrementalDetokenizer(tok)
    assert held.push(ids[0]) == "" and held.flush() == tok.decode(ids[:1])


def feed(stops: list[str], deltas: list[str]) -> tuple[str, bool, StopChecker]:
    checker = StopChecker(stops)
    out, hit = [], False
    for delta in deltas:
        text, hit = checker.push(delta)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(checker.flush())
    return "".join(out), hit, checker


def test_stop_split_across_deltas() -> None:
    checker = StopChecker(["###"])
    assert checker.push("Hello #") == ("Hello ", False)
    assert checker.push("#") == ("", False)
    assert checker.push("# tail") == ("", True)
    assert checker.push("more") == ("", True) and checker.flush() == ""
    assert checker.matched == "###"


def test_stop_earliest_wins() -> None:
    assert feed(["END", "STOP"], ["a ST", "OP b E", "ND"])[:2] == ("a ", True)
    text, hit, checker = feed(["abc", "b", "bcd"], ["xab", "cd"])
    assert (text, hit, checker.matched) == ("xa", True, "b")
    assert feed(["ab", "abc"], ["zabc"])[2].matched == "ab"
    assert feed(["c", "abc"], ["xab", "cd"])[:2] == ("x", True)  # both complete at once: the earlier start wins
    assert feed(["<", "><<"], ["><", "<"])[:2] == feed(["<", "><<"], ["><<"])[:2] == (">", True)


def test_stop_partial_match_is_released() -> None:
    checker = StopChecker(["<|end|>"])
    assert checker.push("a <|en") == ("a ", False)
    assert checker.push("joy") == ("<|enjoy", False)
    assert checker.push(" <|") == (" ", False)
    assert checker.flush() == "<|"


def test_no_stop() -> None:
    assert feed([], ["a", "b"])[:2] == ("ab", False)
    assert feed(["", "zz"], ["z", "y", "z"])[:2] == ("zyz", False)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text("abc<|>", max_size=30),
    stops=st.lists(st.text("abc<|>", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_stop_checker_property(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(hits)[1]] if hits else text  # the first stop string to complete
    assert feed(stops, deltas)[:2] == (expected, bool(hits))
