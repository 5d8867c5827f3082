"""The HTTP request's structured-output fields -> one grammar spec for the workers (engine/grammar.py).

Sources, at most one per request: OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and `structured_outputs` (json, regex, choice, grammar,
json_object, structural_tag), and a tool_choice that forces tool calls (router/tools.py). The spec is parsed here,
so a schema, regex or grammar that does not compile is a 400 naming the field, before any worker sees it.
"""

from __future__ import annotations

import json
from typing import Any

from engine.grammar import GrammarSpec, check_spec
from engine.request import InvalidRequestError
from router.errors import bad_request
from router.protocol import GenerationRequest


def _json_text(value: str | dict[str, Any], param: str) -> str:
    if isinstance(value, dict):
        return json.dumps(value)
    try:
        json.loads(value)
    except ValueError as e:
        raise bad_request(f"{param} is not valid JSON: {e}", param=param) from None
    return value


def _from_response_format(req: GenerationRequest) -> list[tuple[str, GrammarSpec]]:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return []
    if rf.type == "json_object":
        return [("response_format", GrammarSpec("json_object"))]
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", param="response_format")
        return [("response_format", GrammarSpec("json", json.dumps(rf.json_schema.schema_)))]
    # As vLLM: xgrammar's structural tag is the whole {"type": "structural_tag", "format": ...}; the older form
    # (structures + triggers) goes as it is (engine/grammar.py compiles either).
    if rf.format is not None:
        tag: dict[str, Any] = {"type": "structural_tag", "format": rf.format}
    else:
        tag = {"structures": rf.structures or [], "triggers": rf.triggers or []}
    return [("response_format", GrammarSpec("structural_tag", json.dumps(tag)))]


def _from_guided(req: GenerationRequest) -> list[tuple[str, GrammarSpec]]:
    out: list[tuple[str, GrammarSpec]] = []
    if req.guided_json is not None:
        out.append(("guided_json", GrammarSpec("json", _json_text(req.guided_json, "guided_json"))))
    if req.guided_regex is not None:
        out.append(("guided_regex", GrammarSpec("regex", req.guided_regex)))
    if req.guided_choice is not None:
        out.append(("guided_choice", GrammarSpec("choice", json.dumps(req.guided_choice))))
    if req.guided_grammar is not None:
        out.append(("guided_grammar", GrammarSpec("grammar", req.guided_grammar)))
    so = req.structured_outputs
    if so is not None:
        param = "structured_outputs"
        if so.json_ is not None:
            out.append((param, GrammarSpec("json", _json_text(so.json_, "structured_outputs.json"))))
        if so.regex is not None:
            out.append((param, GrammarSpec("regex", so.regex)))
        if so.choice is not None:
            out.append((param, GrammarSpec("choice", json.dumps(so.choice))))
        if so.grammar is not None:
            out.append((param, GrammarSpec("grammar", so.grammar)))
        if so.json_object:
            out.append((param, GrammarSpec("json_object")))
        if so.structural_tag is not None:
            out.append((param, GrammarSpec("structural_tag", so.structural_tag)))
    return out


def grammar_of(req: GenerationRequest, forced: tuple[str, GrammarSpec] | None = None) -> str:
    """The request's grammar as the wire string ("" for none); `forced`: (param, spec) from tool_choice. A 400
    when several are given or the one given does not compile."""
    specs = _from_response_format(req) + _from_guided(req) + ([forced] if forced else [])
    if not specs:
        return ""
    if len(specs) > 1:
        names = ", ".join(dict.fromkeys(p for p, _ in specs))
        raise bad_request(f"only one structured output may be asked for per request, got {len(specs)} ({names})",
                          param=specs[1][0])
    param, spec = specs[0]
    wire = spec.to_wire()
    try:
        check_spec(wire)
    except InvalidRequestError as e:
        raise bad_request(f"{param}: {e}", param=param) from None
    return wire
