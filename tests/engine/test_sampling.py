"""Sampling and output tracking: greedy, temperature/top-k/top-p, seeds, stop conditions."""

from __future__ import annotations

import pytest
import torch

from qwenpd.engine.output import OutputTracker
from qwenpd.engine.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    tok, lp = Sampler(SamplingParams(temperature=0)).sample(logits)
    assert tok == 1 and lp == pytest.approx(float(torch.log_softmax(logits, -1)[1]))


@pytest.mark.parametrize("temperature", [1e-37, 1e-40, 5e-324])
def test_a_vanishing_temperature_is_its_limit_greedy(temperature):
    """logits / T overflows to infinity for a tiny T (the proto takes any T >= 0): the sample is T -> 0's limit, the
    most likely token (ties alike), never a token picked from NaNs; so for a repetition penalty so small that the
    seen tokens' logits overflow (the most likely of them)."""
    logits = torch.randn(512, generator=torch.Generator().manual_seed(2)) * 4
    best = int(logits.argmax())
    for seed in range(5):
        assert Sampler(SamplingParams(temperature=temperature, seed=seed)).sample(logits)[0] == best
    tied = logits.clone()
    tied[7] = tied[best]
    assert {Sampler(SamplingParams(temperature=1e-40, seed=s)).sample(tied)[0] for s in range(40)} == {7, best}
    seen = [3, 11, 200]
    logits[seen] = torch.tensor([1.0, 2.0, -1.0])
    params = SamplingParams(temperature=1.0, seed=1, repetition_penalty=1e-40)
    assert Sampler.resumed(params, 0, prompt=seen).sample(logits)[0] in (3, 11)


def test_seed_reproducible_and_distinct():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=1234)
    a = [Sampler(p).sample(logits)[0] for _ in range(3)]
    s1, s2 = Sampler(p), Sampler(SamplingParams(temperature=1.0, seed=99))
    seq1 = [s1.sample(logits)[0] for _ in range(30)]
    seq2 = [s2.sample(logits)[0] for _ in range(30)]
    assert len(set(a)) == 1 and seq1 != seq2


def test_resumed_sampler_continues_the_same_stream():
    logits = torch.randn(20, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.8, seed=7)
    whole = Sampler(p)
    seq = [whole.sample(logits)[0] for _ in range(10)]
    resumed = Sampler.resumed(p, 4)
    assert [resumed.sample(logits)[0] for _ in range(6)] == seq[4:]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0])
    k2 = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {k2.sample(logits)[0] for _ in range(200)} <= {0, 1}
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {p.sample(logits)[0] for _ in range(200)} == {0}  # token 0 alone has > 50% of the mass


def test_temperature_frequencies_follow_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0])
    s = Sampler(SamplingParams(temperature=2.0, seed=3))
    counts = torch.bincount(torch.tensor([s.sample(logits)[0] for _ in range(4000)]), minlength=3).float()
    expected = torch.softmax(logits / 2.0, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.03)


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 0.0),
                                         ("top_p", 1.5), ("top_k", -1), ("max_tokens", 0), ("seed", -5)])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_tracker_eos_stop_ids_and_length():
    t = OutputTracker(SamplingParams(max_tokens=5), frozenset({9}))
    assert [t.push(x) for x in (1, 2)] == ["", ""] and t.finish_reason is None
    t.push(9)
    assert t.finish_reason == "stop" and t.token_ids == [1, 2, 9]
    t = OutputTracker(SamplingParams(max_tokens=5, ignore_eos=True), frozenset({9}))
    for x in (9, 9, 9, 9, 9):
        t.push(x)
    assert t.finish_reason == "length"
    t = OutputTracker(SamplingParams(max_tokens=5, stop_token_ids=(4,)), frozenset())
    t.push(4)
    assert t.finish_reason == "stop"


def test_tracker_stop_strings_hold_back_and_cut(tiny_model_dir):
    from qwenpd.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir)
    ids = tok.encode("Hello, world! How are you today?")
    t = OutputTracker(SamplingParams(max_tokens=100, stop=("How are",)), frozenset(), tok)
    streamed = "".join(t.push(i) for i in ids if t.finish_reason is None)
    assert t.finish_reason == "stop"
    assert streamed == t.text == "Hello, world! "


