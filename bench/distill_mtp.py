"""Train a checkpoint's MTP head on the model's own outputs, so speculative decoding can be measured on a CPU
without real weights (a random head's drafts are never accepted; a real checkpoint's head is trained by Qwen).

    python bench/distill_mtp.py [--preset small] [--dtype bfloat16] [--sequences 256] [--length 128] [--epochs 6]

1. Data: `--sequences` random 32-token prompts, each continued by the model itself for `--length` tokens (half
   greedily, half sampled at temperature 0.8: the text the head will be asked to draft), with qwenpd's engine.
2. Targets: one prefill of every whole sequence gives the model's final-normed hidden state at each position (what
   the head reads) and its next-token distribution there (soft targets, the 64 most likely tokens renormalised).
3. Training: the head (transformers' own Qwen3.5 decoder layer and RMSNorm modules, fc, the main model's embedding
   and lm_head frozen) learns, at each position t, the model's distribution at t+1 from (hidden[t], token[t+1]):
   cross-entropy against the soft targets, Adam, fixed seeds, fp32, whole sequences with causal attention.
4. The trained `mtp.*` tensors are written into a copy of the checkpoint (in its dtype), checked to load into
   qwenpd's MTPHead and to give the training module's logits; the copy is cached under --cache-dir by the
   checkpoint's fingerprint, so bench/spec_decode.py reuses it. Never shipped as a default: init-model's heads stay
   random.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenpd.engine import DecodeBatch, Engine  # noqa: E402
from qwenpd.engine.init_model import init_model  # noqa: E402
from qwenpd.engine.sampling import Sampler, SamplingParams  # noqa: E402

TOP = 64  # soft targets: the most likely tokens of each distribution, renormalised


def make_data(engine: Engine, sequences: int, length: int, seed: int) -> list[list[int]]:
    """Prompts continued by the model itself, in batches (greedy for even sequences, sampled for odd ones)."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.grammars.words if engine.grammars else engine.config.vocab_size
    out = []
    for start in range(0, sequences, 16):
        n = min(16, sequences - start)
        prompts = [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(n)]
        samplers = [Sampler.resumed(SamplingParams(temperature=0.0 if (start + i) % 2 == 0 else 0.8,
                                                   seed=seed + start + i, max_tokens=length + 1), 0,
                                    grammars=engine.grammars) for i in range(n)]
        batch = DecodeBatch(engine, n)
        states, tokens = [], []
        for p, s in zip(prompts, samplers):
            logits, st = engine.prefill(p)
            states.append(st)
            batch.add(st)
            tokens.append(s.sample(logits)[0])
        seqs = [p + [t] for p, t in zip(prompts, tokens)]
        for _ in range(length - 1):
            logits = batch.step(tokens)
            tokens = [s.sample(logits[i])[0] for i, s in enumerate(samplers)]
            for q, t in zip(seqs, tokens):
                q.append(t)
        for st in states:
            batch.remove(st)
            st.release()
        out += seqs
    return out


def targets(engine: Engine, seq: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final-normed hidden [T, H] fp32, top-TOP ids [T, TOP], their renormalised probabilities [T, TOP])."""
    state = engine.new_state()
    normed: list = []
    logits = engine.eager.prefill_chunk(seq, state, all_logits=True, normed=normed)
    state.release()
    top = torch.topk(logits.float(), TOP, dim=-1)
    return normed[0].float(), top.indices, torch.softmax(top.values, dim=-1)


class Head(torch.nn.Module):
    """The MTP head as trainable transformers modules (what tests/engine/test_mtp.py checks MTPHead against)."""

    def __init__(self, model_dir: Path):
        super().__init__()
        from transformers import Qwen3_5TextConfig
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m

        raw = json.loads((model_dir / "config.json").read_text())
        raw = raw.get("text_config", raw)
        cfg = Qwen3_5TextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
        cfg._attn_implementation = "sdpa"
        w = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        h = cfg.hidden_size
        self.norm_embedding = m.Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        self.norm_hidden = m.Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        self.norm = m.Qwen3_5RMSNorm(h, eps=cfg.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.layer = m.Qwen3_5DecoderLayer(cfg, layer_idx=cfg.layer_types.index("full_attention"))
        self.rotary = m.Qwen3_5TextRotaryEmbedding(cfg)
        self.load_mtp({k: v for k, v in w.items() if k.startswith("mtp.")})
        embed = w.get("model.embed_tokens.weight", w.get("model.language_model.embed_tokens.weight"))
        self.register_buffer("embed", embed)
        self.register_buffer("lm_head", w.get("lm_head.weight", embed))

    def load_mtp(self, w: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.norm_embedding.weight.copy_(w["mtp.pre_fc_norm_embedding.weight"])
            self.norm_hidden.weight.copy_(w["mtp.pre_fc_norm_hidden.weight"])
            self.norm.weight.copy_(w["mtp.norm.weight"])
            self.fc.weight.copy_(w["mtp.fc.weight"])
            self.layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in w.items()
                                        if k.startswith("mtp.layers.0.")})

    def mtp_tensors(self) -> dict[str, torch.Tensor]:
        out = {"mtp.pre_fc_norm_embedding.weight": self.norm_embedding.weight,
               "mtp.pre_fc_norm_hidden.weight": self.norm_hidden.weight, "mtp.norm.weight": self.norm.weight,
               "mtp.fc.weight": self.fc.weight}
        out.update({"mtp.layers.0." + k: v for k, v in self.layer.state_dict().items()})
        return {k: v.detach().clone() for k, v in out.items()}

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H], next_ids [B, T] -> logits [B, T, V]."""
        x = self.fc(torch.cat([self.norm_embedding(self.embed[next_ids]), self.norm_hidden(hidden)], dim=-1))
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        t = x.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        x = self.layer(x, position_embeddings=self.rotary(x, positions), attention_mask=mask, position_ids=positions)
        return self.norm(x) @ self.lm_head.T


