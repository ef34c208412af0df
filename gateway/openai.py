"""The OpenAI API's request and response shapes: JSON bodies of /v1/completions and /v1/chat/completions checked
and turned into PrefillRequests, completions turned back into OpenAI JSON, and errors in OpenAI's error shape.
No HTTP framework here: the HTTP layer (gateway.http) only moves bytes.

What decode cannot do is refused with a 400 naming the parameter, never silently ignored: best_of, suffix;
and so is every parameter an endpoint does not know
(`reasoning_effort`, ...): each endpoint reads a fixed set of names; so are an unknown key of a message or of
`stream_options`, an integer past its protobuf field's range and a lone UTF-16 surrogate (no UTF-8 holds it).
A prompt that does not fit the context with the max_tokens the caller gave is OpenAI's context_length_exceeded;
completions without max_tokens get OpenAI's default, 16. Sampling: OpenAI's (logit_bias and the
presence/frequency penalties included) and vLLM's `top_k`, `min_p`, `min_tokens`, `stop_token_ids`,
`ignore_eos`, `repetition_penalty`; qwenpd's `speculative` (false: this request decodes without MTP drafts; true
where the deployment runs none is a 400). `cache_salt` is the prefix-cache partition (the `X-Cache-Salt` header wins over it);
`chat_template_kwargs` reaches the template (`enable_thinking` and any other argument). `user`,
`safety_identifier` and `prompt_cache_key` identify an end user or a prompt family: accepted, and they do not
partition the cache. Chat outputs are parsed into reasoning, content and tool calls (clients.chat_output).
Per-token strings of `logprobs` are each token's own (decode sends every token's bytes when logprobs are asked
for): a token holding part of a character is `bytes:\\xNN...` with its exact `bytes`, as OpenAI writes it.
"""

from __future__ import annotations

import codecs
import json
import re
import math
import time
from dataclasses import dataclass, field
from typing import Any

from qwenpd.errors import (Cancelled, DeadlineExceeded, InvalidArgument, QwenpdError, ResourceExhausted,
                           Unauthenticated, Unavailable)
from qwenpd.clients.chat_output import ChatOutput
from qwenpd.clients.chat_request import (Fetch, chat_message, data_url, response_format_spec,
                                         set_template_kwargs, tool_choice_spec)
from qwenpd.clients.chat_output import collect as collect_output
from qwenpd.gateway.core import Choice, token_texts
from qwenpd.tokens import token_text
from qwenpd.tools import check_tools
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2

MAX_N = 16
MAX_TOP_LOGPROBS = 20  # as OpenAI
MAX_STOP = 4  # as OpenAI
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions
UINT32_MAX = 2**32 - 1  # the protobuf fields' range
_SURROGATE = re.compile("[\ud800-\udfff]")
# A message's keys: the ones read; what OpenAI's own responses carry, taken when null or empty (a response's
# message sent back as history); `reasoning` is read as `reasoning_content` (our responses carry both names).
_MESSAGE_KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning"})
_MESSAGE_EMPTY_KEYS = frozenset({"refusal", "audio", "function_call", "annotations"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_STREAM_OPTIONS = frozenset({"include_usage"})
_UNSUPPORTED = ("functions", "function_call", "suffix", "audio", "modalities", "prediction")
# The names each endpoint reads; any other is refused (400 naming it).
_COMMON_PARAMS = frozenset({"model", "temperature", "top_p", "max_tokens", "seed", "stop", "n", "best_of", "stream",
                            "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "top_k",
                            "ignore_eos", "cache_salt", "user", "safety_identifier", "prompt_cache_key", "min_p",
                            "logit_bias", "stop_token_ids", "min_tokens", "response_format",
                            "repetition_penalty", "speculative", *_UNSUPPORTED})
_COMPLETION_PARAMS = _COMMON_PARAMS | {"prompt", "echo"}
_CHAT_PARAMS = _COMMON_PARAMS | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs", "tools",
                                  "tool_choice", "parallel_tool_calls"}


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: QwenpdError, p: Parsed | None = None, context: int | None = None) -> ApiError:
    """A backend or routing failure as the HTTP error a caller of the OpenAI API expects: a refused field named
    as the request `p` named it, a prompt too long for the model's `context` as OpenAI says it."""
    if isinstance(exc, InvalidArgument):
        param = _openai_field(exc.field, p) or None
        if exc.reason == "PROMPT_TOO_LONG":
            return ApiError(400, _too_long(p, context, f"more than {context or 'that many'}", exc.description),
                            param=param, code="context_length_exceeded")
        code = None if exc.reason == InvalidArgument.default_reason else exc.reason.lower()
        description = exc.description if param else exc.message
        return ApiError(400, f"'{param}': {description}" if param else description, param=param, code=code)
    if isinstance(exc, Unauthenticated):
        return ApiError(401, exc.message, "authentication_error", code="invalid_api_key")
    if isinstance(exc, ResourceExhausted):
        return ApiError(429, exc.message, "rate_limit_error", code="queue_full",
                        retry_after_s=exc.retry_after_s if exc.retry_after_s is not None else 1.0)
    if isinstance(exc, Unavailable):
        return ApiError(503, exc.message, "service_unavailable", code="no_backend",
                        retry_after_s=exc.retry_after_s)
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, exc.message, "timeout", code="deadline_exceeded")
    if isinstance(exc, Cancelled):
        return ApiError(499, exc.message, "cancelled", code="cancelled")
    return ApiError(500, exc.message, "server_error")


