"""A PrefillRequest's prompt (text, token ids or chat messages) as validated token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qwenpd.engine.engine import Engine
from qwenpd.engine.tokenizer import TemplateArgumentError, TokenizerError
from qwenpd.errors import InvalidArgument
from qwenpd.limits import Limits
from qwenpd.media import media_limits, read_media
from qwenpd.prefill_service.media import PromptImages, place_media, template_content
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2
from qwenpd.tools import check_tools

_FIELD = {"text": "text", "token_ids": "token_ids.ids", "chat": "chat.messages"}
REASONING_OPEN = "<think>"  # Qwen3.5/3.6 reasoning; their templates open it in the generation prompt


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as token ids, whether its chat template opened the model's reasoning, and its images
    and videos placed in the ids (None: a text prompt)."""

    ids: list[int]
    reasoning_open: bool = False
    images: PromptImages | None = None


def encode_prompt(request: prefill_pb2.PrefillRequest, engine: Engine, limits: Limits | None = None) -> Prompt:
    """The prompt's token ids; InvalidArgument naming the field when it is missing, empty, not tokenizable,
    longer than `limits.max_prompt_tokens`, holds an id outside the vocabulary, or does not fit the model's
    context."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "give the prompt as text, token_ids or chat")
    field = _FIELD[kind]
    if request.resume_generated and kind != "token_ids":
        # the generated tokens are given back as ids: text would tokenize them anew, maybe differently
        raise InvalidArgument("resume_generated", "needs the prompt as token_ids (the prompt's ids, then the "
                              f"tokens already generated), not as {kind}")
    reasoning_open = False
    media, media_fields = list(request.media), [f"media[{i}]" for i in range(len(request.media))]
    if media and kind == "chat":
        raise InvalidArgument("media[0]", "a chat prompt carries its images in its messages' parts")
    # a resumed request's prompt ends with tokens it generated itself: those count against max_tokens
    most = prompt_capacity(engine, limits) + max(0, request.resume_generated)
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
    else:
        tok = engine.tokenizer
        if tok is None:
            raise InvalidArgument(field, "this model has no tokenizer; send token_ids")
        if kind == "text":
            text = request.text
        else:
            messages = []
            for i, m in enumerate(request.chat.messages):
                message = _message(m, i)
                message["content"], more, more_fields = template_content(m, i, engine.config.vision is not None)
                media += more
                media_fields += more_fields
                messages.append(message)
            if not messages:
                raise InvalidArgument(field, "the chat has no messages")
            tools = _tools(request.chat.tools_json) if request.chat.tools_json else None
            kwargs = _json(request.chat.template_kwargs_json, "chat.template_kwargs_json", dict) \
                if request.chat.template_kwargs_json else None
            try:
                thinking = request.chat.enable_thinking if request.chat.HasField("enable_thinking") else None
                text = tok.apply_chat_template(messages, enable_thinking=thinking, tools=tools, template_kwargs=kwargs)
            except TemplateArgumentError as exc:
                raise InvalidArgument("chat.template_kwargs_json", str(exc)) from None
            except TokenizerError as exc:
                raise InvalidArgument(field, str(exc)) from None
            reasoning_open = text.rstrip().endswith(REASONING_OPEN)
        ids = tok.encode_at_most(text, most) if text else []
        if ids is None:
            raise InvalidArgument(field, f"the prompt has more than {most} tokens, the most this server takes",
                                  reason="PROMPT_TOO_LONG")
    if not ids:
        raise InvalidArgument(field, "the prompt is empty")
    images = None
    resumed = request.resume_generated > 0  # a token_ids prompt (refused above otherwise)
    # a resumed request sends the prompt back as prefill returned it (its placeholders expanded already), then
    # the tokens it generated (which may be anything, pad tokens included)
    own = len(ids) - request.resume_generated if resumed else len(ids)
    if media or (engine.config.vision is not None and _has_placeholder(ids[:own], engine)):
        items = read_media(media, media_fields, engine, media_limits(limits or Limits()), max_tokens=most)
        ids, images = place_media(ids, items, engine, media_fields[0] if media_fields else field,
                                  expanded=own if resumed else None, media=media)
        if len(ids) > most:
            raise InvalidArgument(field, f"the prompt with its images has {len(ids)} tokens, more than this "
                                  f"server takes ({prompt_capacity(engine, limits)})", reason="PROMPT_TOO_LONG")
    if limits is not None:
        # a resumed request's prompt ends with tokens it generated itself: those count against max_tokens
        limits.check_prompt(len(ids) - min(request.resume_generated, len(ids) - 1), field)
    try:
        engine.check_tokens(ids)
    except ValueError as exc:  # an id outside the vocabulary, or longer than the context
        raise InvalidArgument(field, str(exc)) from None
    return Prompt(ids, reasoning_open, images)


def _has_placeholder(ids: list[int], engine: Engine) -> bool:
    """Whether a prompt without media holds image/video placeholders (refused: they would stand for nothing)."""
    v = engine.config.vision
    return v.image_token_id in ids or v.video_token_id in ids


def _message(m: common_pb2.ChatMessage, i: int) -> dict[str, Any]:
    """A chat message as chat templates take it (assistant tool calls with their arguments as objects)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls_json:
        calls = _json(m.tool_calls_json, f"chat.messages[{i}].tool_calls_json", list)
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidArgument(f"chat.messages[{i}].tool_calls_json", "each tool call needs a function name")
            arguments = function.get("arguments", "{}")
            if isinstance(arguments, str):
                function["arguments"] = _json(arguments or "{}", f"chat.messages[{i}].tool_calls_json", dict)
        out["tool_calls"] = calls
    for name in ("tool_call_id", "name", "reasoning_content"):
        if getattr(m, name):
            out[name] = getattr(m, name)
    return out


def _tools(text: str) -> list[dict[str, Any]]:
    """Chat.tools_json as OpenAI's `tools`: each {"type": "function", "function": {"name": ..., "parameters": a
    JSON schema object (optional)}}, as the gateway's HTTP API checks them."""
    tools = _json(text, "chat.tools_json", list)
    try:
        check_tools(tools)
    except InvalidArgument as exc:
        raise InvalidArgument("chat.tools_json", f"{exc.field}: {exc.description}") from None
    return tools


def _json(text: str, field: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise InvalidArgument(field, f"must be a JSON {'array' if kind is list else 'object'}")
    return value


def prompt_capacity(engine: Engine, limits: Limits | None) -> int:
    """The most prompt tokens a request may have: the model's context, or less by `limits`."""
    context = engine.config.max_position_embeddings
    if limits is None or limits.max_prompt_tokens is None:
        return context
    return min(context, limits.max_prompt_tokens)
