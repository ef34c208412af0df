"""The hand-off record (qwenpd.handoff, the prefill -> decode contract) without processes: sampling parameters to
and from protobuf, the metadata round trip, and refusals of malformed records."""

from __future__ import annotations

import dataclasses
import math

import pytest

from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import DataLoss, InvalidArgument
from qwenpd.handoff import Handoff, sampling_from_pb, sampling_to_pb, with_seed
from qwenpd.protos.qwenpd.v1 import common_pb2


def test_sampling_round_trip_and_field_names():
    params = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, seed=7, max_tokens=9, stop=("x",),
                            stop_token_ids=(4,), ignore_eos=True)
    assert sampling_from_pb(sampling_to_pb(params), 16, 512) == params
    defaults = sampling_from_pb(common_pb2.SamplingParams(), 16, 512)
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens, defaults.seed) == (1.0, 1.0, 16, None)
    assert with_seed(defaults).seed is not None
    for pb, field in ((common_pb2.SamplingParams(temperature=math.inf), "sampling.temperature"),
                      (common_pb2.SamplingParams(top_k=0, max_tokens=0), "sampling.max_tokens"),
                      (common_pb2.SamplingParams(stop_token_ids=[512]), "sampling.stop_token_ids")):
        with pytest.raises(InvalidArgument) as info:
            sampling_from_pb(pb, 16, 512)
        assert info.value.field == field


def test_handoff_metadata_round_trip_and_refusals():
    h = Handoff("req", 17, -1.5, "ab", SamplingParams(seed=3, max_tokens=5), 1, 40, 0, tuple(range(10)))
    back = Handoff.from_metadata(h.to_metadata(), 512)
    assert back == Handoff("req", 17, -1.5, "ab", h.sampling, 1, 40, 0, tuple(range(2, 10)))  # last 8 ids kept
    with pytest.raises(DataLoss):
        Handoff.from_metadata({}, 512)
    with pytest.raises(DataLoss):
        Handoff.from_metadata({"qwenpd.handoff": "{not json"}, 512)
    with pytest.raises(DataLoss):
        Handoff.from_metadata(h.to_metadata(), 10)  # first token outside this vocabulary


def test_handoff_records_from_random_metadata_are_accepted_or_data_loss():
    """A hand-off record is checked like the checkpoint bytes: anything malformed is DataLoss, never a crash."""
    from google.protobuf import json_format
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from qwenpd.errors import DataLoss
    from qwenpd.handoff import HANDOFF_KEY, MAX_DRAWS, Handoff
    from qwenpd.protos.qwenpd.v1 import common_pb2

    u32 = st.integers(0, 2**32 - 1)
    records = st.builds(
        lambda tok, draws, tail, pending, unread, temp, top_p, seed, max_tokens: json_format.MessageToJson(
            common_pb2.Handoff(first_token=common_pb2.Token(id=tok), sampler_draws=draws, prompt_tail_ids=tail,
                               pending_text=pending, detok_unread=unread,
                               sampling=common_pb2.SamplingParams(temperature=temp, top_p=top_p, seed=seed,
                                                                  max_tokens=max_tokens))),
        u32, u32, st.lists(u32, max_size=12), st.text(max_size=8), u32, st.floats(), st.floats(),
        st.integers(0, 2**64 - 1), u32)

    @settings(max_examples=200, deadline=None)
    @given(records | st.text(max_size=60))
    def check(raw: str) -> None:
        try:
            h = Handoff.from_metadata({HANDOFF_KEY: raw}, vocab_size=1000)
        except DataLoss:
            return
        assert h.first_token < 1000 and h.sampling.seed is not None and h.detok_unread <= len(h.prompt_tail_ids)
        assert 1 <= h.sampler_draws <= MAX_DRAWS  # decode replays them: never an endless loop

    check()


def test_penalties_and_the_generated_ids_cross_the_hand_off():
    params = SamplingParams(seed=3, max_tokens=9, presence_penalty=0.5, frequency_penalty=-1.0, min_tokens=2,
                            min_p=0.1, logit_bias=((4, 2.0),))
    h = Handoff(request_id="r", first_token=17, first_logprob=-1.0, first_text="", sampling=params, sampler_draws=4,
                prompt_tokens=40, cached_tokens=0, prompt_tail_ids=(1, 2), generated_ids=(5, 6, 7))
    back = Handoff.from_metadata(h.to_metadata(), 512)
    assert back.sampling == params and back.generated_ids == (5, 6, 7)
    with pytest.raises(DataLoss):  # more generated ids than the sampler has drawn
        Handoff.from_metadata(dataclasses.replace(h, sampler_draws=3).to_metadata(), 512)
