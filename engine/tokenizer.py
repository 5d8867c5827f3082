"""Text <-> token ids (a `tokenizers.Tokenizer` built from GGUF metadata as transformers builds it, or from a
Hugging Face folder), chat templates, and the streaming helpers `IncrementalDetokenizer` and `StopChecker`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as FastTokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
_PLAIN_BYTE_LEVEL_PRE = (None, "default", "gpt2", "smollm")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A fast tokenizer with the model's special tokens and chat template(s)."""

    def __init__(self, backend: FastTokenizer, special_tokens: Mapping[str, str | None],
                 chat_templates: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_templates = dict(chat_templates or {})

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Byte-level BPE from a GGUF file's `tokenizer.*` metadata."""
        meta = _read_gguf_metadata(Path(path))
        specials = _gguf_special_tokens(meta)
        template = meta.get("tokenizer.chat_template")
        return cls(_gguf_backend(meta, specials, Path(path)), specials, {"default": template} if template else None)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face folder: tokenizer.json, tokenizer_config.json and the chat template files."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        try:
            backend = FastTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ValueError(f"{tokenizer_file}: cannot load tokenizer ({e})") from e
        config = _read_json(folder / "tokenizer_config.json")
        legacy_map = _read_json(folder / "special_tokens_map.json")
        specials = {key: _token_content(config.get(key, legacy_map.get(key))) for key in SPECIAL_TOKEN_KEYS}
        return cls(backend, specials, _hf_chat_templates(folder, config))

    @classmethod
    def from_model_path(cls, path: str | Path) -> Tokenizer:
        """A `.gguf` file, a Hugging Face folder, or a folder whose only tokenizer source is one `.gguf`."""
        p = Path(path)
        if p.is_file():
            if p.suffix.lower() != ".gguf":
                raise ValueError(f"{p}: expected a .gguf file or a model folder")
            return cls.from_gguf(p)
        if not p.is_dir():
            raise FileNotFoundError(f"{p} not found")
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "tokenizer.json").is_file() and len(ggufs) == 1:
            return cls.from_gguf(ggufs[0])
        return cls.from_hf_dir(p)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of every token the backend marks special, i.e. what `skip_special_tokens` drops."""
        return sorted(self._special_ids)

    @property
    def _special_ids(self) -> set[int]:
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, skip_special_tokens: bool = True) -> tuple[bytes, ...] | None:
        """Each id's bytes, when decoding any ids is the UTF-8 decoding of their bytes joined: a byte-level BPE
        whose decoder is ByteLevel alone (GPT-2, Llama-3, Qwen, SmolLM2); None for any other tokenizer. Built on
        first use (the router does so at start-up) and checked against `decode` id by id (~0.1 s for 49k ids); a
        mismatch also gives None. Skipping special tokens maps their ids to b"" in a copy of the one table."""
        if "_token_bytes" not in self.__dict__:
            table = _byte_level_table(self.backend)
            skipped = None if table is None else tuple(b"" if i in self._special_ids else raw
                                                       for i, raw in enumerate(table))
            self.__dict__["_token_bytes"] = {False: table, True: skipped}
        return self.__dict__["_token_bytes"][skip_special_tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        tokens = [self.backend.id_to_token(i) for i in ids]
        bad = [i for i, t in zip(ids, tokens, strict=True) if t is None]
        if bad:
            raise ValueError(f"token ids out of vocabulary (size {self.vocab_size}): {bad[:10]}")
        return [t for t in tokens if t is not None]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt string, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

        `chat_template=` names one of `chat_templates` or is a template; other keyword arguments (`documents=` too)
        become template variables, overriding the special tokens.
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ValueError("tools must be JSON-schema dicts")
        source = self._select_template(kwargs.pop("chat_template", None), tools)
        chat = _alias_reasoning_fields(_plain([{k: v for k, v in m.items() if v is not None} for m in messages]))
        variables = {**self.special_tokens, "documents": None, **_plain(kwargs)}
        try:
            template = _compile_template(source)
            return template.render(messages=chat, tools=_plain(tools), add_generation_prompt=add_generation_prompt,
                                   **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def _select_template(self, requested: str | None, tools: object) -> str:
        if requested is not None:
            return self.chat_templates.get(requested, requested)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        names = f"several chat templates and no default, pass chat_template= one of {sorted(self.chat_templates)}"
        raise ValueError(names if self.chat_templates else "this tokenizer has no chat template")


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    from engine.gguf_file import read_gguf

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        found = read_gguf(str(path), tensors=False).metadata
        meta = {k: v for k, v in found.items() if k.startswith(("tokenizer.", "general."))}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in meta]
    if missing:
        raise ValueError(f"{path}: GGUF metadata has no {missing[0]}")
    return meta


def _gguf_special_tokens(meta: Mapping[str, Any]) -> dict[str, str | None]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    ids = {key: meta.get(f"tokenizer.ggml.{name}_token_id") for key, name in _GGUF_SPECIAL_IDS.items()}
    return {key: tokens[i] if i is not None and 0 <= i < len(tokens) else None for key, i in ids.items()}


def _gguf_backend(meta: Mapping[str, Any], specials: Mapping[str, str | None], path: Path) -> FastTokenizer:
    """Mirror of transformers' GGUF `byte_level_tokenizer` + `add_gguf_special_tokens` + `set_split_regex`."""
    kind = meta["tokenizer.ggml.model"]
    if kind != "gpt2" or "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path}: only byte-level BPE with merges is supported, not tokenizer.ggml.model={kind!r}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, meta, [*specials.values(), "<|endoftext|>"], vocab, alphabet)
    backend.post_processor = _template_processor(meta, specials)
    return backend