def test_incremental_detokenizer_matches_full_decode(tiny_model_dir):
    from qwenpd.engine.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(tiny_model_dir)
    text = "Grüße, 世界! qwenpd streams tokens — even multi-byte ones: ñ é 🙂."
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    out = "".join(d.push(i) for i in ids)
    assert out == text == tok.decode(ids)


def _byte_ids(tok) -> dict[bytes, int]:
    """The id of each single-byte token of a byte-level tokenizer, by its byte."""
    out: dict[bytes, int] = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if len(b) == 1:
            out.setdefault(b, i)
    return out


@pytest.mark.parametrize("ending", ["length", "eos", "stop_id", "finish", "stop_string_held"])
def test_tracker_flushes_an_incomplete_character_as_replacement_at_the_end(tiny_model_dir, ending):
    """A sequence that ends inside a multi-byte character (any finish reason) emits the bytes held back as U+FFFD,
    as a UTF-8 decoder with errors="replace" does: the streamed text is the decoded tokens, never shorter."""
    from qwenpd.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir)
    byte = _byte_ids(tok)
    ids = [*tok.encode("Hi "), byte["你".encode()[:1]], byte["你".encode()[1:2]]]  # "Hi " + 2 of 你's 3 bytes
    eos = 9999
    params = {"length": SamplingParams(max_tokens=len(ids)),
              "eos": SamplingParams(max_tokens=10), "stop_id": SamplingParams(max_tokens=10, stop_token_ids=(7,)),
              "finish": SamplingParams(max_tokens=10),
              "stop_string_held": SamplingParams(max_tokens=len(ids), stop=("\ufffdz",))}[ending]
    t = OutputTracker(params, frozenset({eos}), tok)
    pieces = [t.push(i) for i in ids]
    assert pieces[-1] == "\ufffd" if ending in ("length", "stop_string_held") else pieces[-2:] == ["", ""]
    if ending == "eos":
        pieces.append(t.push(eos))
    elif ending == "stop_id":
        pieces.append(t.push(7))
    elif ending == "finish":
        pieces.append(t.finish("length"))
    whole = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    assert whole == "Hi \ufffd" and "".join(pieces) == t.text == whole
    assert t.finish_reason == ("stop" if ending in ("eos", "stop_id") else "length")


def test_generate_ends_with_the_replacement_of_a_last_partial_character(engine):
    """The engine's own loop: greedy "Hello" on the tiny model gives one byte of a character (token 98, b"\xa2")
    first; stopping there (max_tokens 1) still emits it, as U+FFFD."""
    from qwenpd.engine.generate import generate

    result = generate(engine, engine.tokenizer.encode("Hello"), SamplingParams(temperature=0, max_tokens=1))
    assert result.token_ids == [98] and engine.tokenizer.token_bytes(98) == b"\xa2"
    assert result.text == "\ufffd" and result.finish_reason == "length"


def test_incremental_detokenizer_flush(tiny_model_dir):
    from qwenpd.engine.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(tiny_model_dir)
    byte = _byte_ids(tok)
    d = IncrementalDetokenizer(tok, tok.encode("Prompt"))
    assert d.flush() == ""  # nothing held back
    assert [d.push(i) for i in (byte[b"\xe4"], byte[b"\xbd"])] == ["", ""] and d.unread == 2
    assert d.flush() == "\ufffd" and d.unread == 0 and d.flush() == ""
    assert d.push(byte[b"a"]) == "a"  # later text decodes on its own


def test_chat_template(tiny_model_dir):
    from qwenpd.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]
    no_think = tok.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=False)
    assert no_think == text + "<think>\n\n</think>\n\n"


def test_logit_bias_and_min_p():
    """logit_bias moves the choice, greedy included (logprobs stay the model's); min_p drops the unlikely."""
    import torch

    from qwenpd.engine.sampling import Sampler, SamplingParams

    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])
    forced = Sampler(SamplingParams(temperature=0, logit_bias=((3, 100.0),), seed=1))
    token, logprob = forced.sample(logits)
    assert token == 3 and abs(logprob - float(torch.log_softmax(logits, -1)[3])) < 1e-6
    assert not forced.params.plain_greedy and SamplingParams(temperature=0).plain_greedy
    banned = Sampler(SamplingParams(temperature=1.0, logit_bias=((0, -100.0),), seed=2))
    assert all(banned.sample(logits)[0] != 0 for _ in range(50))
    kept = Sampler(SamplingParams(temperature=1.0, min_p=0.3, seed=3))  # p(1)/p(0) = 0.37 kept, p(2)/p(0) dropped
    assert {kept.sample(logits)[0] for _ in range(200)} <= {0, 1}
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, 200.0),))


