"""Worker logprobs (`TokenLogprob`) -> OpenAI's completion and chat logprob objects."""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer
from proto import disagg_pb2
from router.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable character -> byte map, the inverse of how byte-level BPE spells raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenText:
    """A token id's text and raw bytes, cached (the cache is bounded by the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_of = _byte_level_alphabet()
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def text(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self._lookup(token_id)[1]

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self._tokenizer.convert_ids_to_tokens([token_id])[0]
            # A byte-level piece spells the raw bytes even when they are only part of a UTF-8 character.
            if piece and all(c in self._byte_of for c in piece):
                raw = [self._byte_of[c] for c in piece]
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit


def _alternatives(lp: disagg_pb2.TokenLogprob) -> list[tuple[int, float]]:
    return list(zip(lp.top_ids, lp.top_logprobs, strict=False))


def completion_logprobs(texts: TokenText, token_ids: Sequence[int], logprobs: Sequence[disagg_pb2.TokenLogprob],
                        text_offset: int) -> CompletionLogprobs:
    """The legacy completions format; `text_offset` is where the first token's text starts in the output."""
    out = CompletionLogprobs()
    for token_id, lp in zip(token_ids, logprobs, strict=False):
        token = texts.text(token_id)
        top = {texts.text(t): v for t, v in _alternatives(lp)}
        top.setdefault(token, lp.logprob)  # like vLLM, the chosen token is always among the top ones
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(texts: TokenText, token_ids: Sequence[int], logprobs: Sequence[disagg_pb2.TokenLogprob]
                  ) -> list[ChatTokenLogprob]:
    """The chat format: one entry per token with its bytes and its top alternatives."""
    return [
        ChatTokenLogprob(
            token=texts.text(token_id), logprob=lp.logprob, bytes=texts.bytes(token_id),
            top_logprobs=[TopLogprob(token=texts.text(t), logprob=v, bytes=texts.bytes(t)) for t, v in _alternatives(lp)],
        )
        for token_id, lp in zip(token_ids, logprobs, strict=False)
    ]


def echo_logprobs(texts: TokenText, prompt_ids: Sequence[int], entries: Sequence[disagg_pb2.TokenLogprob],
                  num_top: int) -> CompletionLogprobs:
    """The legacy completions format over an echoed prompt (from its prompt logprobs, `entries[i]` scoring
    prompt_ids[i + 1]): the first token has no logprob, each other one its `num_top` best alternatives, as vLLM."""
    first = texts.text(prompt_ids[0])
    trimmed = [disagg_pb2.TokenLogprob(logprob=lp.logprob, top_ids=lp.top_ids[:num_top],
                                       top_logprobs=lp.top_logprobs[:num_top]) for lp in entries]
    return concat(CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0]),
                  completion_logprobs(texts, prompt_ids[1:], trimmed, len(first)))


def concat(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)