def _byte_level_table(backend: FastTokenizer) -> tuple[bytes, ...] | None:
    """Every id's bytes, special tokens' included, when the decoder is ByteLevel alone and each single-id decode
    agrees; else None."""
    if type(backend.decoder) is not decoders.ByteLevel:
        return None
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = backend.get_added_tokens_decoder()
    ids = range(backend.get_vocab_size(with_added_tokens=True))
    table: list[bytes] = []
    for i in ids:
        if i in added:
            table.append(added[i].content.encode())
            continue
        token = backend.id_to_token(i)
        if token is None or any(c not in to_byte for c in token):
            return None  # a hole in the vocabulary, or a piece the byte map cannot read: decode it the slow way
        table.append(bytes(to_byte[c] for c in token))
    decoded = backend.decode_batch([[i] for i in ids], skip_special_tokens=False)
    for raw, text in zip(table, decoded, strict=True):
        try:
            if raw.decode() != text:
                return None
        except UnicodeDecodeError:
            pass  # part of a character: only checkable in context
    return tuple(table)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _gguf_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split, or for other `tokenizer.ggml.pre` values the regex transformers' table gives."""
    split = None
    if pre not in _PLAIN_BYTE_LEVEL_PRE:
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError as e:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} needs transformers installed") from e
        split = GGUF_PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _add_gguf_added_tokens(backend: FastTokenizer, meta: Mapping[str, Any], named: Sequence[str | None],
                           vocab: Mapping[str, int], alphabet: set[str]) -> None:
    """Control tokens and the named special tokens (bos/eos/unk/pad, GPT-2's default `<|endoftext|>`) as special,
    user-defined tokens as plain added tokens; like transformers, never adding a token outside the vocabulary
    nor a control token spelled outside the byte alphabet (a llama.cpp mislabel)."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or ())
    special = [t for t, k in zip(tokens, types, strict=False) if k == _TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    special += [t for t in named if t is not None and t in vocab]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)])
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types, strict=False)
            if k == _TOKEN_TYPE_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)


def _template_processor(meta: Mapping[str, Any], specials: Mapping[str, str | None]) -> processors.PostProcessor:
    """transformers' `update_post_processor`: BOS/EOS per `add_bos_token` / `add_eos_token` (both default off)."""
    bos, eos = specials["bos_token"], specials["eos_token"]
    bos = bos if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = eos if meta.get("tokenizer.ggml.add_eos_token") else None
    single = " ".join(x for x in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if x)
    pair = " ".join(x for x in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if x)
    ids = {"bos_token": meta.get("tokenizer.ggml.bos_token_id"), "eos_token": meta.get("tokenizer.ggml.eos_token_id")}
    used = [(t, ids[k]) for k, t in (("bos_token", bos), ("eos_token", eos)) if t is not None]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=used)


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object, `{}` if it does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a JSON object")
    return data


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's entry (a string or named list)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return {"default": jinja_file.read_text(encoding="utf-8")}
    entry = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(entry, str):
        return {"default": entry}
    if isinstance(entry, list):
        return {t["name"]: t["template"] for t in entry if isinstance(t, Mapping) and "name" in t and "template" in t}
    return {}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Template input rebuilt from plain JSON types, anything else as "<TypeName>" (as transformers does)."""
    return json.loads(json.dumps(value, default=_plain_default))


def _plain_default(value: Any) -> Any:
    return value.model_dump() if callable(getattr(value, "model_dump", None)) else f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out
