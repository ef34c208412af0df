"""Golden tests of the chat-output parser (clients/chat_output.py) on hand-written Qwen3.6 outputs: reasoning,
content and tool calls, whole and streamed in every split, the stream adding up to the whole."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from qwenpd.clients.chat_output import ChatOutput, collect, merged

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "ratio": {"type": "number"}, "tags": {"type": "array"}, "opts": {"type": "object"}, "note": {"type": ["null", "string"]}}}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {
    "q": {"type": "string"}}}}}
TOOLS = [WEATHER, SEARCH]


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=ratio>\n0.5\n"
        "</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n<parameter=opts>\n{\"x\": 1}\n</parameter>\n"
        "<parameter=note>\nnull\n</parameter>\n</function>\n</tool_call>")
CALL_ARGS = {"city": "San Francisco, CA", "days": 3, "metric": True, "ratio": 0.5, "tags": ["a", "b"],
             "opts": {"x": 1}, "note": None}
SEARCH_CALL = "<tool_call>\n<function=search>\n<parameter=q>\nline one\nline <two>\n</parameter>\n</function>\n</tool_call>"

GOLDEN = [  # (name, thinking_open, output, reasoning, content, [(name, arguments)])
    ("plain", False, "Hello there.", "", "Hello there.", []),
    ("reasoning opened by the prompt", True, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n",
     "The answer is 4.", []),
    ("reasoning opened by the model", False, "<think>hmm</think>\n\nDone.", "hmm", "Done.", []),
    ("one call after text", False, "Sure.\n" + CALL, "", "Sure.\n", [("get_weather", CALL_ARGS)]),
    ("two calls", False, CALL + "\n" + SEARCH_CALL + "\n", "", "",
     [("get_weather", CALL_ARGS), ("search", {"q": "line one\nline <two>"})]),
    ("a call inside the reasoning", True, "I should look it up.\n" + SEARCH_CALL + "\n</think>\n\n",
     "I should look it up.\n\n", "", [("search", {"q": "line one\nline <two>"})]),
    ("an unknown tool keeps strings", False,
     "<tool_call>\n<function=other>\n<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>", "", "",
     [("other", {"n": "7"})]),
    ("no parameters", False, "<tool_call>\n<function=search>\n</function>\n</tool_call>", "", "", [("search", {})]),
    ("malformed: left as text", False, "<tool_call>\nnot a call\n</tool_call> ok", "",
     "<tool_call>\nnot a call\n</tool_call> ok", []),
    ("cut off after the name: a call", False, "x <tool_call>\n<function=search>\n", "", "x ", [("search", {})]),
    ("cut off inside a parameter: the ones written in full", False, "<tool_call>\n<function=get_weather>\n"
     "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3", "", "", [("get_weather", {"city": "Paris"})]),
    ("cut off before </tool_call>", False, "Sure.\n" + CALL[:-len("</tool_call>")], "", "Sure.\n",
     [("get_weather", CALL_ARGS)]),
    ("cut off inside the name: dropped", False, "Sure.\n<tool_call>\n<function=get_wea", "", "Sure.\n", []),
    ("cut off after the opening tag: dropped", False, CALL + "\n<tool_call>\n<function", "", "",
     [("get_weather", CALL_ARGS)]),
    ("never closed and not a call: text", False, "x <tool_call> is the tag", "", "x <tool_call> is the tag", []),
    ("<think> after content is text", False, "Hello <think>x</think> bye", "", "Hello <think>x</think> bye", []),
    ("markup-like text stays text", False, "a < b and <tool> and </think>", "", "a < b and <tool> and </think>", []),
]


def _check(parsed, reasoning, content, calls):
    assert parsed.reasoning == reasoning
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == calls
    assert all(c.id for c in parsed.tool_calls)


@pytest.mark.parametrize("name,thinking,text,reasoning,content,calls", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_whole_outputs(name, thinking, text, reasoning, content, calls):
    _check(ChatOutput.parse(text, TOOLS, thinking, _ids()), reasoning, content, calls)


@pytest.mark.parametrize("name,thinking,text,reasoning,content,calls", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_streams_add_up_to_the_whole_in_every_split(name, thinking, text, reasoning, content, calls):
    rng = random.Random(name)
    splits = [[1] * len(text), [len(text)]] + [[rng.randint(1, 9) for _ in range(len(text))] for _ in range(20)]
    whole = ChatOutput.parse(text, TOOLS, thinking, _ids())
    for sizes in splits:
        parser, deltas, at = ChatOutput(TOOLS, thinking, _ids()), [], 0
        for n in sizes:
            if at >= len(text):
                break
            deltas.append(parser.push(text[at:at + n]))
            at += n
        deltas.append(parser.finish())
        got = collect(deltas)
        _check(got, reasoning, content, calls)
        assert [(c.id, c.arguments) for c in got.tool_calls] == [(c.id, c.arguments) for c in whole.tool_calls]
        assert not any(tag in d.content for d in deltas for tag in ("<tool_call>", "<function=")) or \
            "tool_call" in content  # no call markup leaks into content unless it was text all along


def test_stream_shape_is_openais():
    """The first delta of a call has index, id, type and name; argument fragments follow and join to its JSON."""
    parser = ChatOutput(TOOLS, False, _ids())
    deltas = [parser.push(c) for c in CALL] + [parser.finish()]
    pieces = [t for d in deltas for t in d.tool_calls]
    first = pieces[0].to_openai()
    assert first == {"index": 0, "id": "call_0", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}
    assert all("id" not in p.to_openai() and "name" not in p.to_openai()["function"] for p in pieces[1:])
    assert json.loads("".join(p.arguments for p in pieces)) == CALL_ARGS
    assert not any(d.content for d in deltas)


def test_without_tools_call_markup_is_content():
    """A request that offered no tools gets what the model wrote as text; reasoning is still separated."""
    got = ChatOutput.parse("<think>x</think>" + SEARCH_CALL, calls=False)
    assert (got.reasoning, got.content, got.tool_calls) == ("x", SEARCH_CALL, [])


@pytest.mark.parametrize("name,thinking,text,reasoning,content,calls", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_every_split_point_gives_the_whole(name, thinking, text, reasoning, content, calls):
    """Two pieces, cut at every point: the same reasoning, content and calls as the text in one piece (a <think>
    after content had begun used to open reasoning when it came in a later piece)."""
    whole = ChatOutput.parse(text, TOOLS, thinking, _ids())
    for at in range(len(text) + 1):
        parser = ChatOutput(TOOLS, thinking, _ids())
        got = collect([parser.push(text[:at]), parser.push(text[at:]), parser.finish()])
        assert (got.reasoning, got.content) == (whole.reasoning, whole.content), at
        assert [(c.id, c.name, c.arguments) for c in got.tool_calls] == \
            [(c.id, c.name, c.arguments) for c in whole.tool_calls], at


def test_merged_deltas_have_one_entry_per_call():
    parser = ChatOutput(TOOLS, False, _ids())
    pieces = parser.push(CALL + SEARCH_CALL).tool_calls
    assert len(pieces) > 2
    one = [t.to_openai() for t in merged(pieces)]
    assert [(t["index"], t["id"], t["function"]["name"]) for t in one] == [(0, "call_0", "get_weather"),
                                                                         (1, "call_1", "search")]
    assert json.loads(one[0]["function"]["arguments"]) == CALL_ARGS
