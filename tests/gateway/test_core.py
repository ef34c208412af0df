"""The gateway's core without processes: per-token texts of a choice collected from coalesced chunks."""

from __future__ import annotations

from qwenpd.clients.dispatch import Chunk
from qwenpd.gateway.core import Choice, collect, token_texts


def test_token_texts_concatenate_to_the_output():
    c = Choice(0)
    for chunk in (Chunk([1], "He", [-0.1]), Chunk([2, 3], "llo", [-0.2, -0.3]), Chunk([], " w", []),
                  Chunk([4], "orld", [-0.4], "stop")):
        collect(c, chunk)
    assert "".join(c.token_texts) == "".join(c.text) == "Hello world"
    assert len(c.token_texts) == len(c.token_ids) == 4 and c.finish_reason == "stop"
    assert token_texts([], "x") == []
