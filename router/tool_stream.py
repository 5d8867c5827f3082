"""A streamed output -> content deltas and tool-call deltas, as OpenAI streams them.

Each tool call's first delta carries its `index`, `id`, `type` and the function `name` (with `arguments` "" or
whole); later deltas of the same index carry argument text. A named tool_choice streams its arguments as they
are generated; auto and required emit each call whole as soon as it is complete (a `</tool_call>`, or the end of
an array element). Content never includes tool-call markup; whitespace around calls is dropped, as the whole
response's content is stripped (router/tools.py `parse_output`).
"""

from __future__ import annotations

import json

from router.protocol import FunctionDelta, ToolCallDelta
from router.tools import CLOSE, OPEN, ToolPlan, call_from_json, new_call


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker` (it may still become one)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class _ArrayScanner:
    """Finds the complete top-level elements of a JSON array as its text arrives."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = False
        self.element = ""

    def feed(self, text: str) -> list[str]:
        done: list[str] = []
        for ch in text:
            if self.in_string:
                self.element += ch
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch in "[{":
                self.depth += 1
                if self.depth == 1:
                    continue  # the array itself
            elif ch in "]}":
                self.depth -= 1
            if self.depth == 1 and ch == "," or self.depth == 0 and ch == "]":
                if self.element.strip():
                    done.append(self.element.strip())
                self.element = ""
                continue
            self.in_string = ch == '"'
            self.element += ch
        return done


class ToolCallStream:
    """One choice's streamed text -> (content, tool-call deltas), per `ToolPlan` mode."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.num_calls = 0
        self._buffer = ""
        self._in_call = False
        self._spoken = False  # content emitted already (leading whitespace is dropped before that)
        self._pending_space = ""
        self._array = _ArrayScanner()

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        if self.plan.mode == "named":
            return "", self._named(text)
        if self.plan.mode == "required":
            return "", [self._whole(new_call(e["name"], e.get("parameters", {})))
                        for e in map(json.loads, self._array.feed(text)) if isinstance(e, dict) and "name" in e]
        return self._auto(text, final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        if self.plan.mode == "auto":
            return self._auto("", final=True)
        return "", self._named("") if self.plan.mode == "named" and not self.num_calls else []

    def _named(self, text: str) -> list[ToolCallDelta]:
        out = []
        if not self.num_calls:
            call = new_call(self.plan.name or "", "")
            out.append(ToolCallDelta(index=0, id=call.id, type="function",
                                     function=FunctionDelta(name=call.function.name, arguments="")))
            self.num_calls = 1
        if text:
            out.append(ToolCallDelta(index=0, function=FunctionDelta(arguments=text)))
        return out

    def _whole(self, call: object) -> ToolCallDelta:
        from router.protocol import ToolCallOut

        assert isinstance(call, ToolCallOut)
        delta = ToolCallDelta(index=self.num_calls, id=call.id, type="function",
                              function=FunctionDelta(name=call.function.name, arguments=call.function.arguments))
        self.num_calls += 1
        return delta

    def _auto(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCallDelta] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(OPEN)
                if start < 0:
                    keep = 0 if final else _held_prefix(self._buffer, OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                self._buffer, self._in_call = self._buffer[start + len(OPEN):], True
                continue
            end = self._buffer.find(CLOSE)
            if end < 0 and not final:
                break
            body = self._buffer[: end if end >= 0 else len(self._buffer)]
            call = call_from_json(body.strip(), self.plan)
            if call is None:  # not a call after all: it is content, markup and all
                content.append(OPEN + body + (CLOSE if end >= 0 else ""))
            else:
                calls.append(self._whole(call))
            self._buffer = self._buffer[end + len(CLOSE):] if end >= 0 else ""
            self._in_call = False
        return self._content("".join(content), final), calls

    def _content(self, text: str, final: bool) -> str:
        """Drop leading whitespace, and hold trailing whitespace until text follows it (or drop it at the end)."""
        text = self._pending_space + text
        if not self._spoken:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_space = "" if final else text[len(body):]
        self._spoken = self._spoken or bool(body)
        return body
