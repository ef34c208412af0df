"""OpenAI-style chat messages as the prefill service takes them (`qwenpd.v1.ChatMessage`): tool calls of assistant
turns and tool results included. Shared by the client library and the gateway; plain Python and protobuf."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any

from qwenpd.errors import InvalidArgument
from qwenpd.protos.qwenpd.v1 import common_pb2


Fetch = Callable[[str, str], tuple[bytes, str]]  # (url, field) -> (bytes, media type); InvalidArgument if refused


def data_url(url: str, field: str) -> tuple[bytes, str]:
    """The bytes and media type of a `data:<type>;base64,<payload>` URL; InvalidArgument naming `field` for any
    other URL (fetching is the gateway's to allow: --allowed-media-domains, --allowed-local-media-path)."""
    if not url.startswith("data:"):
        raise InvalidArgument(field, "only data: URLs are taken here (http(s) and file URLs need the server to "
                                     "allow them: --allowed-media-domains / --allowed-local-media-path)")
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise InvalidArgument(field, "a data URL must be base64: data:<media type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True), head[: -len(";base64")].lower()
    except (binascii.Error, ValueError):
        raise InvalidArgument(field, "the data URL's payload is not valid base64") from None


def _url_of(value: Any, key: str, field: str) -> Any:
    """OpenAI's {"url": ...} object (or the bare string some clients send) of an image_url/video_url part."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping) or "url" not in value:
        raise InvalidArgument(field, f"'{key}' must be an object with a 'url'")
    detail = value.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):  # accepted, not acted on: README
        raise InvalidArgument(f"{field}.detail", "'detail' must be 'auto', 'low' or 'high'")
    return value["url"]


def media_part(part: Mapping[str, Any], field: str, fetch: Fetch) -> common_pb2.Media:
    """An image or video content part as a Media: OpenAI's {"type": "image_url", "image_url": {"url"}} (data
    URLs, or what `fetch` allows), {"type": "video_url", "video_url": {"url": [frame URLs], "fps"}} or
    {"type": "video", "video": [frame URLs], "fps"}, and the client library's {"type": "image", "image": bytes}."""
    kind = part.get("type")
    if kind == "image" and isinstance(part.get("image"), (bytes, bytearray)):
        return common_pb2.Media(image=bytes(part["image"]), mime_type=str(part.get("mime_type", "")))
    if kind == "image_url":
        data, mime = fetch(_url_of(part.get("image_url"), "image_url", field), f"{field}.image_url")
        return common_pb2.Media(image=data, mime_type=mime)
    if kind in ("video_url", "video"):
        key = "video_url" if kind == "video_url" else "video"
        value = part.get(key)
        frames = _url_of(value, key, field) if kind == "video_url" else value
        if isinstance(frames, str):
            raise InvalidArgument(f"{field}.{key}", "send a video as its frames (a list of image URLs, sampled at "
                                  "'fps'); video files are not decoded")
        if not isinstance(frames, list) or not frames:
            raise InvalidArgument(f"{field}.{key}", "a video is a non-empty list of frame image URLs")
        media = common_pb2.Media()
        for j, frame in enumerate(frames):
            if isinstance(frame, (bytes, bytearray)):
                media.video.frames.append(bytes(frame))
                continue
            if not isinstance(frame, str):
                raise InvalidArgument(f"{field}.{key}[{j}]", "a frame is an image URL")
            media.video.frames.append(fetch(frame, f"{field}.{key}[{j}]")[0])
        fps = part.get("fps", value.get("fps") if isinstance(value, Mapping) else None)
        if fps is not None:
            if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0.01 <= fps <= 240:
                raise InvalidArgument(f"{field}.fps", "'fps' must be a number in [0.01, 240]")
            media.fps = float(fps)
        return media
    raise InvalidArgument(f"{field}.type", f"unsupported content part type {kind!r}; use 'text', 'image_url' or "
                                           "'video_url'")


def content_parts(content: list, i: int, fetch: Fetch = data_url) -> list[common_pb2.ContentPart]:
    """A message's content given as parts (OpenAI's array form) as ContentParts; InvalidArgument naming
    `messages[i].content[j]` for what is malformed or refused."""
    out = []
    for j, part in enumerate(content):
        field = f"messages[{i}].content[{j}]"
        if not isinstance(part, Mapping):
            raise InvalidArgument(field, "a content part must be an object with a 'type'")
        if part.get("type") == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidArgument(f"{field}.text", "a text part needs a string 'text'")
            out.append(common_pb2.ContentPart(text=part["text"]))
        else:
            out.append(common_pb2.ContentPart(media=media_part(part, field, fetch)))
    return out


def chat_message(m: Mapping[str, Any], i: int, role: str | None = None, content: Any = None,
                 fetch: Fetch = data_url) -> common_pb2.ChatMessage:
    """Message `i` of a chat (`role`/`content` when the caller already normalised them); InvalidArgument naming
    `messages[i].<field>` for what is malformed. Content as parts (a list) keeps its images and videos
    (`fetch` resolves their URLs)."""
    role = m.get("role") if role is None else role
    content = m.get("content") if content is None else content
    if not isinstance(role, str):
        raise InvalidArgument(f"messages[{i}].role", "each message needs a string 'role'")
    if isinstance(content, list):
        parts = content_parts(content, i, fetch)
        if all(p.WhichOneof("part") == "text" for p in parts):  # text only: one string, as before
            content = "".join(p.text for p in parts)
        else:
            out = common_pb2.ChatMessage(role=role, parts=parts)
            return _message_fields(out, m, i, role)
    if content is not None and not isinstance(content, str):
        raise InvalidArgument(f"messages[{i}].content", "'content' must be a string or an array of parts")
    return _message_fields(common_pb2.ChatMessage(role=role, content=content or ""), m, i, role)


def _message_fields(out: common_pb2.ChatMessage, m: Mapping[str, Any], i: int, role: str) -> common_pb2.ChatMessage:
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
        _known(fmt, {"type"}, "response_format")
        return json.dumps({"type": "json_object"})
    if kind == "json_schema":
        _known(fmt, {"type", "json_schema"}, "response_format")
        spec = fmt.get("json_schema")
        schema = spec.get("schema", {}) if isinstance(spec, Mapping) else None
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not isinstance(schema, Mapping):
            raise InvalidArgument("response_format.json_schema", "needs a 'name' and a 'schema' object")
        # `strict`: the output always follows the schema; `description` is for the schema's readers
        _known(spec, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        return json.dumps({"type": "json_schema", "schema": schema})
    raise InvalidArgument("response_format.type", "must be 'text', 'json_object' or 'json_schema'")


def _known(obj: Mapping[str, Any], keys: set[str], field: str) -> None:
    unknown = sorted(set(obj) - keys)
    if unknown:
        raise InvalidArgument(f"{field}.{unknown[0]}", "is not supported by this server")


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
