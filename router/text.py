"""One choice's tokens -> text, with vLLM's text options: stop strings (checked from min_tokens on, kept in the text
with include_stop_str_in_output), special tokens (skip_special_tokens), and the stop token itself, whose text is
left out unless include_stop_str_in_output (a stop token is what a worker's finish reason "stop" ends on).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.output_processor import TextDelta
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class TextOptions:
    """How the router turns a choice's tokens into text (none of it reaches a worker)."""

    stop: tuple[str, ...] = ()  # stop strings
    stop_token_ids: tuple[int, ...] = ()  # with EOS: tokens whose text a stop leaves out
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # accepted; the fast tokenizer's decode has no such option (as in
    # vLLM's fast detokenizer): special tokens are joined as the tokenizer decodes them
    include_stop_str_in_output: bool = False
    min_tokens: int = 0  # stop strings are looked for only once this many tokens are out


class ChoiceText:
    """Incremental detokenizer + stop strings for one choice; `push` as `RequestTextStream.push`."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], options: TextOptions) -> None:
        self.options = options
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=options.skip_special_tokens)
        self.stops = StopChecker(options.stop) if options.stop else None
        self.stop_ids = {*options.stop_token_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                    else [])}
        self.num_tokens = 0
        self.stopped = False

    def push(self, token_ids: list[int], final: bool = False, finish_reason: str | None = None) -> TextDelta:
        """Feed new tokens; with `final`, also release text held back for stop-string or UTF-8 reasons. With
        finish reason stop, the last token is the stop token: its text is dropped unless asked for."""
        if self.stopped:
            return TextDelta("", True)
        if final and finish_reason == "stop" and token_ids and token_ids[-1] in self.stop_ids \
                and not self.options.include_stop_str_in_output:
            token_ids = token_ids[:-1]
        raw = ""
        for t in token_ids:
            raw += self.detok.push(t)
        self.num_tokens += len(token_ids)
        if final:
            raw += self.detok.flush()
        if self.stops is None or self.num_tokens <= self.options.min_tokens:
            return TextDelta(raw, False)
        safe, hit = self.stops.push(raw)
        if final and not hit:
            safe += self.stops.flush()
        self.stopped = hit
        if hit and self.options.include_stop_str_in_output:
            safe += self.stops.matched or ""
        return TextDelta(safe, hit, self.stops.matched if hit else None)
