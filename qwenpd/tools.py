"""OpenAI's function `tools`, checked alike wherever a request offers them: the gateway's HTTP API (`tools`) and
the prefill service's Chat.tools_json (gRPC callers who build the request themselves)."""

from __future__ import annotations

from typing import Any

from qwenpd.errors import InvalidArgument


def check_tools(tools: list[Any]) -> None:
    """InvalidArgument naming `tools[i]` (or `tools[i].function`) unless every tool is {"type": "function",
    "function": {"name": a non-empty string, "parameters": a JSON schema object (optional)}}."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidArgument(f"tools[{i}]", 'each tool must be {"type": "function", "function": {"name": ...}}')
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidArgument(f"tools[{i}].function", "a tool's 'parameters' must be a JSON schema object")
