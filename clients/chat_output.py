"""Qwen3.5/3.6 chat output as OpenAI expects it: reasoning, content and tool calls, parsed from text deltas.

The model writes its reasoning inside `<think>...</think>` (the chat template's generation prompt may already have
opened it: `thinking_open`), and calls tools as

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    ...
    </function>
    </tool_call>

possibly several, possibly after text, possibly inside the reasoning (a call there is still a call). `ChatOutput` is
a pure function of the text deltas: `push(text)` returns what is now certain (reasoning, content, tool-call deltas),
holding back a tail that might still become markup; `finish()` flushes. No markup of a call ever reaches content; a
call that is not well formed is given back as the text it was. A call the output ends inside (the length limit) is
still a call where its name is complete, with the parameters written in full (its arguments a JSON object all the
same), and is dropped where even the name is not: it never becomes content. Tool-call deltas follow OpenAI's stream
shape: the first carries index, id, type and name, then argument fragments that concatenate to the JSON object of
the whole call; values are converted by the tool's JSON schema (integer, number, boolean, object, array, null;
strings verbatim). The non-streamed result is the concatenation of the stream (`ChatOutput.parse`).

Plain Python (no grpc, no torch): used by the gateway and the client library alike. Groundwork of issue 24: not
yet wired to requests.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)
_CUT_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*)", re.S)  # a call the output ended inside
_MARKUP = (THINK_OPEN, THINK_CLOSE, CALL_OPEN)


@dataclass(slots=True)
class ToolCallDelta:
    """One piece of a tool call in OpenAI's stream shape (the first of a call has id, type and name)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass(slots=True)
class Delta:
    """What one push made certain."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class Parsed:
    """A whole output: reasoning, content and the tool calls it made."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]


