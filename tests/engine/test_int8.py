"""Weight-only int8 (`--quantize int8`, issue 27): the weights stay int8 in memory with one scale per output row;
decode-step rows multiply by our int8 kernel (kernels/int8_matmul) or, on a CPU without it, aten's, prefill rows
by the int8 values in the model dtype. Either way a row computes sum_k x[k] q[n, k] in fp32 times scale[n]
(checked against that sum in float64), and its bits do not depend on the rows beside it: decode stays batch
invariant and speculation stays plain decoding."""

from __future__ import annotations

import pytest
import torch

from qwenpd.engine import Engine
from qwenpd.engine.engine_config import EngineConfig
from qwenpd.engine.generate import generate, generate_speculative
from qwenpd.engine.linear import Int8Weight, Linear, cat, held_bytes
from qwenpd.engine.sampling import SamplingParams
from qwenpd.engine.weights import int8_quantize
from tests.engine.test_batch_invariance import _check
from tests.engine.test_speculative import _head, _oracle_drafts

SHAPES = [(384, 256), (160, 64), (3088, 1024), (1000, 3000)]  # tiny's, small's and odd ones


def _weight(shape, dtype, seed=0) -> Int8Weight:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) / 16
    q, scale = int8_quantize(w, dtype)
    return Int8Weight(q, scale.to(dtype))


# a decode step's rows on each kernel (ours: kernels/amx_linear's tiles where the CPU has AMX, kernels/int8_matmul's
# AVX512-BF16 dot products), prefill rows
STEPS = ["qwenpd-step", "avx512-step", "aten-step", "prefill"]
# fp32 decode-step rows take the converted path whichever kernel is there: "qwenpd-step" covers them
PATHS = [pytest.param(dtype, path, id=f"{name}-{path}")
         for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"))
         for path in STEPS if not (dtype == torch.float32 and path in ("aten-step", "avx512-step"))]


def _step(path: str, monkeypatch, dtype: torch.dtype) -> bool:
    """The `step` argument for a path; "aten-step" hides our kernel (as on a CPU without AVX512-BF16/VBMI)."""
    from qwenpd.engine import linear
    from qwenpd.kernels import int8_matmul

    if path in ("qwenpd-step", "avx512-step") and not int8_matmul.available():
        pytest.skip("no int8 CPU kernel here: decode steps take aten's")
    if path in ("avx512-step", "aten-step"):  # not the AMX kernel, where it would run
        monkeypatch.setattr(linear, "amx_linear_available", lambda: False)
    if path == "aten-step":
        monkeypatch.setattr(linear, "int8_matmul_available", lambda: False)
    return path != "prefill"


def _exact(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The same sum in float64, from the inputs rounded as the kernels read them."""
    return (x.to(w.scale.dtype).double() @ w.q.double().T) * w.scale.double()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("dtype", "path"), PATHS)
def test_int8_linear_is_the_scaled_integer_sum(dtype, shape, path, monkeypatch):
    step = _step(path, monkeypatch, dtype)
    w = _weight(shape, dtype)
    lin = Linear(w)
    x = torch.randn(37, shape[1], generator=torch.Generator().manual_seed(1))
    got = lin(x, step=step)
    assert got.dtype == dtype and got.shape == (37, shape[0])
    exact = _exact(x, w)
    # one rounding to the model dtype (2^-8 relative for bf16), plus fp32 sums (the prefill path's bf16 matmul
    # also rounds once before the scale)
    tol = (2.0 ** -7 if dtype == torch.bfloat16 else 1e-5) * exact.abs().amax(dim=1, keepdim=True)
    assert ((got.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("dtype", "path"), PATHS)
def test_an_int8_row_is_the_same_bits_among_any_rows(dtype, shape, path, monkeypatch):
    step = _step(path, monkeypatch, dtype)
    lin = Linear(_weight(shape, dtype))
    x = torch.randn(70, shape[1], generator=torch.Generator().manual_seed(2))
    every = lin(x, step=step)
    for n in (1, 2, 3, 5, 8, 16, 33):
        assert torch.equal(lin(x[:n], step=step), every[:n]), f"{n} rows"
        assert torch.equal(lin(x[-n:], step=step), every[-n:]), f"last {n} rows"


def test_prefill_rows_convert_the_weight_in_blocks_to_the_same_bits(monkeypatch):
    """The converted path takes CONVERTED_BYTES of weight rows at a time (a ragged last block here): the same bits
    as one block, and a row's bits still independent of the rows beside it."""
    from qwenpd.engine import linear

    lin = Linear(_weight((1000, 256), torch.bfloat16))
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(3))
    whole = lin(x)
    monkeypatch.setattr(linear, "CONVERTED_BYTES", 96 * 256 * 2)  # 96 rows a block: 10 of 96 and one of 40
    assert torch.equal(lin(x), whole)
    assert all(torch.equal(lin(x[:n]), whole[:n]) for n in (1, 2, 7))