def test_min_tokens_holds_back_the_ending_ids():
    import torch

    from qwenpd.engine.sampling import Sampler, SamplingParams

    logits = torch.tensor([0.0, 5.0, 1.0, 0.5])  # id 1 (EOS here) is the likeliest
    sampler = Sampler(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(2,)), frozenset({1}))
    assert [sampler.sample(logits)[0] for _ in range(4)] == [3, 3, 3, 1]  # neither EOS nor the stop id before 3
    resumed = Sampler.resumed(SamplingParams(temperature=0, min_tokens=3), 3, frozenset({1}))
    assert resumed.sample(logits)[0] == 1  # a resume after 3 tokens owes none


def test_presence_and_frequency_penalties_count_what_was_generated():
    """Penalties push a repeated token down; a sampler resumed with the tokens so far continues identically."""
    import torch

    from qwenpd.engine.sampling import Sampler, SamplingParams

    logits = torch.tensor([2.0, 1.5, 1.0, 0.0])
    params = SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.1)
    whole = Sampler(params)
    tokens = [whole.sample(logits)[0] for _ in range(8)]
    assert tokens[:4] == [0, 1, 0, 2] and set(tokens) == {0, 1, 2}  # a used token falls behind the next
    resumed = Sampler.resumed(params, 5, generated=tokens[:5])
    assert [resumed.sample(logits)[0] for _ in range(3)] == tokens[5:]
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)


def test_repetition_penalty_is_transformers_over_prompt_and_output():
    """The penalized logits are transformers' RepetitionPenaltyLogitsProcessor's over prompt + generated ids
    (the oracle), positive and negative logits alike; a resumed sampler given the prompt continues identically."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from qwenpd.engine.sampling import _repeated

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g) * 3
    prompt, generated = [5, 9, 9, 40], [1, 5, 63]
    ours = _repeated(logits, frozenset(prompt) | set(generated), 1.7)
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + generated]), logits[None].clone())[0]
    assert torch.equal(ours, ref)
    params = SamplingParams(temperature=0.8, seed=3, repetition_penalty=1.7)
    whole = Sampler.resumed(params, 0, prompt=prompt)
    tokens = [whole.sample(logits)[0] for _ in range(12)]
    assert len(set(tokens)) > 1  # the sampled tokens were penalized as they came
    resumed = Sampler.resumed(params, 6, generated=tokens[:6], prompt=sorted(set(prompt)))
    assert [resumed.sample(logits)[0] for _ in range(6)] == tokens[6:]
    greedy = Sampler.resumed(SamplingParams(temperature=0, repetition_penalty=100.0), 0, prompt=[int(logits.argmax())])
    assert greedy.sample(logits)[0] != int(logits.argmax()) or logits.max() <= 0
    for bad in (0.0, -1.0, float("nan"), 101.0):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)


def test_token_bytes_are_each_tokens_own(tiny_model_dir, tmp_path):
    """Byte-level BPE: a token's bytes come back through the byte alphabet, so pieces of one character are its
    bytes (spelled `bytes:\\xNN`), and the bytes of a text's tokens concatenate to the text. A byte-fallback
    tokenizer (`<0xNN>` pieces) gives those bytes."""
    from tokenizers import Tokenizer as HF, decoders, models

    from qwenpd.engine.tokenizer import Tokenizer
    from qwenpd.tokens import token_text

    tok = Tokenizer(tiny_model_dir)
    text = "héllo wörld — 日本 🙂 <|im_end|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    assert any(token_text(tok.token_bytes(i)).startswith("bytes:\\x") for i in ids)
    assert all("\ufffd" not in tok.token_text(i) for i in range(tok.vocab_size))
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁hi": 257}
    fallback = HF(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    fallback.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    (tmp_path / "tokenizer.json").write_text(fallback.to_str())
    bf = Tokenizer(tmp_path)
    assert bf.token_bytes(1 + 0xE6) == b"\xe6" and bf.token_text(1 + 0xE6) == "bytes:\\xe6"
    assert bf.token_bytes(257) == b" hi"
