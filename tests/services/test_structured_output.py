"""Constrained decoding end to end (issue 24, item 2): the official openai SDK against `serve all`'s gateway on
the random-weight tiny model. response_format json_schema and json_object give content that parses (and
validates); tool_choice "required" and a named function give tool calls of the offered tools; the grammar state
crosses the prefill -> decode split (prefill samples the first token) and a resume (replayed from the tokens);
bad schemas are a 400 naming the parameter."""

from __future__ import annotations

import json
import re

import grpc
import openai
import pytest

from qwenpd.protos.qwenpd.v1 import common_pb2, prefill_pb2

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 30},
                                           "hot": {"type": "boolean"}},
          "required": ["city", "days", "hot"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"},
                                              "unit": {"enum": ["c", "f"]}}, "required": ["city", "days"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
OFF = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def oai(gateway):
    client = openai.OpenAI(base_url=f"http://{gateway.http}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    return client, model


def _ask(oai, **kw):
    client, model = oai
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          extra_body=OFF, **kw)


def test_json_schema_and_json_object(oai):
    for seed in range(3):
        r = _ask(oai, max_tokens=80, temperature=1.0, seed=seed, response_format={
            "type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
        value = json.loads(r.choices[0].message.content)
        assert r.choices[0].finish_reason == "stop"
        assert value["city"] in ("Paris", "Oslo", "Lima") and 1 <= value["days"] <= 30
    r = _ask(oai, max_tokens=400, temperature=0.7, seed=5, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_streamed_json_schema_is_the_same_text(oai):
    kw = dict(max_tokens=80, temperature=1.0, seed=11, response_format={
        "type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}})
    whole = _ask(oai, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(oai, stream=True, **kw) if c.choices)
    assert streamed == whole and json.loads(whole)["hot"] in (True, False)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls(oai, choice):
    names = set()
    for seed in range(3):
        r = _ask(oai, max_tokens=120, temperature=1.0, seed=seed, tools=TOOLS, tool_choice=choice,
                 parallel_tool_calls=False)
        message = r.choices[0].message
        if r.choices[0].finish_reason == "length":  # a string argument the random model never ended
            continue
        assert r.choices[0].finish_reason == "tool_calls" and not message.content
        (call,) = message.tool_calls
        names.add(call.function.name)
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert isinstance(args["city"], str) and isinstance(args["days"], int)
            assert args.get("unit", "c") in ("c", "f")
    assert names, "no call finished"
    if isinstance(choice, dict):
        assert names == {"get_weather"}


def test_bad_schema_is_a_400_naming_the_parameter(oai):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(oai, max_tokens=5, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}})
    assert "structured_output" in str(err.value.body) or err.value.body.get("param") == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        _ask(oai, max_tokens=5, response_format={"type": "xml"})
    assert err.value.body["param"] == "response_format.type"


def test_the_grammar_state_crosses_a_resume_exactly(services):
    """Resumed at every few tokens, the constrained continuation is the undisturbed one: prefill and decode
    rebuild the grammar from the tokens so far."""
    from qwenpd.clients.dispatch import resume_request
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc

    spec = json.dumps({"type": "json_schema", "schema": SCHEMA})
    request = prefill_pb2.PrefillRequest(text="Weather:", return_prompt_token_ids=True, sampling=common_pb2.SamplingParams(
        temperature=1.0, seed=3, max_tokens=60, structured_output=spec))

    def decode_all(stub, checkpoint_id):
        out = []
        for chunk in stub.Decode(decode_pb2.DecodeRequest(checkpoint_id=checkpoint_id), timeout=60):
            out += chunk.token_ids
        return out

    with grpc.insecure_channel(services.prefill) as pch, grpc.insecure_channel(services.decode) as dch:
        prefill, decode = prefill_pb2_grpc.PrefillServiceStub(pch), decode_pb2_grpc.DecodeServiceStub(dch)
        pre = prefill.Prefill(request, timeout=60)
        ref = decode_all(decode, pre.checkpoint_id)
        prompt = list(pre.prompt_token_ids)
        for k in range(1, len(ref) - 1, 4):
            again = prefill.Prefill(resume_request(request, prompt + ref[:k], k), timeout=60)
            assert decode_all(decode, again.checkpoint_id) == ref[k:], f"resumed after {k}"


def test_decode_refuses_another_grammar_than_prefills(services):
    """The first token was sampled under prefill's structured_output (or none): a Decode that gives another one is
    INVALID_ARGUMENT naming it, and the checkpoint stays for a call with prefill's."""
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc

    plain = common_pb2.SamplingParams(temperature=0, max_tokens=12)
    regex = common_pb2.SamplingParams(temperature=0, max_tokens=12,
                                      structured_output=json.dumps({"type": "regex", "pattern": "[ab]{3}"}))
    with grpc.insecure_channel(services.prefill) as pch, grpc.insecure_channel(services.decode) as dch:
        prefill, decode = prefill_pb2_grpc.PrefillServiceStub(pch), decode_pb2_grpc.DecodeServiceStub(dch)
        for before, after in ((plain, regex), (regex, plain)):
            pre = prefill.Prefill(prefill_pb2.PrefillRequest(text="Hello", sampling=before), timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                list(decode.Decode(decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id, sampling=after),
                                   timeout=60))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "sampling.structured_output" in err.value.details()
            text = "".join(c.text for c in decode.Decode(  # prefill's first token included
                decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id, sampling=before), timeout=60))
            assert before is plain or re.fullmatch("[ab]{3}", text), text


def test_a_grammar_that_cannot_go_on_fails_its_stream_alone(services):
    """A grammar complete after one digit with min_tokens 4: prefill streams the digit, decode's next step has
    no token it may sample; the stream ends INVALID_ARGUMENT naming sampling.structured_output (not "stop", no
    text outside the grammar) and the decode service serves the next request."""
    from qwenpd.protos.qwenpd.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2_grpc

    stuck = common_pb2.SamplingParams(temperature=0, max_tokens=12, min_tokens=4,
                                      structured_output=json.dumps({"type": "regex", "pattern": "[0-9]"}))
    with grpc.insecure_channel(services.prefill) as pch, grpc.insecure_channel(services.decode) as dch:
        prefill, decode = prefill_pb2_grpc.PrefillServiceStub(pch), decode_pb2_grpc.DecodeServiceStub(dch)
        pre = prefill.Prefill(prefill_pb2.PrefillRequest(text="Digit:", sampling=stuck), timeout=60)
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for chunk in decode.Decode(decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id), timeout=60):
                got.append(chunk)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "sampling.structured_output" in err.value.details() and "min_tokens" in err.value.details()
        assert "".join(c.text for c in got).isdigit() and not any(c.HasField("finish_reason") for c in got)
        plain = common_pb2.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        pre = prefill.Prefill(prefill_pb2.PrefillRequest(text="Hello", sampling=plain), timeout=60)
        chunks = list(decode.Decode(decode_pb2.DecodeRequest(checkpoint_id=pre.checkpoint_id), timeout=60))
        assert sum(len(c.token_ids) for c in chunks) == 6 and chunks[-1].HasField("finish_reason")


def test_the_python_client_constrains_and_parses(client):
    """Client.generate with tool_choice / response_format (issue 24, item 6): calls parsed, JSON content."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.generate(messages=messages, tools=TOOLS, tool_choice={"type": "function",
                                                                     "function": {"name": "get_time"}},
                        parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=2,
                        chat_template_kwargs={"enable_thinking": False})
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_time"], r.text
    assert r.finish_reason == "tool_calls"
    r = client.generate(messages=messages, max_tokens=80, temperature=1.0, seed=2,
                        chat_template_kwargs={"enable_thinking": False},
                        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    assert json.loads(r.content)["city"] in ("Paris", "Oslo", "Lima")
    with pytest.raises(ValueError):
        client.generate("text prompt", tool_choice="required")


def test_grpc_generate_takes_structured_output(gateway):
    """A client built from the .proto files alone: GenerateRequest's SamplingParams.structured_output constrains a
    chat answer to the schema through the gateway and the split (the gateway's chat output parsed into content),
    and a schema the grammar library refuses is INVALID_ARGUMENT naming the field."""
    from qwenpd.protos.qwenpd.v1 import generate_pb2, generate_pb2_grpc

    spec = json.dumps({"type": "json_schema", "schema": SCHEMA})
    chat = prefill_pb2.Chat(messages=[common_pb2.ChatMessage(role="user", content="Weather in Paris?")],
                            enable_thinking=False)
    with grpc.insecure_channel(gateway.address) as ch:
        stub = generate_pb2_grpc.GenerateServiceStub(ch)
        for seed in range(2):
            chunks = list(stub.Generate(generate_pb2.GenerateRequest(chat=chat, sampling=common_pb2.SamplingParams(
                temperature=1.0, seed=seed, max_tokens=80, structured_output=spec)), timeout=60))
            value = json.loads("".join(c.content for c in chunks))
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
            assert value["city"] in ("Paris", "Oslo", "Lima") and 1 <= value["days"] <= 30
        bad = json.dumps({"type": "json_schema", "schema": {"type": "object", "properties": {"x": {"type": 7}}}})
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(generate_pb2.GenerateRequest(chat=chat, sampling=common_pb2.SamplingParams(
                max_tokens=8, structured_output=bad)), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_output" in err.value.details()
