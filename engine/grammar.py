"""Structured outputs: the grammar a request's output must follow, compiled once with xgrammar, applied as a mask.

On the wire a grammar is one string (`SamplingParams.structured_output`): `{"kind": ..., "value": ...}` with kind
json (value: a JSON schema), json_object, regex, choice (value: a list of strings), grammar (EBNF, or Lark) or
structural_tag (xgrammar's structural-tag JSON). The router builds it from the HTTP request (response_format,
guided_*, structured_outputs, tools) and checks it parses (`check_spec`); every worker compiles it against its
tokenizer, once: compiled grammars are cached by their wire string (engine/grammar_compiler.py).

Each request with a grammar holds a `GrammarState` (its matcher). Invariants:
- a request waits (held back by the scheduler) until its grammar is compiled, off the caller's thread
  (engine/grammar_compiler.py), so a first grammar, which loads the tokenizer, never stalls a worker's loop;
- the matcher has accepted exactly the request's output tokens (`Scheduler.update` feeds it each token before
  appending it; a request made with tokens sampled elsewhere replays them before its first mask);
- the sampler masks a row's logits to the tokens the matcher allows next, before anything else (so logprobs, as
  in vLLM, are those of the masked logits); a row that is `k` drafts ahead (speculative verification) is masked
  as the matcher would be after those drafts (accept, fill, roll back);
- a token the matcher refuses is never appended: the request ends with finish reason stop (that only happens
  when no token was legal, so the sampler picked from nothing). Once the grammar is complete only a stop token
  is legal, and the stop rule ends the request (engine.request.check_stop).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.request import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar as the router and the workers exchange it."""

    kind: str  # one of KINDS
    value: str = ""  # the schema / regex / EBNF / structural tag as text; choice: a JSON list of strings

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.value, str):
            raise InvalidRequestError("structured output value must be a string")

    def to_wire(self) -> str:
        return json.dumps({"kind": self.kind, "value": self.value}, sort_keys=True)

    @classmethod
    def from_wire(cls, wire: str) -> GrammarSpec:
        try:
            d = json.loads(wire)
            return cls(d["kind"], d.get("value", ""))
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidRequestError(f"structured_output is not a grammar spec: {e}") from None


def _choice_ebnf(value: str) -> str:
    choices = json.loads(value)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise InvalidRequestError("guided_choice must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _error(spec: GrammarSpec, e: Exception) -> InvalidRequestError:
    """xgrammar's message without its time stamp and C++ source location."""
    msg = re.sub(r"^\[[^\]]*\]\s*\S+\.(cc|h):\d+:\s*", "", str(e).strip()) or type(e).__name__
    what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex", "choice": "choice",
            "grammar": "grammar", "structural_tag": "structural tag"}[spec.kind]
    return InvalidRequestError(f"invalid {what}: {msg}")


def parse(spec: GrammarSpec) -> xgrammar.Grammar:
    """The spec as an xgrammar Grammar (no tokenizer needed); InvalidRequestError saying what does not parse."""
    import xgrammar as xgr

    try:
        if spec.kind == "json":
            json.loads(spec.value)  # xgrammar's own message for broken JSON is less clear
            return xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
        if spec.kind == "json_object":
            return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.value)
        if spec.kind == "choice":
            return xgr.Grammar.from_ebnf(_choice_ebnf(spec.value))
        if spec.kind == "structural_tag":
            return _structural_tag(spec.value)
        return _parse_ebnf_or_lark(spec.value)
    except InvalidRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError/its own types
        raise _error(spec, e) from None


def _structural_tag(text: str) -> xgrammar.Grammar:
    """xgrammar's structural tag (`{"type": "structural_tag", "format": ...}`), or vLLM's form of it, which
    response_format {"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers": [...]}
    sends: xgrammar 0.2 takes that one only through its older (tags, triggers) call, as vLLM's backend does."""
    import xgrammar as xgr

    tag = json.loads(text)
    if not (isinstance(tag, dict) and "structures" in tag and "format" not in tag):
        return xgr.Grammar.from_structural_tag(text)
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not isinstance(triggers, list) or not triggers:
        raise ValueError("structures must be a list and triggers a non-empty list of strings")
    items = []
    for s in structures:
        if not isinstance(s, dict) or not {"begin", "end"} <= set(s):
            raise ValueError(f"each structure needs begin, schema and end, got {s!r}")
        schema = s.get("schema", {})
        items.append(xgr.StructuralTagItem(begin=s["begin"], end=s["end"],
                                           schema=schema if isinstance(schema, str) else json.dumps(schema)))
    return xgr.Grammar.from_structural_tag(items, triggers)


def _parse_ebnf_or_lark(text: str) -> xgrammar.Grammar:
    import xgrammar as xgr

    try:
        return xgr.Grammar.from_ebnf(text)
    except Exception as ebnf_error:  # noqa: BLE001
        try:
            return xgr.Grammar.from_lark(text)
        except Exception:  # noqa: BLE001 - report the EBNF error: GBNF is the documented syntax
            raise ebnf_error from None


