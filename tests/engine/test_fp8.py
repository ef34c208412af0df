"""Fine-grained FP8 checkpoints (issue 27, item 1): a projection stored as float8_e4m3fn with one fp32 scale per
128x128 block (`weight_scale_inv`, ragged edge blocks included) is dequantized at load, so the engine computes
exactly what it computes on the dequantized weights; a quantization it does not implement is refused, never
served."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenpd.engine.engine import Engine
from qwenpd.engine.weight_layout import WeightError

BLOCK = (128, 128)


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published format's recipe: scale = block amax / 448, q = W / scale in float8_e4m3fn."""
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK[0]), -(-cols // BLOCK[1])
    scale = torch.empty(sr, sc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(sr):
        for j in range(sc):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s = max(float(blk.abs().max()) / 448.0, 1e-12)
            scale[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """(FP8 checkpoint, the same weights dequantized in fp32) made from the tiny model."""
    root = tmp_path_factory.mktemp("fp8")
    fp8, deq = root / "fp8", root / "dequantized"
    for d in (fp8, deq):
        shutil.copytree(tiny_model_dir, d)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, t in weights.items():
        if name.endswith("proj.weight") and t.ndim == 2:  # every projection, as the published checkpoints
            q, scale = _quantize(t)
            quantized[name], quantized[name[: -len(".weight")] + ".weight_scale_inv"] = q, scale
            full = scale.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            dequantized[name] = q.float() * full
        else:
            quantized[name] = dequantized[name] = t
    save_file(quantized, str(fp8 / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(deq / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic", "modules_to_not_convert": ["lm_head"]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    return fp8, deq, cfg


def test_fp8_checkpoint_computes_what_its_dequantized_weights_compute(checkpoints):
    fp8, deq, _ = checkpoints
    ids = list(range(3, 40))
    a, b = Engine(fp8, dtype="float32"), Engine(deq, dtype="float32")
    assert torch.equal(a.forward_all(ids), b.forward_all(ids))
    assert a.fingerprint != b.fingerprint  # a hand-off between them is refused like any other model's


def test_fp8_at_tp2_equals_tp1(checkpoints):
    fp8, _, _ = checkpoints
    ids = list(range(5, 30))
    one = Engine(fp8, dtype="float32").forward_all(ids)
    two = Engine(fp8, dtype="float32", tp=2)
    try:
        assert (two.forward_all(ids) - one).abs().max() < 1e-4
    finally:
        two.close()


@pytest.mark.parametrize("change,match", [
    (lambda cfg, w: cfg["quantization_config"].update(quant_method="gptq"), "quant_method 'gptq'"),
    (lambda cfg, w: cfg["quantization_config"].update(fmt="e5m2"), "fmt 'e5m2'"),
    (lambda cfg, w: cfg["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
    (lambda cfg, w: cfg.pop("quantization_config"), "no quantization_config"),
    (lambda cfg, w: w.pop(next(k for k in w if k.endswith("weight_scale_inv"))), "without its"),
    (lambda cfg, w: w.update({k: v[:1] for k, v in w.items() if k.endswith("weight_scale_inv")}), "block scales"),
], ids=["method", "fmt", "block", "no-config", "missing-scale", "misshaped-scale"])
def test_what_is_not_implemented_is_refused_at_load(checkpoints, tmp_path, change, match):
    fp8, _, cfg = checkpoints
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    cfg = json.loads(json.dumps(cfg))
    weights = load_file(str(fp8 / "model.safetensors"))
    change(cfg, weights)
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(bad / "model.safetensors"))
    with pytest.raises(WeightError, match=match):
        Engine(bad, dtype="float32")


# ---- --quantize at load (issue 27, item 3) ------------------------------------------------------------------------
def test_the_fp8_recipe_is_the_reference_loop():
    """fp8_quantize (vectorised) gives the reference loop's FP8 values and block scales, ragged edges included."""
    from qwenpd.engine.weights import fp8_quantize

    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0)) * 0.05
    q, scale = fp8_quantize(w)
    q_ref, scale_ref = _quantize(w)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def _fp8_checkpoint(tiny_model_dir, out, mode: str):
    """The tiny checkpoint with exactly the weights `--quantize mode` quantizes stored in the FP8 format."""
    from qwenpd.engine.weights import fp8_quantize, quantized_names

    shutil.copytree(tiny_model_dir, out)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    chosen = {"model." + n for n in quantized_names([k[len("model."):] for k in weights if k.startswith("model.")],
                                                    mode)}
    stored = {}
    for name, t in weights.items():
        if name in chosen:
            stored[name], stored[name[: -len(".weight")] + ".weight_scale_inv"] = fp8_quantize(t)
        else:
            stored[name] = t
    save_file(stored, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, chosen


@pytest.mark.parametrize("mode", ["fp8", "fp8-mlp"])
def test_quantize_at_load_computes_what_the_fp8_checkpoint_computes(tiny_model_dir, tmp_path, mode):
    """A checkpoint quantized at load computes, bit for bit, what the FP8 checkpoint of the same weights computes
    (fp8: every decoder projection; fp8-mlp: the MLP's only); the fingerprint tells each apart from plain."""
    ckpt, chosen = _fp8_checkpoint(tiny_model_dir, tmp_path / "ckpt", mode)
    assert chosen and (mode == "fp8" or all(".mlp." in n for n in chosen))
    ids = list(range(3, 60))
    plain = Engine(tiny_model_dir, dtype="float32")
    at_load = Engine(tiny_model_dir, dtype="float32", quantize=mode)
    stored = Engine(ckpt, dtype="float32")
    assert torch.equal(at_load.forward_all(ids), stored.forward_all(ids))
    assert not torch.equal(at_load.forward_all(ids), plain.forward_all(ids))
    assert len({plain.fingerprint, at_load.fingerprint}) == 2


def test_int8_and_tp2(tiny_model_dir):
    """int8 (per output channel) stays close to the plain model; fp8 at TP 2 (every shard boundary cuts the one
    128x128 block of tiny's projections) equals TP 1."""
    ids = list(range(5, 40))
    plain = torch.log_softmax(Engine(tiny_model_dir, dtype="float32").forward_all(ids), -1)
    int8 = torch.log_softmax(Engine(tiny_model_dir, dtype="float32", quantize="int8").forward_all(ids), -1)
    kl = (plain.exp() * (plain - int8)).sum(-1).mean()
    assert 0 < kl < 0.01
    one = Engine(tiny_model_dir, dtype="float32", quantize="fp8").forward_all(ids)
    two = Engine(tiny_model_dir, dtype="float32", quantize="fp8", tp=2)
    try:
        assert (two.forward_all(ids) - one).abs().max() < 1e-4
    finally:
        two.close()