def distill(model_dir: Path, out: Path, sequences: int = 256, length: int = 128, epochs: int = 6,
            dtype: str = "bfloat16", seed: int = 0, log=print) -> Path:
    torch.manual_seed(seed)
    engine = Engine(model_dir, dtype=dtype)
    t0 = time.perf_counter()
    seqs = make_data(engine, sequences, length, seed)
    data = [(torch.tensor(s), *targets(engine, s)) for s in seqs]
    log(f"data: {len(seqs)} sequences x {len(seqs[0])} tokens in {time.perf_counter() - t0:.0f} s")
    head = Head(model_dir)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    steps = epochs * len(data) // 4
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(data), generator=order).tolist()
        total, hits, count = 0.0, 0, 0
        for b in range(0, len(perm) - 3, 4):
            items = [data[i] for i in perm[b:b + 4]]
            ids = torch.stack([it[0] for it in items])  # [B, T]
            hidden = torch.stack([it[1] for it in items])
            top_ids = torch.stack([it[2] for it in items])
            top_p = torch.stack([it[3] for it in items])
            # position t reads (hidden[t], ids[t+1]) and learns the model's distribution at t+1
            logits = head(hidden[:, :-2], ids[:, 1:-1])
            logp = torch.log_softmax(logits, dim=-1)
            loss = -(top_p[:, 1:-1] * logp.gather(-1, top_ids[:, 1:-1])).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach()) * ids.shape[0]
            hits += int((logits.argmax(-1) == top_ids[:, 1:-1, 0]).sum())
            count += ids.shape[0] * (ids.shape[1] - 2)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / len(data):.3f}, draft = model's top token "
            f"{hits / count:.1%} of positions ({time.perf_counter() - t0:.0f} s)")
    # write the trained head into a copy of the checkpoint, in its stored dtype
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    path = tmp / "model.safetensors"
    tensors = load_file(str(path))
    stored = tensors["mtp.fc.weight"].dtype
    tensors.update({k: v.to(stored).contiguous() for k, v in head.mtp_tensors().items()})
    save_file(tensors, str(path), metadata={"format": "pt"})
    _check(tmp, head, dtype)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _check(model_dir: Path, head: Head, dtype: str) -> None:
    """qwenpd's MTPHead on the written checkpoint gives the training module's logits (fp32 load, same tensors)."""
    from qwenpd.engine.mtp import MTPCache, MTPHead
    from qwenpd.engine.weights import load_mtp_weights

    eng = Engine(model_dir, dtype="float32", speculative=True)  # (its KV cache holds the head's layers)
    ours = MTPHead(eng.config, load_mtp_weights(model_dir, eng.config, torch.float32), eng.model)
    ref = Head(model_dir)  # reloads the tensors as written (rounded to the stored dtype)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 16, eng.config.hidden_size, generator=g)
    ids = torch.randint(0, eng.config.vocab_size, (1, 16), generator=g)
    with torch.no_grad():
        want = ref(hidden, ids)[0]
    _, got = ours.forward(hidden[0], ids[0], torch.arange(16), MTPCache.new(eng.kv_cache, 16))
    err = float((got - want).abs().max())
    if err > 1e-3 * max(1.0, float(want.abs().max())):
        raise RuntimeError(f"the written head does not load as trained (max logit error {err:.2e})")


def cached(preset: str, dtype: str, cache_dir: Path, log=print, sequences: int = 256, length: int = 128,
           epochs: int = 6) -> Path:
    """The distilled copy of init-model's `preset` checkpoint (made on first use; keyed by every input)."""
    kw = dict(sequences=sequences, length=length, epochs=epochs)
    key = hashlib.sha256(json.dumps({"preset": preset, "dtype": dtype, "version": 1, **kw},
                                    sort_keys=True).encode()).hexdigest()
    out = cache_dir / f"{preset}-{dtype}-{key[:12]}"
    if (out / "config.json").is_file():
        return out
    base = cache_dir / f"{preset}-{dtype}-base"
    if not (base / "config.json").is_file():
        init_model(base, preset, seed=0, dtype=dtype)
    log(f"distilling the MTP head of {preset} ({dtype}) into {out} ...")
    return distill(base, out, dtype=dtype, log=log, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "qwenpd" / "distilled")
    args = p.parse_args()
    started = time.perf_counter()
    out = cached(args.preset, args.dtype, args.cache_dir, sequences=args.sequences, length=args.length,
                 epochs=args.epochs)
    print(f"distilled checkpoint: {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