_PART = re.compile(r"^chat\.messages\[(\d+)\]\.parts\[(\d+)\](?:\.media)?")
_MESSAGE_FIELD = re.compile(r"^chat\.messages\[(\d+)\]\.(\w+?)(?:_json)?(?=$|[.\[])")
_STOP = re.compile(r"^sampling\.stop\[\d+\]")
# the prefill request's fields as the OpenAI request names them; prompt fields are the endpoint's prompt
_FIELDS = {"sampling.structured_output": "response_format", "chat.template_kwargs_json": "chat_template_kwargs",
           "chat.enable_thinking": "chat_template_kwargs.enable_thinking", "chat.tools_json": "tools",
           "sampling.top_logprobs": "top_logprobs"}
_PROMPT_FIELDS = ("prompt", "text", "token_ids", "chat", "chat.messages")


def _openai_field(field: str, p: Parsed | None = None) -> str:
    """A prefill request's field as the OpenAI request named it: `sampling.max_tokens` as the caller's
    max_tokens or max_completion_tokens, `chat.messages[i].tool_calls_json` as messages[i].tool_calls, a content
    part as messages[i].content[j], the prompt as `prompt` (completions) or `messages` (chat)."""
    chat = p is None or p.chat
    if field == "sampling.max_tokens":
        return p.max_tokens_param if p is not None else "max_tokens"
    if field == "sampling.top_logprobs" and not chat:
        return "logprobs"
    if field in _FIELDS:
        return _FIELDS[field]
    if field.split(".")[0] in _PROMPT_FIELDS and not field.startswith("chat.messages["):
        return "messages" if chat else "prompt"
    field = _STOP.sub("stop", _PART.sub(r"messages[\1].content[\2]", field))
    field = _MESSAGE_FIELD.sub(r"messages[\1].\2", field)
    return field.removeprefix("sampling.")


def _too_long(p: Parsed | None, context: int | None, prompt: int | str, why: str = "", completion: int = 0) -> str:
    """OpenAI's words for a request that does not fit the context (agents and LiteLLM recognise them)."""
    where = "messages" if p is None or p.chat else "prompt"
    limit = f"This model's maximum context length is {context} tokens." if context else \
        "The prompt is longer than this model's context."
    if completion and isinstance(prompt, int):
        return (f"{limit} However, you requested {prompt + completion} tokens ({prompt} in the {where}, "
                f"{completion} in the completion). Please reduce the length of the {where} or completion.")
    return f"{limit} However, your {where} resulted in {prompt} tokens{f' ({why})' if why else ''}. " \
        f"Please reduce the length of the {where}."


