"""The tensor-parallel sharding plan (engine/sharding.py): every rank's slices have exactly the shapes of the
model it computes, the canonical state reassembles bit for bit from any degree, and the slices compute the
right parts (column-parallel outputs are slices of the full output, row-parallel outputs sum to it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenpd.engine.config import preset
from qwenpd.engine.tp.plan import ShardingError, ShardPlan, merge_state, plans, take
from qwenpd.engine.state_spec import shapes as expected_shapes
from qwenpd.engine.weight_layout import expected_weight_shapes

CASES = [("tiny", 1), ("tiny", 2), ("tiny", 4), ("small", 2), ("small", 4), ("small", 8),
         ("qwen3.6-27b", 2), ("qwen3.6-27b", 4), ("qwen3.6-27b", 8)]


def canonical_weights(config, device: str = "meta") -> dict[str, torch.Tensor]:
    return {n: torch.empty(s, device=device) for n, s in expected_weight_shapes(config).items()}


@pytest.mark.parametrize("name,degree", CASES, ids=[f"{n}-tp{d}" for n, d in CASES])
def test_shards_have_the_local_models_shapes(name: str, degree: int) -> None:
    config = preset(name)
    weights = canonical_weights(config)
    for plan in plans(config, degree):
        local = plan.local_config
        want = expected_weight_shapes(local)
        got = plan.shard_weights(weights)
        for n, t in got.items():
            if n in ("embed_tokens.weight", "lm_head.weight"):
                continue  # the vocabulary is not part of the local model
            assert tuple(t.shape) == want[n], (plan.rank, n)
        assert tuple(got["lm_head.weight"].shape) == (config.vocab_size // degree, config.hidden_size)
        assert tuple(got["embed_tokens.weight"].shape) == (config.vocab_size // degree, config.hidden_size)
        state = {n: torch.empty(s, device="meta") for n, s in expected_shapes(config, 7).items()}
        local_state = plan.shard_state(state)
        assert {n: tuple(t.shape) for n, t in local_state.items()} == expected_shapes(local, 7)


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_state_reassembles_exactly_from_any_degree(degree: int) -> None:
    config = preset("tiny")  # 2 KV heads: degree 4 replicates each on two ranks
    g = torch.Generator().manual_seed(degree)
    state = {n: torch.randn(s, generator=g) for n, s in expected_shapes(config, 11).items()}
    ps = plans(config, degree)
    shards = [p.shard_state(state) for p in ps]
    back = merge_state(shards, ps, state)
    for n, t in state.items():
        assert torch.equal(back[n], t), n
    # every element is written by exactly one rank
    written = {n: torch.zeros_like(t) for n, t in state.items()}
    for p in ps:
        for n in state:
            for (dim, a, b), _ in p.write_ranges(n):
                written[n].narrow(dim, a, b - a).add_(1)
    assert all(torch.equal(w, torch.ones_like(w)) for w in written.values())


@pytest.mark.parametrize("name,degree", [("tiny", 2), ("tiny", 4), ("small", 4)])
def test_slices_compute_their_part(name: str, degree: int) -> None:
    config = preset(name)
    g = torch.Generator().manual_seed(0)
    mlp = "layers.0.mlp."
    lin = "layers.{}.linear_attn.".format(config.linear_layers[0])
    att = "layers.{}.self_attn.".format(config.attention_layers[0])
    w = {n: torch.randn(s, generator=g, dtype=torch.float64) / s[-1] ** 0.5
         for n, s in expected_weight_shapes(config).items() if n.startswith((mlp, lin, att, "lm_head"))}
    x = torch.randn(5, config.hidden_size, generator=g, dtype=torch.float64)
    full = F.linear(F.silu(F.linear(x, w[mlp + "gate_proj.weight"])) * F.linear(x, w[mlp + "up_proj.weight"]),
                    w[mlp + "down_proj.weight"])
    partial_sum = torch.zeros_like(full)
    logits = []
    for plan in plans(config, degree):
        s = plan.shard_weights(w)
        partial_sum += F.linear(F.silu(F.linear(x, s[mlp + "gate_proj.weight"])) * F.linear(x, s[mlp + "up_proj.weight"]),
                                s[mlp + "down_proj.weight"])  # row parallel: the ranks' outputs sum up
        # column parallel: a rank's projection is its slice of the full projection, in the state's layout
        qkv = F.linear(x, w[lin + "in_proj_qkv.weight"])
        torch.testing.assert_close(F.linear(x, s[lin + "in_proj_qkv.weight"]),
                                   take(qkv.T, plan.state_ranges("layers.0.conv")).T, rtol=1e-12, atol=1e-12)
        assert torch.equal(s[lin + "conv1d.weight"], take(w[lin + "conv1d.weight"], plan.state_ranges("layers.0.conv")))
        q = F.linear(x, w[att + "q_proj.weight"]).view(5, config.num_attention_heads, 2 * config.head_dim)
        h0, h1 = plan.weight_ranges(att + "o_proj.weight")[0][1:]
        d = config.head_dim
        torch.testing.assert_close(F.linear(x, s[att + "q_proj.weight"]).view(5, -1, 2 * d), q[:, h0 // d:h1 // d],
                                   rtol=1e-12, atol=1e-12)
        logits.append(F.linear(x, s["lm_head.weight"]))
    torch.testing.assert_close(partial_sum, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(logits, dim=-1), F.linear(x, w["lm_head.weight"]), rtol=1e-12, atol=1e-12)


def test_a_ranks_heads_read_only_their_own_key_and_kv_heads() -> None:
    config = preset("qwen3.6-27b")  # 24 q heads / 4 KV heads; 48 value heads / 16 key heads
    for degree in (2, 4, 8):
        for plan in plans(config, degree):
            local = plan.local_config
            k0 = plan.state_ranges("layers.3.k")[0][1]
            q0 = plan.weight_ranges("layers.3.self_attn.o_proj.weight")[0][1] // config.head_dim
            group = config.num_attention_heads // config.num_key_value_heads
            assert all((q0 + j) // group == k0 + j // (local.num_attention_heads // local.num_key_value_heads)
                       for j in range(local.num_attention_heads))
            v0 = plan.state_ranges("layers.0.recurrent")[0][1]
            kq = plan.state_ranges("layers.0.conv")[0][1] // config.linear_key_head_dim
            vgroup = config.linear_num_value_heads // config.linear_num_key_heads
            lgroup = local.linear_num_value_heads // local.linear_num_key_heads
            assert all((v0 + j) // vgroup == kq + j // lgroup for j in range(local.linear_num_value_heads))


@pytest.mark.parametrize("name,degree,field", [("tiny", 3, "num_attention_heads"), ("small", 16, "num_attention_heads"),
                                               ("qwen3.6-27b", 32, "num_attention_heads"),
                                               ("qwen3.6-27b", 6, "num_key_value_heads")])
def test_degrees_that_do_not_divide_are_refused(name: str, degree: int, field: str) -> None:
    with pytest.raises(ShardingError, match=field):
        ShardPlan(preset(name), degree, 0)
    with pytest.raises(ShardingError, match="rank"):
        ShardPlan(preset("tiny"), 2, 2)