@functools.lru_cache(maxsize=256)
def check_spec(wire: str) -> GrammarSpec:
    """Parse a wire spec and its grammar (no tokenizer needed, milliseconds, cached); raises InvalidRequestError
    naming the problem."""
    spec = GrammarSpec.from_wire(wire)
    parse(spec)
    return spec


class GrammarState:
    """One request's matcher: what its output so far allows next.

    Its grammar compiles in the background (`GrammarCompiler.submit`); until `ready()` the scheduler holds the
    request back. Invariant once ready: the matcher has accepted `output_token_ids[:num_accepted]`; tokens
    appended by other paths (a resumed request's, a prefill worker's first token learnt late) are caught up with
    before the next mask. A grammar that failed to compile, or an output token it refuses, leaves the state
    `broken`: nothing is legal, and the request ends with stop at its next token."""

    def __init__(self, compiled: Future[xgrammar.CompiledGrammar], stop_token_ids: tuple[int, ...]) -> None:
        self._compiled = compiled
        self._stop_token_ids = stop_token_ids
        self._matcher: xgrammar.GrammarMatcher | None = None
        self.num_accepted = 0
        self.broken = False

    def ready(self) -> bool:
        """Whether the grammar is compiled (or failed to: then the state is broken)."""
        if self._matcher is not None or self.broken:
            return True
        if not self._compiled.done():
            return False
        import xgrammar as xgr

        try:
            self._matcher = xgr.GrammarMatcher(self._compiled.result(),
                                               override_stop_tokens=list(self._stop_token_ids) or None)
        except Exception:  # noqa: BLE001 - the request ends (stop) instead of taking the engine down
            log.exception("a grammar failed to compile")
            self.broken = True
        return True

    def accept(self, token_id: int) -> bool:
        """Advance by one output token; False (and no change) if the grammar does not allow it."""
        if self.broken or self._matcher is None or not self._matcher.accept_token(token_id):
            return False
        self.num_accepted += 1
        return True

    def catch_up(self, output_token_ids: Sequence[int]) -> bool:
        """Accept the output tokens not accepted yet; False (the state is broken) if one is refused."""
        while self.ready() and not self.broken and self.num_accepted < len(output_token_ids):
            self.broken = not self.accept(output_token_ids[self.num_accepted])
        return not self.broken

    def is_terminated(self) -> bool:
        return self._matcher is not None and bool(self._matcher.is_terminated())

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many leading `tokens` the grammar accepts in a row (the state is unchanged afterwards)."""
        m = self._matcher
        if m is None or self.broken:
            return 0
        n = 0
        for t in tokens:
            if m.is_terminated() or not m.accept_token(t):
                break
            n += 1
        if n:
            m.rollback(n)
        return n

    def fill(self, bitmask: torch.Tensor, row: int, ahead: Sequence[int] = ()) -> None:
        """Write into `bitmask[row]` the tokens allowed after the output plus `ahead` (drafts, all legal); nothing
        is allowed in a broken state."""
        m = self._matcher
        if m is None or self.broken:
            bitmask[row].zero_()
            return
        accepted = 0
        for t in ahead:
            if m.is_terminated() or not m.accept_token(t):
                break
            accepted += 1
        m.fill_next_token_bitmask(bitmask, row)
        if accepted:
            m.rollback(accepted)


def _state_and_ahead(row: Any) -> tuple[GrammarState | None, Sequence[int]]:
    """A sampler row's grammar, caught up with its output, and the drafts the row is ahead by: a Request, or a
    RowView (spec_decode.sampling)."""
    request = getattr(row, "request", row)
    if request.grammar is not None:
        request.grammar.catch_up(request.output_token_ids)
    return request.grammar, getattr(row, "extra", ())


def has_grammar(rows: Sequence[Any]) -> bool:
    return any(_state_and_ahead(r)[0] is not None for r in rows)


def apply_masks(logits: torch.Tensor, rows: Sequence[Any]) -> torch.Tensor:
    """Float32 logits with each grammar row's disallowed tokens at -inf (other rows untouched). The bitmask is
    filled on the host and reaches the device in one pinned, non-blocking copy."""
    import xgrammar as xgr

    masked = [(i, *_state_and_ahead(r)) for i, r in enumerate(rows)]
    masked = [(i, g, ahead) for i, g, ahead in masked if g is not None]
    logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
    if not masked:
        return logits
    bitmask = xgr.allocate_token_bitmask(len(rows), logits.shape[1])
    for i, g, ahead in masked:
        g.fill(bitmask, i, ahead)
    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=[i for i, _, _ in masked])
    return logits


def trim_drafts(scheduled: Sequence[Any], draft_probs: dict[str, torch.Tensor] | None) -> None:
    """Speculative decoding: cut each grammar request's drafts at the first one its grammar refuses (and its q
    rows with them), so verification only ever sees legal drafts."""
    for s in scheduled:
        r = s.request
        if r.grammar is None or not r.spec_token_ids:
            continue
        r.grammar.catch_up(r.output_token_ids)
        keep = r.grammar.valid_prefix(r.spec_token_ids)
        if keep < len(r.spec_token_ids):
            r.spec_token_ids = r.spec_token_ids[:keep]
            if draft_probs is not None and r.request_id in draft_probs:
                draft_probs[r.request_id] = draft_probs[r.request_id][:keep]
