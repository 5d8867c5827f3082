"""Token ids -> text deltas, with stop strings that may span token boundaries.

Shared by the offline `LLM` and the router, so both cut text the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.tokenizer import Tokenizer


@dataclass
class TextDelta:
    text: str  # text safe to show now
    stopped: bool  # a stop string was hit: the request must end, nothing after it is shown
    stop_string: str | None = None


class RequestTextStream:
    """One request's incremental detokenizer and stop-string checker."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: tuple[str, ...],
                 skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.stops = StopChecker(stop) if stop else None
        self.stop = stop
        self.text = ""
        self.stopped = False

    def push(self, token_ids: list[int], final: bool = False) -> TextDelta:
        """Feed new tokens; with `final`, also release text held back for stop-string or UTF-8 reasons."""
        if self.stopped:
            return TextDelta("", True)
        raw = "".join(self.detok.push(t) for t in token_ids)
        if final:
            raw += self.detok.flush()
        if self.stops is None:
            self.text += raw
            return TextDelta(raw, False)
        safe, hit = self.stops.push(raw)
        if final and not hit:
            safe += self.stops.flush()
        self.text += safe
        self.stopped = hit
        return TextDelta(safe, hit, self._which_stop() if hit else None)

    def _which_stop(self) -> str | None:
        tail = self.detok.text
        hits = [(tail.find(s, len(self.text)), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        return min(hits)[1] if hits else None