def check_context(p: Parsed, prompt_tokens: int, context: int) -> None:
    """OpenAI's 400 context_length_exceeded when a prompt of `prompt_tokens` alone, or with the max_tokens the
    caller gave, is more than the model's `context` (a default max_tokens is cut short at the context's end)."""
    param = "messages" if p.chat else "prompt"
    if prompt_tokens > context:
        raise ApiError(400, _too_long(p, context, prompt_tokens), param=param, code="context_length_exceeded")
    if p.max_tokens is not None and prompt_tokens + p.max_tokens > context:
        raise ApiError(400, _too_long(p, context, prompt_tokens, completion=p.max_tokens), param=param,
                       code="context_length_exceeded")


# ---- requests ----------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Parsed:
    """A checked request: one PrefillRequest per prompt, n completions of each."""

    chat: bool
    model: str
    prompts: list[prefill_pb2.PrefillRequest]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    tools: list[dict[str, Any]] = field(default_factory=list)  # offered, with tool_choice "auto": calls are parsed
    parallel_tool_calls: bool = True
    top_logprobs: int = 0
    # completions' echo: per prompt, the text to put before the output (None: the prompt's tokens' text, from
    # PrefillResponse.prompt_logprobs); None = no echo
    echo: list[str | None] | None = None
    max_tokens: int | None = None  # as the caller gave it (None: the default)
    max_tokens_param: str = "max_tokens"  # the name it came under: max_tokens or max_completion_tokens


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
        raise ApiError(400, f"'{name}' must be {_kind_names(kinds)}, got a boolean", param=name)
    if not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {_kind_names(kinds)}, got {type(value).__name__}", param=name)
    return value


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names[k] for k in kinds))


def _sampling(body: dict, chat: bool) -> common_pb2.SamplingParams:
    s = common_pb2.SamplingParams()
    temperature = _get(body, "temperature", (int, float))
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
        s.temperature = float(temperature)
    top_p = _get(body, "top_p", (int, float))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ApiError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
        s.top_p = float(top_p)
    name = max_tokens_param(body, chat)
    max_tokens = _get(body, name, (int,))
    if max_tokens is not None:
        if max_tokens == 0 and body.get("echo"):
            raise ApiError(400, f"'{name}' must be >= 1: this server does not score a prompt alone (echo with "
                           "logprobs and max_tokens 1 scores it, beside one generated token)", param=name)
        s.max_tokens = _bounded(name, max_tokens, 1, UINT32_MAX)
    elif not chat:
        s.max_tokens = COMPLETION_MAX_TOKENS
    seed = _get(body, "seed", (int,))
    if seed is not None:  # OpenAI's seeds are signed 64-bit integers; ours are unsigned 63-bit ones
        s.seed = _bounded("seed", seed, -(1 << 63), (1 << 63) - 1) & ((1 << 63) - 1)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
            raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop")
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", param="stop")
        s.stop.extend(stops)
    # extensions beside OpenAI's parameters (as vLLM names them)
    s.top_k = _bounded("top_k", _get(body, "top_k", (int,), 0), 0, UINT32_MAX)
    s.ignore_eos = _get(body, "ignore_eos", (bool,), False)
    min_p = _get(body, "min_p", (int, float), 0)
    if not 0 <= min_p <= 1:
        raise ApiError(400, f"'min_p' must be in [0, 1], got {min_p}", param="min_p")
    s.min_p = float(min_p)
    for key, bias in _get(body, "logit_bias", (dict,), {}).items():
        if not (key.isascii() and key.isdigit() and int(key) <= UINT32_MAX) or isinstance(bias, bool) or \
                not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ApiError(400, "'logit_bias' maps token ids to numbers in [-100, 100]", param="logit_bias")
        s.logit_bias[int(key)] = float(bias)
    s.min_tokens = _bounded("min_tokens", _get(body, "min_tokens", (int,), 0), 0, UINT32_MAX)
    stop_ids = _get(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= UINT32_MAX for t in stop_ids):
        raise ApiError(400, "'stop_token_ids' must be non-negative integers", param="stop_token_ids")
    s.stop_token_ids.extend(stop_ids)
    for penalty in ("presence_penalty", "frequency_penalty"):
        value = _get(body, penalty, (int, float), 0)
        if not -2 <= value <= 2:
            raise ApiError(400, f"'{penalty}' must be in [-2, 2], got {value}", param=penalty)
        setattr(s, penalty, float(value))
    repetition = _get(body, "repetition_penalty", (int, float), 1)
    if not 0 < repetition <= 100:
        raise ApiError(400, f"'repetition_penalty' must be in (0, 100], got {repetition}", param="repetition_penalty")
    if repetition != 1:
        s.repetition_penalty = float(repetition)
    speculative = _get(body, "speculative", (bool,))
    if speculative is not None:
        s.speculative = speculative
    s.structured_output = _response_format(body)
    return s


