"""OpenAI-style chat messages as the prefill service takes them (`qwenpd.v1.ChatMessage`): tool calls of assistant
turns and tool results included. Shared by the client library and the gateway; plain Python and protobuf."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qwenpd.errors import InvalidArgument
from qwenpd.protos.qwenpd.v1 import common_pb2


def chat_message(m: Mapping[str, Any], i: int, role: str | None = None, content: str | None = None
                 ) -> common_pb2.ChatMessage:
    """Message `i` of a chat (`role`/`content` when the caller already normalised them); InvalidArgument naming
    `messages[i].<field>` for what is malformed."""
    role = m.get("role") if role is None else role
    content = m.get("content") if content is None else content
    if not isinstance(role, str):
        raise InvalidArgument(f"messages[{i}].role", "each message needs a string 'role'")
    if content is not None and not isinstance(content, str):
        raise InvalidArgument(f"messages[{i}].content", "'content' must be a string")
    out = common_pb2.ChatMessage(role=role, content=content or "")
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise InvalidArgument(f"messages[{i}].tool_calls", "'tool_calls' must be an array, on assistant messages")
        out.tool_calls_json = json.dumps(calls)
    for name in ("tool_call_id", "name", "reasoning_content"):
        value = m.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidArgument(f"messages[{i}].{name}", f"'{name}' must be a string")
            setattr(out, name, value)
    return out


def set_template_kwargs(chat: Any, kwargs: Mapping[str, Any]) -> None:
    """`chat_template_kwargs` onto a `qwenpd.v1.Chat` (in place): `enable_thinking` in its own field, every other
    argument in `template_kwargs_json`."""
    if "enable_thinking" in kwargs:
        chat.enable_thinking = bool(kwargs["enable_thinking"])
    others = {k: v for k, v in kwargs.items() if k != "enable_thinking"}
    if others:
        chat.template_kwargs_json = json.dumps(others)


def response_format_spec(fmt: Any) -> str:
    """OpenAI's response_format as SamplingParams.structured_output (engine/constraint.py): "" for text or none,
    else a JSON spec. InvalidArgument names the bad part."""
    if fmt is None or fmt == {"type": "text"}:
        return ""
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "json_object":
        return json.dumps({"type": "json_object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not isinstance(schema, Mapping):
            raise InvalidArgument("response_format.json_schema", "needs a 'name' and a 'schema' object")
        return json.dumps({"type": "json_schema", "schema": schema})
    raise InvalidArgument("response_format.type", "must be 'text', 'json_object' or 'json_schema'")


def tool_choice_spec(tools: list[dict[str, Any]], choice: Any, parallel: bool = True
                     ) -> tuple[list[dict[str, Any]], str]:
    """The tools to offer the model (none for tool_choice "none") and the structured_output that forces calls:
    of any of them for "required", of the named one for {"type": "function", "function": {"name": ...}}, "" for
    "auto" (the default: calls are parsed from free text). `tools` must be checked already."""
    from qwenpd.clients.chat_output import tool_call_grammar

    if choice in (None, "auto"):
        return tools, ""
    if choice == "none":
        return [], ""
    forced: list[dict[str, Any]] = []
    if choice == "required":
        if not tools:
            raise InvalidArgument("tool_choice", "'required' needs tools")
        forced = tools
    elif isinstance(choice, Mapping):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, Mapping) else None
        forced = [t for t in tools if t["function"]["name"] == name][:1]
        if not forced:
            raise InvalidArgument("tool_choice", 'names no function of the tools ({"type": "function", '
                                  '"function": {"name": ...}})')
    else:
        raise InvalidArgument("tool_choice", "must be 'auto', 'none', 'required' or a named function")
    return tools, json.dumps({"type": "lark", "grammar": tool_call_grammar(forced, parallel)})
