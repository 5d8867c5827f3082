"""Token ids -> text as they arrive: incremental detokenization and stop strings, for streams.

Both are per-request, pure text state: the router and the offline `LLM` feed them one step's tokens at a time.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence yields


class IncrementalDetokenizer:
    """Token ids -> text deltas, O(1) per token, never splitting a UTF-8 character.

    Byte-level tokenizers (`Tokenizer.token_bytes`): each token's bytes through an incremental UTF-8 decoder; no
    context is needed (their decoding has no leading-space rules). Others: vLLM/TGI's prefix/read-offset scheme:
    `_ids[:_read]` are already-emitted tokens decoded only as context (so leading-space rules apply as in a full
    decode); the delta is what decoding all of `_ids` adds beyond them.
    Invariant: `_ids` starts where decoding restarts cleanly (the text before did not end in U+FFFD, which may be
    an incomplete byte sequence and is held back), so the deltas concatenate to the decode of all output ids.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Byte-level tokenizers take the fast path: a token is its bytes, and an incremental UTF-8 decoder holds
        # back a split character exactly as the scheme below does (same text, one table lookup per token).
        self._bytes = tokenizer.token_bytes(skip_special_tokens)
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        context = list(prompt_ids[-5:]) if self._bytes is None else []
        if self._decode(context).endswith(_REPLACEMENT):
            context = []  # the prompt ends mid-character: not a clean cut, so decode the output on its own
        self._ids = context
        self._read = len(context)
        self._prefix_text: str | None = None
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes safe to show (often "", e.g. mid-character)."""
        if self._bytes is not None:  # an id outside the vocabulary decodes to nothing, as `decode` skips it
            raw = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
            return self._emit(self._utf8.decode(raw))
        self._ids.append(token_id)
        prefix_text, new_text = self._texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """At the end of the stream: the text held back, even if it ends in an incomplete character."""
        if self._bytes is not None:
            return self._emit(self._utf8.decode(b"", final=True))
        prefix_text, new_text = self._texts()
        return self._advance(new_text[len(prefix_text):])

    def _texts(self) -> tuple[str, str]:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[:self._read])
        return self._prefix_text, self._decode(self._ids)

    def _advance(self, delta: str) -> str:
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._prefix_text = None
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta


class StopChecker:
    """Text deltas -> text safe to show, cut before the first stop string to appear.

    Invariant: `_held` is the longest tail of the stream that is a proper prefix of some stop string; everything
    before it was emitted and can no longer start a stop string.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed a text delta; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        # The first stop string to complete wins (ties: the longer one), so the cut ignores token boundaries.
        hits = [(i + len(s), i, s) for s in self._stops if (i := text.find(s)) >= 0]
        if hits:
            _, index, self.matched = min(hits)
            self.stopped, self._held = True, ""
            return text[:index], True
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of the stream (no stop hit): the text held back as a possible stop-string start."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_stop_len(self, text: str) -> int:
        longest = max((len(s) - 1 for s in self._stops), default=0)
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[len(text) - k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