def max_tokens_param(body: dict, chat: bool) -> str:
    """The name the caller's output budget comes under: chat's max_completion_tokens wins over max_tokens."""
    return "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"


def _bounded(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", param=name)
    return value


def _no_surrogates(value: Any, path: str = "") -> None:
    """A lone UTF-16 surrogate (JSON's "\\ud800") is no character: no UTF-8 text holds it, so no backend can take
    it. A 400 naming where it is (the object holding a key that has one)."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise ApiError(400, f"'{path}' holds a lone UTF-16 surrogate, which is not text", param=path or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_surrogates(key, path or "body")
            _no_surrogates(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_surrogates(item, f"{path}[{i}]")


def _response_format(body: dict) -> str:
    """OpenAI's response_format as a structured_output spec; the prefill service checks the schema with the grammar
    library (400 naming sampling.structured_output)."""
    try:
        return response_format_spec(_get(body, "response_format", (dict,)))
    except InvalidArgument as exc:
        raise ApiError(400, f"'{exc.field}' {exc.description}", param=exc.field) from None


def _common(body: Any, chat: bool) -> tuple[str, common_pb2.SamplingParams, int, bool, bool]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _no_surrogates(body)
    unknown = sorted(set(body) - (_CHAT_PARAMS if chat else _COMPLETION_PARAMS))
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not supported by this server", param=unknown[0])
    for name in ("user", "safety_identifier", "prompt_cache_key"):  # accepted; they do not partition the cache
        _get(body, name, (str,))
    model = _get(body, "model", (str,))
    if not model:
        raise ApiError(400, "'model' is required", param="model")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    if _get(body, "best_of", (int,), n) != n:
        raise ApiError(400, "'best_of' is not supported (only equal to n)", param="best_of")
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    unknown = sorted(set(options) - _STREAM_OPTIONS)  # vLLM's continuous_usage_stats too
    if unknown:
        raise ApiError(400, f"'stream_options.{unknown[0]}' is not supported by this server",
                       param=f"stream_options.{unknown[0]}")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    return model, _sampling(body, chat), n, stream, include_usage


def _salt(body: dict, header_salt: str | None) -> str | None:
    """The prefix-cache partition: the X-Cache-Salt header, else the body's `cache_salt`, else none (shared)."""
    if header_salt:
        return header_salt
    return _get(body, "cache_salt", (str,)) or None


def parse_completion(body: Any, header_salt: str | None = None) -> Parsed:
    model, sampling, n, stream, include_usage = _common(body, chat=False)
    logprobs = _get(body, "logprobs", (int,))
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", param="logprobs")
    sampling.top_logprobs = logprobs or 0  # N > 0: the N most likely tokens at each position too
    sampling.token_bytes = logprobs is not None
    echo = _get(body, "echo", (bool,), False)  # the prompt before the output; with logprobs, its scores too
    prompt = body.get("prompt")
    prompts: list[Any]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, an array of token ids, or an array of those", param="prompt")
    salt = _salt(body, header_salt)
    out = []
    for p in prompts:
        req = prefill_pb2.PrefillRequest(sampling=sampling)
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            req.text = p
        elif p and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in p):
            req.token_ids.ids.extend(p)
        else:
            raise ApiError(400, "'prompt' token arrays must hold non-negative integers", param="prompt")
        if salt is not None:
            req.cache_salt = salt
        if echo and (logprobs is not None or not isinstance(p, str)):  # scores, or the text of token ids
            req.prompt_logprobs = logprobs or 0
        out.append(req)
    return Parsed(False, model, out, n, stream, include_usage, logprobs is not None, top_logprobs=logprobs or 0,
                  echo=[p if isinstance(p, str) else None for p in prompts] if echo else None,
                  max_tokens=body.get("max_tokens"))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, "only text content parts are supported", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, "'content' must be a string or an array of text parts", param=f"messages[{i}].content")


