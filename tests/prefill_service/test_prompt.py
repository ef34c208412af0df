"""encode_prompt's refusals name the request field at fault."""

import pytest

from qwenpd.errors import InvalidArgument
from qwenpd.prefill_service.prompt import encode_prompt
from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2


def _chat(**fields) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(chat=prefill_pb2.Chat(
        messages=[common_pb2.ChatMessage(role="user", content="hi")], **fields))


def test_a_template_argument_the_server_sets_is_refused_under_its_field(engine):
    with pytest.raises(InvalidArgument) as info:
        encode_prompt(_chat(template_kwargs_json='{"add_generation_prompt": false}'), engine)
    assert info.value.field == "chat.template_kwargs_json"
    assert "add_generation_prompt" in info.value.message


def test_a_malformed_template_argument_object_is_refused_under_its_field(engine):
    with pytest.raises(InvalidArgument) as info:
        encode_prompt(_chat(template_kwargs_json="[1]"), engine)
    assert info.value.field == "chat.template_kwargs_json"


def test_other_arguments_reach_the_template(engine):
    assert encode_prompt(_chat(template_kwargs_json='{"style": "terse"}'), engine).ids


@pytest.mark.parametrize("tools_json", ["[1, 2]", '[{"type": "function"}]', '[{"function": {"name": "f"}}]',
                                        '[{"type": "function", "function": {"name": ""}}]',
                                        '[{"type": "function", "function": {"name": "f", "parameters": [1]}}]'],
                         ids=["numbers", "no-function", "no-type", "empty-name", "parameters-not-object"])
def test_tools_that_are_not_tool_objects_are_refused_under_their_field(engine, tools_json):
    with pytest.raises(InvalidArgument) as info:
        encode_prompt(_chat(tools_json=tools_json), engine)
    assert info.value.field == "chat.tools_json"


def test_tool_objects_reach_the_template(engine):
    tools = '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]'
    assert encode_prompt(_chat(tools_json=tools), engine).ids


@pytest.mark.parametrize("prompt", ["text", "chat"])
def test_resume_generated_needs_a_token_ids_prompt(engine, prompt):
    request = _chat() if prompt == "chat" else prefill_pb2.PrefillRequest(text="Hello there")
    request.resume_generated = 1
    with pytest.raises(InvalidArgument) as info:
        encode_prompt(request, engine)
    assert info.value.field == "resume_generated"
    resumed = prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=engine.tokenizer.encode("Hello there")),
                                         resume_generated=1)
    assert encode_prompt(resumed, engine).ids == list(resumed.token_ids.ids)
