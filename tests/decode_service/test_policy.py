"""The adaptive speculation policy's decision (decode_service/policy.py), on step times and acceptances given
to it: it measures each kind of step before it trusts them, drafts exactly where drafting is expected to pay,
measures a kind again once its time is stale, and never drafts past its batch limit."""

from __future__ import annotations

import pytest

from qwenpd.decode_service.policy import (CLOSE_STALE_STEPS, MARGIN, MIN_SAMPLES, STALE_STEPS,
                                          SpeculationPolicy)

K = 3


def _measured(policy: SpeculationPolicy, batch: int, spec_s: float, plain_s: float) -> None:
    for _ in range(MIN_SAMPLES):
        policy.timed(batch, True, spec_s)
        policy.timed(batch, False, plain_s)


def _accepting(policy: SpeculationPolicy, p: float, drafts: int = 2000) -> None:
    policy.scored(round(p * drafts), drafts)


def test_it_tries_drafting_then_a_plain_step_before_it_decides():
    policy = SpeculationPolicy(K, 4)  # a head not scored yet (its prior acceptance: 0.5)
    for _ in range(MIN_SAMPLES):
        assert policy.drafts(1, 1)  # not measured yet: try it
        policy.timed(1, True, 0.015)
    for _ in range(MIN_SAMPLES):
        assert not policy.drafts(1, 1)  # now plain steps, to compare
        policy.timed(1, False, 0.010)
    assert policy.drafts(1, 1)  # 1.875 expected tokens in 1.5 steps' time
    _accepting(policy, 0.1)
    assert not policy.drafts(1, 1)  # 1.11 tokens in 1.5 steps' time


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("batch", [1, 4])
def test_it_drafts_exactly_where_the_expected_tokens_per_second_pay(p, batch):
    spec_s, plain_s = 0.016, 0.011
    policy = SpeculationPolicy(K, 8)
    _measured(policy, batch, spec_s, plain_s)
    _accepting(policy, p)
    expected = sum(p ** i for i in range(1, K + 1))
    pays = (batch + batch * expected) / spec_s >= (1 + MARGIN) * batch / plain_s
    assert policy.drafts(batch, batch) == pays
    assert policy.expected_accepted() == pytest.approx(expected, rel=1e-3)


def test_later_drafts_count_by_their_own_acceptance():
    """Verify passes measure each later draft's acceptance where the ones before it were accepted; until one has,
    the first draft's stands in for it."""
    policy = SpeculationPolicy(K, 4)
    _accepting(policy, 0.8, 100)
    assert policy.expected_accepted() == pytest.approx(0.8 + 0.8 ** 2 + 0.8 ** 3, rel=1e-3)
    for _ in range(20):  # 10 sequences a pass: 8 first drafts accepted, 4 of those second ones, 1 third
        policy.verified([8, 4, 1], 10)
    assert policy.acceptance == pytest.approx(0.8, abs=0.01)
    assert policy.expected_accepted() == pytest.approx(0.8 + 0.8 * 0.5 + 0.8 * 0.5 * 0.25, rel=1e-2)


def test_acceptance_follows_the_recent_drafts():
    policy = SpeculationPolicy(K, 4)
    _accepting(policy, 0.9, 500)
    assert policy.acceptance == pytest.approx(0.9, abs=0.01)
    _accepting(policy, 0.1, 500)  # the text changed: the old drafts have decayed away
    assert policy.acceptance == pytest.approx(0.1, abs=0.02)


def test_a_stale_measurement_is_taken_again():
    policy = SpeculationPolicy(K, 4)
    _measured(policy, 1, 0.030, 0.010)
    _accepting(policy, 0.2)  # far from paying: re-measured after STALE_STEPS
    decisions = []
    for _ in range(STALE_STEPS + 2):
        d = policy.drafts(1, 1)
        decisions.append(d)
        policy.timed(1, d, 0.030 if d else 0.010)
    assert decisions.count(True) == 1  # one drafting step once the drafting time was stale


def test_a_head_well_short_of_paying_is_not_measured_again_soon():
    """A head with ~8% acceptance (the distilled one of bench/spec_decode.py): its verify pass gives 1.09 tokens in
    1.35 plain steps' time, 0.8x. Not a close call: re-measured after STALE_STEPS, not every CLOSE_STALE_STEPS
    (each re-measuring step costs what a verify pass costs over a plain one)."""
    policy = SpeculationPolicy(K, 4)
    _accepting(policy, 0.08)
    _measured(policy, 1, 0.0135, 0.010)
    decisions = []
    for _ in range(STALE_STEPS // 2):
        d = policy.drafts(1, 1)
        decisions.append(d)
        policy.timed(1, d, 0.0135 if d else 0.010)
    assert not any(decisions)


def test_a_close_call_is_measured_again_soon():
    """A slow patch made drafting look 5% too slow: the drafting time is measured again after CLOSE_STALE_STEPS,
    and once the patch has passed the batch drafts again."""
    policy = SpeculationPolicy(K, 4)
    _accepting(policy, 0.7)  # 0.7 + 0.49 + 0.34 = 1.53 expected accepted drafts
    _measured(policy, 1, 0.0232, 0.010)  # 2.53 tokens in 2.32 plain steps' time: 1.09x, a close call
    assert policy.drafts(1, 1)
    for _ in range(MIN_SAMPLES):
        policy.timed(1, True, 0.026)  # a slow patch: 0.97x
    decisions = []
    for _ in range(CLOSE_STALE_STEPS * 3):
        d = policy.drafts(1, 1)
        decisions.append(d)
        policy.timed(1, d, 0.018 if d else 0.010)  # the patch has passed
    # measured again after CLOSE_STALE_STEPS, twice (the median of 3 needs two fast samples), then drafting
    assert not decisions[0] and decisions[CLOSE_STALE_STEPS] and all(decisions[2 * CLOSE_STALE_STEPS + 1:])


def test_a_head_that_cannot_pay_does_not_draft_even_unmeasured():
    policy = SpeculationPolicy(K, 4)
    assert policy.drafts(1, 1)  # the prior (0.5) may pay
    policy.verified([0, 0, 0], 1)  # its first draft was wrong
    assert not policy.drafts(1, 1)  # 0 expected: no step time could make drafting pay
    _accepting(policy, 0.6)  # its drafts, scored while plain, got better
    assert policy.drafts(1, 1)


def test_the_batch_limit_and_always():
    policy = SpeculationPolicy(K, 2, "always")
    assert policy.drafts(2, 1) and not policy.drafts(3, 3) and not policy.drafts(2, 0)
    assert not SpeculationPolicy(0, 2).allowed(1)
    with pytest.raises(ValueError, match="speculative policy"):
        SpeculationPolicy(K, 2, "sometimes")
