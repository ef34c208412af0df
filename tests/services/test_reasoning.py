"""Reasoning apart from content over the HTTP API (issue 24, item 3, first part): a chat template that opens
`<think>` in its generation prompt makes the output reasoning until `</think>`; it reaches `reasoning_content`
and `reasoning` (both names), streamed and whole, and never `content`."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from tests.services.conftest import start_serve_all, stop_serve_all

THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def thinking(tiny_model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = THINKING_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = start_serve_all(model, tmp_path_factory.mktemp("thinking-serve"), f"think{os.getpid()}")
    yield s
    assert stop_serve_all(s) == 0


def _chat(s, stream: bool, **extra):
    model = httpx.get(f"http://{s.http}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 24,
            "temperature": 0, "stream": stream, **extra}
    if not stream:
        return httpx.post(f"http://{s.http}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    deltas = []
    with httpx.stream("POST", f"http://{s.http}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += [c["delta"] for c in json.loads(line[6:])["choices"]]
    return deltas


def test_reasoning_is_apart_from_content_whole_and_streamed(thinking):
    whole = _chat(thinking, stream=False)["message"]
    assert whole["reasoning_content"] and whole["reasoning"] == whole["reasoning_content"]
    content = whole["content"] or ""  # null when the reply is all reasoning, as OpenAI's
    assert "<think>" not in content and "</think>" not in content
    deltas = _chat(thinking, stream=True)
    assert "".join(d.get("reasoning_content", "") for d in deltas) == whole["reasoning_content"]
    assert "".join(d.get("reasoning", "") for d in deltas) == whole["reasoning"]
    assert "".join(d.get("content") or "" for d in deltas) == content


def test_thinking_off_is_all_content(thinking, services):
    off = _chat(thinking, stream=False, chat_template_kwargs={"enable_thinking": False})["message"]
    assert "reasoning_content" not in off and "reasoning" not in off and off["content"]
    plain = _chat(services, stream=False)["message"]  # a template that opens no reasoning: all content
    assert "reasoning_content" not in plain and plain["content"]
