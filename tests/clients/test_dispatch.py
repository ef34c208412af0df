"""Request traces of the client's dispatch without processes: the time per output token when tokens share
chunks."""

from __future__ import annotations

import pytest

from qwenpd.clients.dispatch import Trace


def test_tpot_counts_tokens_not_chunks():
    """10 tokens: the first known at t=1.0 (prefill's answer), the other 9 arriving in one coalesced chunk at 1.9:
    9 intervals in 0.9 s = 0.1 s per token, not 0 (what timing chunk arrivals would say)."""
    t = Trace(started=0.5)
    t.first_token_at = 1.0
    t.received(1, at=1.0)
    t.received(9, at=1.9)
    assert t.ttft_s == pytest.approx(0.5)
    assert t.decode_s == pytest.approx(0.9)
    assert t.tpot_s == pytest.approx(0.1)
    one = Trace(started=0.0)
    one.first_token_at = 1.0
    one.received(1, at=1.0)
    assert one.tpot_s == 0.0


def test_resume_request_of_a_token_id_prompt_sends_the_prompt_once():
    """The resumed request is prompt + generated as token ids, whatever form the prompt had: a token-id prompt's
    ids were once appended to (prompt + prompt + generated: another sequence, continued wrongly)."""
    from qwenpd.clients.dispatch import resume_request
    from qwenpd.protos.qwenpd.v1 import prefill_pb2

    for original in (prefill_pb2.PrefillRequest(token_ids=prefill_pb2.TokenIds(ids=[5, 6, 7])),
                     prefill_pb2.PrefillRequest(text="five six seven")):
        resumed = resume_request(original, [5, 6, 7, 9, 9], 2, "ckpt-1")
        assert list(resumed.token_ids.ids) == [5, 6, 7, 9, 9] and resumed.WhichOneof("prompt") == "token_ids"
        assert resumed.resume_generated == 2 and resumed.resume_checkpoint_id == "ckpt-1"


def test_a_stream_that_breaks_after_its_last_chunk_is_not_resumed():
    """A decode call that fails (UNAVAILABLE: a lost connection, or cancelled as its instance stopped answering)
    after it sent the chunk with the finish reason, before its status: the stream is whole, so nothing is
    re-prefilled and nothing more is sent (a resume would have decoded past the stop)."""
    import asyncio

    from qwenpd.clients.dispatch import Chunk, Dispatcher
    from qwenpd.clients.routing import BackendPool
    from qwenpd.errors import Unavailable
    from qwenpd.protos.qwenpd.v1 import prefill_pb2

    d = Dispatcher(BackendPool(["127.0.0.1:1"], "prefill"), BackendPool(["127.0.0.1:2"], "decode"),
                   lambda address: None, poll_load=False)
    prefills = []

    async def prefill(request, timeout):
        prefills.append(request)
        return prefill_pb2.PrefillResponse(checkpoint_id="c", prompt_token_ids=[1, 2, 3], prompt_tokens=3)

    async def decode(pre, timeout, trace):
        yield Chunk([7], "a", [-0.1])
        yield Chunk([8], "b", [-0.2], finish_reason="stop")
        raise Unavailable("decode 127.0.0.1:2 stopped answering")

    d.prefill, d.decode = prefill, decode

    async def main():
        return [c async for c in d.run(Trace(started=0.0), prefill_pb2.PrefillRequest(text="x"), 5.0)]

    chunks = asyncio.run(main())
    assert [c.token_ids for c in chunks] == [[7], [8]] and chunks[-1].finish_reason == "stop"
    assert len(prefills) == 1 and d.resumed == 0