def parse_chat(body: Any, header_salt: str | None = None,
               default_template_kwargs: dict[str, Any] | None = None, fetch: Fetch = data_url) -> Parsed:
    """A chat request; `default_template_kwargs` (the server's --default-chat-template-kwargs) under the request's
    own chat_template_kwargs; `fetch` resolves image URLs (the server's policy: gateway/media.py)."""
    model, sampling, n, stream, include_usage = _common(body, chat=True)
    logprobs = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), 0)
    if not 0 <= top <= MAX_TOP_LOGPROBS or (top and not logprobs):
        raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}] and needs 'logprobs': true",
                       param="top_logprobs")
    sampling.top_logprobs = top
    sampling.token_bytes = logprobs
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    chat = prefill_pb2.Chat()
    for i, m in enumerate(messages):
        _check_message(m, i)
        role = "system" if m["role"] == "developer" else m["role"]
        chat.messages.append(_message(m, role, i, fetch))
    parallel = _get(body, "parallel_tool_calls", (bool,), True)
    tools, forced = _tools(body, parallel)
    if tools:
        chat.tools_json = json.dumps(tools)
    if forced:
        if sampling.structured_output:
            raise ApiError(400, "'response_format' cannot be combined with tool_choice 'required' or a named function",
                           param="response_format")
        sampling.structured_output = forced
    kwargs = {**(default_template_kwargs or {}), **_get(body, "chat_template_kwargs", (dict,), {})}
    if not isinstance(kwargs.get("enable_thinking", False), bool):
        raise ApiError(400, "'chat_template_kwargs.enable_thinking' must be a boolean",
                       param="chat_template_kwargs.enable_thinking")
    set_template_kwargs(chat, kwargs)
    req = prefill_pb2.PrefillRequest(sampling=sampling, chat=chat)
    salt = _salt(body, header_salt)
    if salt is not None:
        req.cache_salt = salt
    name = max_tokens_param(body, chat=True)
    return Parsed(True, model, [req], n, stream, include_usage, logprobs, tools=tools, parallel_tool_calls=parallel,
                  top_logprobs=top, max_tokens=body.get(name), max_tokens_param=name)


def _tools(body: dict, parallel: bool) -> tuple[list[dict[str, Any]], str]:
    """The tools a chat request offers the model, checked (none when tool_choice is "none": the model is not told
    of them), and the structured_output that constrains its answer to calls of them (tool_choice "required" or a
    named function; "" otherwise)."""
    tools = _get(body, "tools", (list,), [])
    try:
        check_tools(tools)
    except InvalidArgument as exc:
        raise ApiError(400, exc.description, param=exc.field) from None
    try:
        return tool_choice_spec(tools, body.get("tool_choice"), parallel)
    except InvalidArgument as exc:
        raise ApiError(400, f"'{exc.field}' {exc.description}", param=exc.field) from None


