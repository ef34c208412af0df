"""Whether a tensor-parallel degree shards a model: the rule ShardPlan (plan.py) applies, torch-free, so a service
checks its flags with it before any engine loads."""

from __future__ import annotations

from qwenpd.engine.config import ModelConfig


class ShardingError(ValueError):
    """The degree does not divide what it must (heads, channels, vocabulary)."""


def check_degree(c: ModelConfig, degree: int) -> None:
    """ShardingError naming the first of `c`'s head counts, channels or vocabulary that `degree` ranks cannot
    share: split evenly, or (KV heads, DeltaNet key heads) replicated on degree/count ranks each."""
    if degree < 1:
        raise ShardingError(f"tensor-parallel degree {degree}: need degree >= 1")
    _divides(degree, c.num_attention_heads, "num_attention_heads")
    _divides_or_replicates(degree, c.num_key_value_heads, "num_key_value_heads")
    _divides_or_replicates(degree, c.linear_num_key_heads, "linear_num_key_heads")
    _divides(degree, c.linear_num_value_heads, "linear_num_value_heads")
    _divides(degree, c.intermediate_size, "intermediate_size")
    _divides(degree, c.vocab_size, "vocab_size")
    # With the value heads split evenly and the key heads split or replicated, a rank's value heads always read
    # whole key heads of its own (Hv = g·Hk; n = m·Hk dividing Hv means m divides g).


def _divides(n: int, total: int, what: str) -> None:
    if total % n:
        raise ShardingError(f"tensor-parallel degree {n} does not divide {what}={total}")


def _divides_or_replicates(n: int, total: int, what: str) -> None:
    if total % n and n % total:
        raise ShardingError(f"tensor-parallel degree {n} neither divides {what}={total} nor is a multiple of it")
