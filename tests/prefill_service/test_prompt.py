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