def _check_message(m: Any, i: int) -> None:
    """A message's role and keys, as OpenAI checks them: a 400 naming what is unknown or missing."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, "each message needs a string 'role'", param=f"messages[{i}]")
    if m["role"] not in _ROLES:
        raise ApiError(400, f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}, got {m['role']!r}",
                       param=f"messages[{i}].role")
    for key in m:
        if key not in _MESSAGE_KEYS and not (key in _MESSAGE_EMPTY_KEYS and m[key] in (None, [], {})):
            raise ApiError(400, f"'messages[{i}].{key}' is not supported by this server", param=f"messages[{i}].{key}")
    if m["role"] != "assistant" and m.get("content") is None:
        raise ApiError(400, f"'messages[{i}].content' is required for a {m['role']} message",
                       param=f"messages[{i}].content")


def _message(m: dict, role: str, i: int, fetch: Fetch = data_url) -> common_pb2.ChatMessage:
    """A chat message of the request as the prefill service takes it (tool calls and results included; images and
    videos of its content parts, their URLs resolved by `fetch`: gateway/media.py)."""
    if m.get("reasoning_content") is None and m.get("reasoning") is not None:  # our responses' other name
        m = {**m, "reasoning_content": m["reasoning"]}
    try:
        content = m.get("content")
        return chat_message(m, i, role, content if isinstance(content, list) else _content(m, i), fetch)
    except InvalidArgument as exc:
        raise ApiError(400, exc.description, param=exc.field) from None


# ---- responses ---------------------------------------------------------------------------------------------------
def _logprobs(p: Parsed, texts: list[str], logprobs: list[float],
              tops: list[list[tuple[int, float, str, bytes]]] | None = None,
              raw: list[bytes] | None = None) -> Any:
    """OpenAI's logprobs of some tokens. Each token's string and bytes are its own (`raw`, from decode: a token
    holding part of a character is `bytes:\\xNN` with its exact bytes); without them (an older decode) the text
    of a chunk goes to its last token."""
    if not p.logprobs:
        return None
    tops = tops if tops else [[] for _ in logprobs]
    own = raw is not None and len(raw) == len(logprobs)
    if own:
        texts = [token_text(b) for b in raw]
    if p.chat:
        return {"content": [{"token": t, "logprob": _finite(lp), "bytes": list(raw[k] if own else t.encode()),
                             "top_logprobs": [{"token": c, "logprob": _finite(v), "bytes": list(b or c.encode())}
                                              for _, v, c, b in top]}
                            for k, (t, lp, top) in enumerate(zip(texts, logprobs, tops))]}
    offsets, at = [], 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for k, t in enumerate(texts):
        offsets.append(at)  # characters of the text before this token
        at += len(decoder.decode(raw[k])) if own else len(t)
    return {"tokens": texts, "token_logprobs": [_finite(lp) for lp in logprobs],
            "top_logprobs": [{c: _finite(v) for _, v, c, _ in top} for top in tops] if p.top_logprobs else None,
            "text_offset": offsets}


def echo_prefix(p: Parsed, c: Choice, prompt: int) -> tuple[str, dict[str, Any] | None]:
    """Completions' echo of prompt number `prompt`: its text and (with logprobs) its tokens' log-probabilities in
    the completions shape, the first token's null (nothing comes before it)."""
    entries = list(c.trace.prefill.prompt_logprobs) if c.trace.prefill is not None else []
    given = p.echo[prompt] if p.echo else None
    text = given if given is not None else b"".join(e.bytes for e in entries).decode("utf-8", "replace")
    if not p.logprobs:
        return text, None
    lp = _logprobs(p, [], [e.logprob for e in entries],
                   [[(t.id, t.logprob, t.text, t.bytes) for t in e.top_logprobs] for e in entries],
                   [e.bytes for e in entries])
    if lp is not None and entries:
        lp["token_logprobs"][0] = None
        if lp["top_logprobs"] is not None:
            lp["top_logprobs"][0] = None
    return text, lp


def _joined(before: dict[str, Any] | None, after: dict[str, Any] | None, shift: int) -> dict[str, Any] | None:
    """Two completions-shape logprobs one after the other; `after`'s offsets move past `shift` characters."""
    if before is None or after is None:
        return after if before is None else before
    return {"tokens": before["tokens"] + after["tokens"],
            "token_logprobs": before["token_logprobs"] + after["token_logprobs"],
            "top_logprobs": None if after["top_logprobs"] is None else before["top_logprobs"] + after["top_logprobs"],
            "text_offset": before["text_offset"] + [o + shift for o in after["text_offset"]]}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf


