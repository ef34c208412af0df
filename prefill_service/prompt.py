"""A PrefillRequest's prompt (text, token ids or chat messages) as validated token ids."""

from __future__ import annotations

from dataclasses import dataclass

from qwenpd.engine.engine import Engine
from qwenpd.engine.tokenizer import TokenizerError
from qwenpd.errors import InvalidArgument
from qwenpd.limits import Limits
from qwenpd.protos.qwenpd.v1 import prefill_pb2

_FIELD = {"text": "text", "token_ids": "token_ids.ids", "chat": "chat.messages"}
REASONING_OPEN = "<think>"  # Qwen3.5/3.6 reasoning; their templates open it in the generation prompt


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as token ids, and whether its chat template opened the model's reasoning."""

    ids: list[int]
    reasoning_open: bool = False


def encode_prompt(request: prefill_pb2.PrefillRequest, engine: Engine, limits: Limits | None = None) -> Prompt:
    """The prompt's token ids; InvalidArgument naming the field when it is missing, empty, not tokenizable,
    longer than `limits.max_prompt_tokens`, holds an id outside the vocabulary, or does not fit the model's
    context."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "give the prompt as text, token_ids or chat")
    field = _FIELD[kind]
    reasoning_open = False
    if kind == "token_ids":
        ids = list(request.token_ids.ids)
    else:
        tok = engine.tokenizer
        if tok is None:
            raise InvalidArgument(field, "this model has no tokenizer; send token_ids")
        if kind == "text":
            text = request.text
        else:
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            if not messages:
                raise InvalidArgument(field, "the chat has no messages")
            try:
                thinking = request.chat.enable_thinking if request.chat.HasField("enable_thinking") else None
                text = tok.apply_chat_template(messages, enable_thinking=thinking)
            except TokenizerError as exc:
                raise InvalidArgument(field, str(exc)) from None
            reasoning_open = text.rstrip().endswith(REASONING_OPEN)
        # a resumed request's prompt ends with tokens it generated itself: those count against max_tokens
        most = prompt_capacity(engine, limits) + max(0, request.resume_generated)
        ids = tok.encode_at_most(text, most) if text else []
        if ids is None:
            raise InvalidArgument(field, f"the prompt has more than {most} tokens, the most this server takes",
                                  reason="PROMPT_TOO_LONG")
    if not ids:
        raise InvalidArgument(field, "the prompt is empty")
    if limits is not None:
        # a resumed request's prompt ends with tokens it generated itself: those count against max_tokens
        limits.check_prompt(len(ids) - min(request.resume_generated, len(ids) - 1), field)
    try:
        engine.check_tokens(ids)
    except ValueError as exc:  # an id outside the vocabulary, or longer than the context
        raise InvalidArgument(field, str(exc)) from None
    return Prompt(ids, reasoning_open)


def prompt_capacity(engine: Engine, limits: Limits | None) -> int:
    """The most prompt tokens a request may have: the model's context, or less by `limits`."""
    context = engine.config.max_position_embeddings
    if limits is None or limits.max_prompt_tokens is None:
        return context
    return min(context, limits.max_prompt_tokens)