def test_int8_linear_compiles_to_the_same_bits():
    lin = Linear(_weight((384, 256), torch.bfloat16))
    x = torch.randn(6, 256)
    for step in (True, False):
        compiled = torch.compile(lambda t, s=step: lin(t, step=s), fullgraph=True, dynamic=False)
        assert torch.equal(compiled(x), lin(x, step=step))
    torch._dynamo.reset()


def test_int8_weight_slices_and_fuses_with_its_scales():
    w = _weight((96, 40), torch.bfloat16)
    rows, cols = w[(slice(10, 30),)], w[(slice(None), slice(8, 24))]
    assert torch.equal(rows.q, w.q[10:30]) and torch.equal(rows.scale, w.scale[10:30])
    assert torch.equal(cols.q, w.q[:, 8:24]) and torch.equal(cols.scale, w.scale)  # a row keeps its scale
    fused = cat([rows, w])
    assert fused.shape == (116, 40) and torch.equal(fused.scale[20:], w.scale)
    assert held_bytes(w) == 96 * 40 + 96 * 2
    with pytest.raises(TypeError):
        cat([w, torch.zeros(3, 40)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_decode_is_batch_invariant(tiny_model_dir, dtype):
    _check(Engine(tiny_model_dir, dtype=dtype, quantize="int8"))


def test_compiled_int8_decode_is_batch_invariant(tiny_model_dir):
    """Compiled decode graphs call the same int8 kernels (qwenpd::int8_linear) at every batch bucket."""
    engine = Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", kv_cache_bytes=64 << 20)
    try:
        engine.compile(engine.default_buckets(64, 8, max_context=2048), max_batch=8, graphs=("decode",))
        _check(engine)
    finally:  # dynamo counts compilations per code object across engines: leave none for the next test's limit
        torch._dynamo.reset()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_int8_holds_int8_weights(tiny_model_dir, hf_checkpoint, tied):
    """weight_bytes: every quantized projection at one byte a weight plus a bf16 scale a row, the rest as bf16; a
    tied lm_head is an int8 copy of the embedding beside it."""
    model_dir = hf_checkpoint("conv5_tied") if tied else tiny_model_dir
    plain = Engine(model_dir, dtype="bfloat16", warm_up=False)
    int8 = Engine(model_dir, dtype="bfloat16", quantize="int8", warm_up=False)
    c = plain.config
    assert c.tie_word_embeddings == tied
    h = c.hidden_size
    linear = (c.conv_dim + c.linear_value_dim + 2 * c.linear_num_value_heads, h), (h, c.linear_value_dim)
    attention = ((2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, h), \
        (h, c.num_attention_heads * c.head_dim)
    mlp = (2 * c.intermediate_size, h), (h, c.intermediate_size)  # gate|up, down
    shapes = len(c.linear_layers) * list(linear) + len(c.attention_layers) * list(attention) \
        + c.num_hidden_layers * list(mlp)
    weights, rows = sum(r * k for r, k in shapes), sum(r for r, _ in shapes)
    head_weights, head_rows = c.vocab_size * h, c.vocab_size
    if tied:  # the decoder at 2 -> 1 byte plus scales; the int8 lm_head added
        assert plain.weight_bytes - int8.weight_bytes == weights - 2 * rows - (head_weights + 2 * head_rows)
    else:
        assert plain.weight_bytes - int8.weight_bytes == weights + head_weights - 2 * (rows + head_rows)
    assert all(isinstance(blk.mlp.down.int8, Int8Weight) for blk in int8.model.blocks)
    from qwenpd.kernels import int8_matmul
    from qwenpd.engine import linear
    from qwenpd.kernels import amx_linear
    want = "qwenpd-amx" if linear.cpu_has_amx() and amx_linear.available() else \
        "qwenpd" if int8_matmul.available() else "aten"
    assert int8.int8_kernel == want and plain.int8_kernel is None
    assert isinstance(int8.model.lm_head.int8, Int8Weight)


@pytest.mark.parametrize("rollback", ["replay", "snapshot"])
def test_int8_speculation_is_plain_int8_decoding(tiny_model_dir, monkeypatch, rollback):
    """A verify pass multiplies its rows by the decode step's int8 kernel: tokens and log-probabilities are plain
    int8 decoding's, whatever the drafts."""
    engine = Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", speculative=True)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    prompt = [5 + (i * 37) % 400 for i in range(50)]
    ref = generate(engine, prompt, params)
    head = _head(engine, tiny_model_dir)
    _oracle_drafts(monkeypatch, prompt + ref.token_ids)
    got = generate_speculative(engine, head, prompt, params, 3, rollback=rollback)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs)
    assert 0 < got.accepted_tokens < got.draft_tokens


def test_an_int8_engine_drafts_with_an_int8_head(tiny_model_dir):
    """--quantize int8 takes the MTP head too (its projections and its own lm_head rows): a head pass reads the
    int8 weights, its logits stay near the bf16 head's, and the tokens stay plain int8 decoding's."""
    from qwenpd.engine.mtp import MTPCache, load_head

    engine = Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", speculative=True)
    head = engine.draft_head
    assert isinstance(head.fc.int8, Int8Weight)
    assert all(isinstance(blk.mlp.down.int8, Int8Weight) and isinstance(blk.mixer.o_proj.int8, Int8Weight)
               for blk in head.layers)
    assert head.draft_head is None or isinstance(head.draft_head.int8, Int8Weight)
    bf16 = _head(engine, tiny_model_dir)
    assert bf16.fc.int8 is None
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(5, engine.config.hidden_size, generator=g).bfloat16()
    tokens, positions = torch.tensor([7, 90, 4, 300, 12]), torch.arange(5)
    for rows in (hidden[:1], hidden):  # a drafting pass (int8 kernel) and a catch-up's rows
        n = rows.shape[0]
        _, ours = head.forward(rows, tokens[:n], positions[:n], MTPCache.new(engine.kv_cache, n))
        _, want = bf16.forward(rows, tokens[:n], positions[:n], MTPCache.new(engine.kv_cache, n))
        assert (ours - want).abs().max() < 0.05 * want.abs().max()
        assert (ours.argmax(-1) == want.argmax(-1)).float().mean() >= 0.6
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = [5 + (i * 53) % 400 for i in range(40)]
    got = generate_speculative(engine, head, prompt, params, 3)
    assert got.token_ids == generate(engine, prompt, params).token_ids and got.draft_tokens > 0
    # fp32 has no decode-step int8 kernel (its int8 weights are converted at every call): the head stays fp32
    assert load_head(Engine(tiny_model_dir, dtype="float32", quantize="int8"), tiny_model_dir).fc.int8 is None


def test_draft_quantize_gives_a_bf16_model_an_int8_head(tiny_model_dir):
    """--draft-quantize int8 quantizes the head alone: its projections and its own lm_head rows are int8, the
    model's weights stay bf16, and the tokens stay plain bf16 decoding's (drafts only decide how many a verify
    pass accepts). Without an int8 decode-step kernel (fp32) it is refused, not run slower."""
    from qwenpd.engine.mtp import load_head
    from qwenpd.model_service import ModelServiceConfig

    engine = Engine(tiny_model_dir, dtype="bfloat16", draft_quantize="int8", speculative=True)
    plain = Engine(tiny_model_dir, dtype="bfloat16")
    assert engine.fingerprint == plain.fingerprint and engine.model.lm_head.int8 is None
    head = engine.draft_head
    assert isinstance(head.fc.int8, Int8Weight) and isinstance(head.draft_head.int8, Int8Weight)
    assert all(isinstance(blk.mlp.down.int8, Int8Weight) for blk in head.layers)
    assert head.weight_bytes < load_head(plain, tiny_model_dir).weight_bytes  # with its own int8 lm_head rows
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = [5 + (i * 53) % 400 for i in range(40)]
    got = generate_speculative(engine, head, prompt, params, 3)
    ref = generate(plain, prompt, params)
    assert (got.token_ids, got.logprobs) == (ref.token_ids, ref.logprobs) and got.draft_tokens > 0
    with pytest.raises(ValueError, match="--draft-quantize int8: no int8 kernel"):
        Engine(tiny_model_dir, dtype="float32", draft_quantize="int8", speculative=True)
    with pytest.raises(ValueError, match="draft_quantize must be one of"):
        Engine(tiny_model_dir, draft_quantize="fp8")
    config = EngineConfig(str(tiny_model_dir), draft_quantize="int8")
    with pytest.raises(ValueError, match="only with --num-speculative-tokens"):
        ModelServiceConfig(engine=config, cache="127.0.0.1:5")
    assert ModelServiceConfig(engine=config, cache="127.0.0.1:5", num_speculative_tokens=2).engine.draft_quantize


def test_draft_quantize_at_tp2_with_tied_embeddings(hf_checkpoint, tmp_path):
    """A tensor-parallel leader's head over tied embeddings: its lm_head rows are its whole embedding
    (load_mtp_weights' own_vocab); --draft-quantize gives them an int8 copy and keeps the embedding for lookups,
    and the tokens stay plain decoding's at TP 2."""
    from qwenpd.engine.mtp import MTPHead
    from qwenpd.engine.weights import DRAFT_EMBED, DRAFT_HEAD, load_mtp_weights
    from tests.hf_models import with_mtp_head

    path = with_mtp_head(hf_checkpoint("conv5_tied"), tmp_path / "ckpt")
    eng = Engine(path, dtype="bfloat16", tp=2, threads=1, draft_quantize="int8", speculative=True)
    try:
        head = eng.draft_head
        assert isinstance(head.draft_head.int8, Int8Weight) and head.embed.dtype == torch.bfloat16
        weights = load_mtp_weights(path, eng.config, eng.dtype, own_vocab=True)
        assert weights[DRAFT_HEAD] is weights[DRAFT_EMBED]  # tied: one tensor, counted once
        plain = MTPHead(eng.config, weights, eng.model)
        assert plain.weight_bytes == sum(held_bytes(t) for name, t in weights.items() if name != DRAFT_HEAD)
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        prompt = [3 + (i * 37) % 200 for i in range(50)]
        got = generate_speculative(eng, head, prompt, params, 3, chunk_size=32)
        assert got.token_ids == generate(eng, prompt, params, chunk_size=32).token_ids and got.draft_tokens > 0
    finally:
        eng.close()


def test_int8_at_tp2_stays_with_tp1(tiny_model_dir):
    """TP 2 shards the int8 rows with their scales (column-parallel) and keeps every row's scale where it cuts the
    columns (row-parallel): its logits differ from TP 1's by fp32 summation order only."""
    ids = list(range(5, 40))
    one = Engine(tiny_model_dir, dtype="float32", quantize="int8").forward_all(ids)
    two = Engine(tiny_model_dir, dtype="float32", quantize="int8", tp=2)
    try:
        assert (two.forward_all(ids) - one).abs().max() < 1e-4
        assert two.weight_bytes < Engine(tiny_model_dir, dtype="float32", tp=1, warm_up=False).weight_bytes / 2
    finally:
        two.close()


def test_the_int8_kernel_joins_the_fingerprint(tiny_model_dir, monkeypatch):
    """Our kernel and aten's give other bits: a prefill and a decode that took different ones must refuse each
    other's hand-offs, as they do for another dtype or quantization."""
    from qwenpd.engine import engine as engine_module

    ours = Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", warm_up=False)
    monkeypatch.setattr(engine_module, "int8_step_kernel", lambda x: "aten")
    atens = Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", warm_up=False)
    assert atens.int8_kernel == "aten"
    assert (ours.fingerprint != atens.fingerprint) == (ours.int8_kernel != "aten")
    assert Engine(tiny_model_dir, dtype="bfloat16", quantize="int8", warm_up=False).fingerprint == atens.fingerprint