def usage_json(prompt_tokens: int, cached_tokens: int, completion_tokens: int, image_tokens: int = 0
               ) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.image_tokens` (an extension) counts the prompt tokens that
    stand for images and video frames, when there are any."""
    details: dict[str, Any] = {"cached_tokens": cached_tokens}
    if image_tokens:
        details["image_tokens"] = image_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": details}


def chat_output(p: Parsed, choice: Choice) -> ChatOutput:
    """The parser of a chat choice's output: reasoning apart from content, and tool calls when tools were offered
    (otherwise their markup is text)."""
    return ChatOutput(p.tools, thinking_open=choice.trace.reasoning_open, calls=bool(p.tools))


def message(text: str, reasoning: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An assistant message or delta: `content`, the reasoning under both names clients read
    (`reasoning_content`, `reasoning`) when there is any, and `tool_calls` when there are."""
    out: dict[str, Any] = {"content": text}
    if reasoning:
        out["reasoning_content"] = out["reasoning"] = reasoning
    if tool_calls:
        out["tool_calls"] = tool_calls
    return out


def tool_finish(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason of a choice that called tools: "tool_calls" where the model stopped by itself."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def response(p: Parsed, request_id: str, choices: list[Choice], usage: dict[str, Any]) -> dict[str, Any]:
    out = []
    for c in choices:
        text = "".join(c.text)
        lp = _logprobs(p, c.token_texts, c.logprobs, c.top_logprobs, c.token_bytes)
        if p.chat:
            parser = chat_output(p, c)
            whole = collect_output([parser.push(text), parser.finish()])
            calls = [t.to_openai() for t in whole.tool_calls][:None if p.parallel_tool_calls else 1]
            # no answer beside calls or reasoning: null, as OpenAI's
            content: Any = None if (calls or whole.reasoning) and not whole.content.strip() else whole.content
            out.append({"index": c.index, "message": {"role": "assistant", **message(content, whole.reasoning, calls)},
                        "logprobs": lp, "finish_reason": tool_finish(c.finish_reason, bool(calls))})
        else:
            if p.echo is not None:
                prefix, prefix_lp = echo_prefix(p, c, c.index // p.n)
                text, lp = prefix + text, _joined(prefix_lp, lp, len(prefix))
            out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": request_id, "object": "chat.completion" if p.chat else "text_completion", "created": p.created,
            "model": p.model, "choices": out, "usage": usage, "system_fingerprint": None}


def echo_chunk(p: Parsed, request_id: str, index: int, text: str, lp: dict[str, Any] | None) -> dict[str, Any]:
    """The first event of a streamed completion with echo: the prompt (echo_prefix), before any output."""
    out = {"id": request_id, "object": "text_completion", "created": p.created, "model": p.model,
           "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": None}],
           "system_fingerprint": None}
    if p.include_usage:
        out["usage"] = None
    return out


def stream_chunk(p: Parsed, request_id: str, index: int, token_ids: list[int], text: str, logprobs: list[float],
                 finish_reason: str | None, first: bool, reasoning: str = "", token_text: str | None = None,
                 tool_calls: list[dict[str, Any]] | None = None,
                 top_logprobs: list[list[tuple[int, float, str, bytes]]] | None = None,
                 token_bytes: list[bytes] | None = None, text_offset: int = 0) -> dict[str, Any]:
    """One event. Chat: `text`, `reasoning` and `tool_calls` are the parsed parts of the chunk's text
    (`token_text`, for the log-probabilities' token strings). Completions: `text_offset` characters of the
    choice's text came before this chunk (its logprobs' offsets count from the start of the whole text)."""
    lp = _logprobs(p, token_texts(token_ids, text if token_text is None else token_text), logprobs, top_logprobs,
                   token_bytes)
    if lp is not None and not p.chat:
        lp["text_offset"] = [o + text_offset for o in lp["text_offset"]]
    if p.chat:
        parts = message(text, reasoning, tool_calls)
        delta: dict[str, Any] = {"role": "assistant", **parts} if first else parts
        if finish_reason is not None and not text and not reasoning and not tool_calls and not first:
            delta = {}
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
    out = {"id": request_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
           "created": p.created, "model": p.model, "choices": [choice], "system_fingerprint": None}
    if p.include_usage:
        out["usage"] = None
    return out


def usage_chunk(p: Parsed, request_id: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if p.chat else "text_completion",
            "created": p.created, "model": p.model, "choices": [], "usage": usage, "system_fingerprint": None}