class ChatOutput:
    """Streaming parser of one completion (see the module docstring)."""

    def __init__(self, tools: Sequence[Mapping[str, Any]] = (), thinking_open: bool = False,
                 new_id: Callable[[], str] = lambda: "call_" + secrets.token_hex(12), calls: bool = True):
        """`calls`: parse tool calls (False: their markup is text, for requests that offered no tools)."""
        self._types = {_tool_name(t): _parameter_types(t) for t in tools if _tool_name(t)}
        self._markup = _MARKUP if calls else (THINK_OPEN, THINK_CLOSE)
        self._thinking = thinking_open
        self._new_id = new_id
        self._pending = ""  # text not yet certain
        self._calls = 0
        self._answered = False  # content has begun: a <think> after it is text
        self._after_think = False  # content's first newlines after </think> are the template's, not the answer's
        self._after_call = False  # whitespace between and after calls is layout, not content
        self._after_open = False  # the newline after the model's own <think> is layout too

    @classmethod
    def parse(cls, text: str, tools: Sequence[Mapping[str, Any]] = (), thinking_open: bool = False,
              new_id: Callable[[], str] = lambda: "call_" + secrets.token_hex(12), calls: bool = True) -> Parsed:
        """The whole of `text` at once: exactly what the stream of it adds up to."""
        parser = cls(tools, thinking_open, new_id, calls)
        return collect([parser.push(text), parser.finish()])

    def push(self, text: str) -> Delta:
        self._pending += text
        return self._drain(final=False)

    def finish(self) -> Delta:
        return self._drain(final=True)

    # ---- the state machine ------------------------------------------------------------------------------------
    def _drain(self, final: bool) -> Delta:
        out = Delta()
        while self._pending:
            if CALL_OPEN in self._markup and self._pending.startswith(CALL_OPEN):
                end = self._pending.find(CALL_CLOSE)
                if end < 0:
                    if not final:
                        break  # the call is still being written
                    deltas = self._cut_call(self._pending[len(CALL_OPEN):])
                    if deltas is None:
                        self._text(out, self._pending)  # never closed and not the start of a call: text
                    else:
                        out.tool_calls += deltas
                    self._pending = ""
                    break
                block = self._pending[len(CALL_OPEN):end]
                self._pending = self._pending[end + len(CALL_CLOSE):]
                deltas = self._call(block)
                if deltas is None:
                    self._text(out, CALL_OPEN + block + CALL_CLOSE)  # not a well-formed call: its text
                else:
                    out.tool_calls += deltas
                    self._after_call = not self._thinking
                continue
            if self._thinking and self._pending.startswith(THINK_CLOSE):
                self._thinking = False
                self._after_think = True
                self._pending = self._pending[len(THINK_CLOSE):]
                continue
            if not self._thinking and self._pending.startswith(THINK_OPEN) and not (self._answered or self._calls):
                self._thinking = True
                self._after_open = True
                self._pending = self._pending[len(THINK_OPEN):]
                continue
            cut = self._next_markup(self._pending)
            if cut == 0:  # a markup prefix that cannot be decided yet
                if not final:
                    break
                cut = len(self._pending)
            self._text(out, self._pending[:cut])
            self._pending = self._pending[cut:]
        return out

    def _next_markup(self, text: str) -> int:
        """Where the next (possible) markup starts in `text`: its length if none; 0 if it starts with a prefix of
        one that more text could complete."""
        cut = len(text)
        for tag in self._markup:
            at = text.find(tag, 1) if text.startswith(tag) else text.find(tag)
            if at >= 0:
                cut = min(cut, at)
        for n in range(min(len(text), max(map(len, _MARKUP))), 0, -1):  # a partial tag at the end
            if any(tag.startswith(text[-n:]) for tag in self._markup):
                cut = min(cut, len(text) - n)
                break
        return cut

    def _text(self, out: Delta, text: str) -> None:
        if self._thinking:
            if self._after_open:
                text = text.lstrip("\n")
                self._after_open = not text
            out.reasoning += text
            return
        if self._after_think or self._after_call:
            text = text.lstrip("\n") if self._after_think else text.lstrip()
            self._after_think = self._after_call = not text
        out.content += text
        self._answered = self._answered or bool(text)

    def _call(self, block: str) -> list[ToolCallDelta] | None:
        m = _FUNCTION.fullmatch(block)
        if m is None:
            return None
        body = m.group(2)
        if _PARAMETER.sub("", body).strip():  # text between parameters: not a call
            return None
        return self._deltas(m.group(1).strip(), list(_PARAMETER.finditer(body)))

    def _cut_call(self, block: str) -> list[ToolCallDelta] | None:
        """A call the output ended inside: its deltas with the parameters written in full where the name is
        complete, none where it is not; None where `block` is not the start of a call (it was text)."""
        m = _CUT_FUNCTION.fullmatch(block)
        if m is None:
            head = block.lstrip()
            opening = "<function=".startswith(head) or (head.startswith("<function=") and "\n" not in head)
            return [] if opening else None
        body, params, at = m.group(2), [], 0
        for p in _PARAMETER.finditer(body):
            if body[at:p.start()].strip():  # text between parameters: not a call
                return None
            params.append(p)
            at = p.end()
        rest = body[at:].strip()
        if rest and not (rest.startswith("<parameter=") or any(tag.startswith(rest)
                                                              for tag in ("<parameter=", "</function>"))):
            return None
        return self._deltas(m.group(1).strip(), params)

    def _deltas(self, name: str, params: list[re.Match[str]]) -> list[ToolCallDelta]:
        """The stream deltas of one call: id and name, then the parameters' JSON fragments."""
        types = self._types.get(name, {})
        index = self._calls
        self._calls += 1
        deltas = [ToolCallDelta(index, id=self._new_id(), name=name)]
        for i, p in enumerate(params):
            key = p.group(1).strip()
            value = json.dumps(_convert(p.group(2), types.get(key)), ensure_ascii=False)
            deltas.append(ToolCallDelta(index, arguments=("{" if i == 0 else ", ") + json.dumps(key) + ": " + value))
        deltas.append(ToolCallDelta(index, arguments="}" if params else "{}"))
        return deltas


def collect(deltas: Sequence[Delta]) -> Parsed:
    """The whole output of a stream of deltas (tool calls joined by index)."""
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        for t in d.tool_calls:
            call = calls.setdefault(t.index, ToolCall(t.id or "", t.name or "", ""))
            call.arguments += t.arguments
    return Parsed(reasoning, content, [calls[i] for i in sorted(calls)])


