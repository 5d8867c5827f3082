"""Tool calls: `tools` and `tool_choice` into the prompt and the grammar, the model's output back into tool calls.

- none: the tools are left out of the prompt; the output is plain content.
- auto: the tools go into the chat template (its own tool format when it has one, else a Hermes-style system
  prompt); the output is scanned for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, which
  become tool calls (finish reason tool_calls); text outside them is the content.
- required: a grammar makes the output a JSON array of one or more `{"name": <a tool>, "parameters": {...}}`
  (at most one with parallel_tool_calls false), so it always parses; each element is a tool call.
- a named function: a grammar makes the output that function's arguments (its JSON schema); one tool call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from engine.grammar import GrammarSpec
from engine.tokenizer import Tokenizer
from router.errors import bad_request
from router.protocol import ChatCompletionRequest, ChatMessage, FunctionCallOut, ToolCallOut, ToolDef

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

FALLBACK_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools; `mode` is none | auto | required | named."""

    mode: str
    tools: tuple[ToolDef, ...]
    name: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    def __post_init__(self) -> None:
        assert self.mode in ("none", "auto", "required", "named"), self.mode

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    def schema(self, name: str) -> dict[str, Any]:
        fn = next(t.function for t in self.tools if t.function.name == name)
        return fn.parameters or _ANY_OBJECT

    def grammar(self) -> tuple[str, GrammarSpec] | None:
        """The grammar a forcing tool_choice imposes (None for none/auto)."""
        if self.mode == "named":
            assert self.name is not None
            return "tool_choice", GrammarSpec("json", json.dumps(self.schema(self.name)))
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                   "parameters": self.schema(t.function.name)},
                  "required": ["name", "parameters"]} for t in self.tools]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return "tool_choice", GrammarSpec("json", json.dumps(array))


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool plan (None without tools); a 400 for a choice that names no known tool or needs tools
    that are not there."""
    tools = tuple(req.tools or ())
    choice = req.tool_choice
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", param="tools")
    for t in tools:
        if t.function.parameters is not None and t.function.parameters.get("type", "object") != "object":
            raise bad_request(f"tool {t.function.name!r}: parameters must be a JSON schema of an object",
                              param="tools")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_request("tool_choice requires tools", param="tool_choice")
        return None
    if choice is None or isinstance(choice, str):
        return ToolPlan(choice or "auto", tools, parallel=req.parallel_tool_calls is not False)
    if choice.function.name not in names:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the tools "
                          f"({', '.join(names)})", param="tool_choice")
    return ToolPlan("named", tools, choice.function.name)


def template_speaks_tools(tokenizer: Tokenizer) -> bool:
    source = tokenizer.chat_templates.get("tool_use") or tokenizer.chat_template or ""
    return "tools" in source


def conversation(req: ChatCompletionRequest, plan: ToolPlan | None, native: bool) -> list[dict[str, Any]]:
    """The messages for the chat template. Without a template that speaks tools, the tools go into a system
    prompt and earlier tool calls / results into text, Hermes style."""
    messages = [m.for_template() for m in req.messages]
    if native or plan is None or plan.mode == "none":
        return messages
    tools = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
    system = FALLBACK_PROMPT.format(tools=tools)
    out: list[dict[str, Any]] = []
    for m, d in zip(req.messages, messages, strict=True):
        out.append(_as_text(m, d))
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "role": "system", "content": f"{out[0].get('content', '')}\n\n{system}".strip()}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def _as_text(m: ChatMessage, d: dict[str, Any]) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text}\n</tool_response>"}
    if m.role == "assistant" and m.tool_calls:
        calls = "\n".join(f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})}'
                          f"\n{CLOSE}" for c in d["tool_calls"])
        return {"role": "assistant", "content": f"{m.text}\n{calls}".strip()}
    return d


def new_call(name: str, arguments: Any) -> ToolCallOut:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCallOut(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(name=name, arguments=args))


def call_from_json(text: str, plan: ToolPlan) -> ToolCallOut | None:
    """`{"name": ..., "arguments" | "parameters": {...}}` naming one of the tools, else None."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in {t.function.name for t in plan.tools}:
        return None
    return new_call(obj["name"], obj.get("arguments", obj.get("parameters", {})))


def parse_output(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCallOut]]:
    """A whole output -> (content, tool calls). Content is None when empty."""
    if plan.mode == "named":
        assert plan.name is not None
        return None, [new_call(plan.name, text)]
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except ValueError:
            return text or None, []  # cut short by max_tokens: not a whole array
        calls = [new_call(i["name"], i.get("parameters", {})) for i in items if isinstance(i, dict) and "name" in i]
        return None, calls
    content, calls, rest = [], [], text
    while (start := rest.find(OPEN)) >= 0:
        content.append(rest[:start])
        end = rest.find(CLOSE, start)
        body = rest[start + len(OPEN): end if end >= 0 else len(rest)]
        call = call_from_json(body.strip(), plan)
        if call is None:
            content.append(rest[start: end + len(CLOSE) if end >= 0 else len(rest)])
        else:
            calls.append(call)
        rest = rest[end + len(CLOSE):] if end >= 0 else ""
    content.append(rest)
    joined = "".join(content).strip()
    return joined or None, calls