def merged(deltas: Sequence[ToolCallDelta]) -> list[ToolCallDelta]:
    """Tool-call deltas with one entry per call (OpenAI sends at most one per index in a stream event): the
    pieces of each index joined, in order."""
    out: dict[int, ToolCallDelta] = {}
    for t in deltas:
        joined = out.get(t.index)
        if joined is None:
            out[t.index] = ToolCallDelta(t.index, t.id, t.name, t.arguments)
        else:
            joined.id, joined.name = joined.id or t.id, joined.name or t.name
            joined.arguments += t.arguments
    return list(out.values())


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    function = tool.get("function") if isinstance(tool, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else None


def _parameter_types(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters") or {}
    props = params.get("properties") if isinstance(params, Mapping) else None
    return {k: (v.get("type") if isinstance(v, Mapping) else None) for k, v in (props or {}).items()}


def _convert(value: str, kind: Any) -> Any:
    """A parameter's text as the JSON value its schema type says (strings, and what does not parse: verbatim)."""
    kinds = kind if isinstance(kind, list) else [kind]
    text = value.strip()
    for k in kinds:
        try:
            if k == "integer" and re.fullmatch(r"[-+]?\d+", text):
                return int(text)
            if k == "number":
                number = float(text)
                return int(number) if re.fullmatch(r"[-+]?\d+", text) else number
            if k == "boolean" and text.lower() in ("true", "false"):
                return text.lower() == "true"
            if k in ("object", "array"):
                parsed = json.loads(text)
                if isinstance(parsed, dict if k == "object" else list):
                    return parsed
            if k == "null" and text.lower() in ("null", "none", ""):
                return None
        except ValueError:
            continue
    return value


# ---- constrained tool calls --------------------------------------------------------------------------------------
_STRING_VALUE = r"/[^<]*[^<\n]\n/"  # a string parameter's text and the newline before </parameter> (no "<" in it)
_COMPACT = {"whitespace_flexible": False}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) of output that is only calls of `tools` in the format above: each call
    names one of them and gives every required parameter (then any optional ones, in schema order), string values
    as text (one line of at most maxLength characters where the schema bounds it; string enums verbatim), every
    other schema as compact JSON valid under it. `parallel`: one call or several. What
    tool_choice "required" (all tools) and a named function (one) constrain the answer to."""
    rules = ["start: BREAK? call" + (' ("\\n" call)*' if parallel else ""), r"BREAK: /\n{1,2}/",
             f"STRING: {_STRING_VALUE}"]
    functions = []
    for i, tool in enumerate(tools):
        name = _tool_name(tool)
        params = tool["function"].get("parameters") or {}
        props = params.get("properties") or {} if isinstance(params, Mapping) else {}
        required = [k for k in params.get("required", []) if k in props] if isinstance(params, Mapping) else []
        parts = []
        for j, key in enumerate([*required, *(k for k in props if k not in required)]):
            schema = props[key] if isinstance(props[key], Mapping) else {}
            rule = f"p{i}_{j}"
            choices = schema["enum"] if isinstance(schema.get("enum"), list) else \
                [schema["const"]] if "const" in schema else None
            if choices and all(isinstance(c, str) for c in choices):  # written verbatim, as any string value
                alternatives = " | ".join(f'"{_lark_text(c)}"' for c in choices)
                rules.append(f'{rule}: "<parameter={_lark_text(key)}>\\n" ({alternatives}) "\\n</parameter>\\n"')
            elif schema.get("type", "string") == "string" and choices is None:
                text = "STRING"
                if isinstance(schema.get("maxLength"), int) and schema["maxLength"] >= 1:  # one bounded line
                    text = f"/[^<\\n]{{1,{schema['maxLength']}}}\\n/"
                rules.append(f'{rule}: "<parameter={_lark_text(key)}>\\n" {text} "</parameter>\\n"')
            else:
                value = {**schema, "x-guidance": _COMPACT}
                rules.append(f'{rule}: "<parameter={_lark_text(key)}>\\n" v{i}_{j} "\\n</parameter>\\n"')
                rules.append(f"v{i}_{j}: %json {json.dumps(value)}")
            parts.append(rule if key in required else f"{rule}?")
        rules.append(f'f{i}: "<function={_lark_text(name)}>\\n" {" ".join(parts)} "</function>\\n"')
        functions.append(f"f{i}")
    rules.append(f'call: "<tool_call>\\n" ({" | ".join(functions)}) "</tool_call>"')
    return "\n".join(rules)


def _lark_text(text: str | None) -> str:
    """`text` inside a Lark double-quoted string."""
    return json.dumps(text or "")[1:-1]
