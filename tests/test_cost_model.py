"""Cost-aware tree sizing (specvlm_lit.decoding.cost_model): deterministic, with made-up timings."""

import math

import pytest
import torch

from specvlm_lit.decoding.cost_model import AcceptanceCalibration, RoundCostModel, RunningMean


def fixed_model(verify, step=0.004, fixed=0.002):
    return RoundCostModel(
        verify, step=RunningMean(value=step, frozen=True), fixed=RunningMean(value=fixed, frozen=True)
    )


def test_verify_time_interpolates_and_extrapolates():
    m = RoundCostModel({2: 0.010, 10: 0.018, 60: 0.058})
    assert m.verify_time(10) == pytest.approx(0.018)
    assert m.verify_time(6) == pytest.approx(0.014)
    assert m.verify_time(35) == pytest.approx(0.038)
    assert m.verify_time(80) == pytest.approx(0.074)  # the last segment's slope, continued
    assert RoundCostModel({8: 0.016}).verify_time(4) == pytest.approx(0.008)


def test_expected_tokens_counts_the_bonus_token():
    e = RoundCostModel.expected_tokens(torch.tensor([0.9, 0.5, 0.1]))
    assert e.tolist() == pytest.approx([1.0, 1.9, 2.4, 2.5])


def test_best_size_follows_the_cost_of_verification():
    # 30 nodes: a confident chain (0.9^d) and many unlikely siblings.
    chain = [math.log(0.9) * d for d in range(1, 8)]
    noise = [math.log(0.01)] * 23
    scores = torch.tensor(chain + noise)
    flat = fixed_model({2: 0.020, 64: 0.021})  # GPU-like: verification cost hardly grows
    steep = fixed_model({2: 0.010, 64: 0.100})  # small CPU: every node costs
    n_flat, _ = flat.best_size(scores, draft_seconds=0.02, max_size=60)
    n_steep, _ = steep.best_size(scores, draft_seconds=0.02, max_size=60)
    assert n_flat == 31  # everything drafted (30 nodes + root): extra nodes are free
    assert n_steep == 8  # root + the confident chain; the 0.01 siblings do not pay for their verification
    assert fixed_model({2: 0.01, 64: 0.1}).best_size(scores, 0.02, max_size=4)[0] == 4  # capped


def test_another_level_only_when_it_pays():
    m = fixed_model({2: 0.010, 64: 0.040}, step=0.004)
    confident = torch.log(torch.tensor([0.95, 0.9, 0.85]))
    unsure = torch.log(torch.tensor([0.05, 0.02, 0.01]))
    assert m.worth_another_level(confident, confident.exp(), child_prob=0.9, draft_seconds=0.01, max_size=60)
    assert not m.worth_another_level(unsure, unsure.exp(), child_prob=0.1, draft_seconds=0.01, max_size=60)
    # No room left under the size cap: never draft more.
    assert not m.worth_another_level(confident, confident.exp(), child_prob=0.9, draft_seconds=0.01, max_size=4)
    # An expensive draft step flips the confident case.
    slow = fixed_model({2: 0.010, 64: 0.040}, step=0.5)
    assert not slow.worth_another_level(confident, confident.exp(), child_prob=0.9, draft_seconds=0.01, max_size=60)
    # Calibrated probabilities override the raw ones: the same unsure drafter, known to be right, drafts on.
    assert m.worth_another_level(
        unsure,
        torch.tensor([0.95, 0.9, 0.85]),
        child_prob=0.9,
        draft_seconds=0.01,
        max_size=60,
        node_probs=torch.tensor([0.95, 0.9, 0.85]),
    )


def test_deeper_children_compete_with_unlikely_siblings_for_the_size_cap():
    # Free verification fills the 16-node cap with the 15 drafted nodes, most of them unlikely siblings. A
    # confident next level must still be drafted: its children replace those siblings within the cap.
    m = fixed_model({2: 0.010, 64: 0.0101}, step=0.002)
    drafted = torch.log(torch.tensor([0.95, 0.9] + [0.01] * 13))
    assert m.best_size(drafted, 0.004, max_size=16)[0] == 16  # the cap is full
    frontier = torch.tensor([0.9, 0.01, 0.01])
    assert m.worth_another_level(drafted, frontier, child_prob=0.95, draft_seconds=0.004, max_size=16)


def test_untimed_model_measures_first():
    m = RoundCostModel({2: 0.01, 16: 0.02})
    unsure = torch.log(torch.tensor([0.01]))
    assert m.worth_another_level(unsure, unsure.exp(), child_prob=0.01, draft_seconds=0.0, max_size=16)
    m.step.update(0.004)
    m.step.update(0.002)
    assert m.step.value == pytest.approx(0.8 * 0.004 + 0.2 * 0.002)
    frozen = RunningMean(value=1.0, frozen=True)
    frozen.update(5.0)
    assert frozen.value == 1.0


@pytest.mark.parametrize("bad", [{}, {0: 0.1}, {4: -1.0}, {4: float("inf")}])
def test_bad_verify_tables_are_rejected(bad):
    with pytest.raises(ValueError, match="verify_times"):
        RoundCostModel(bad)


def test_calibration_starts_at_the_draft_probability_and_learns_the_real_rate():
    cal = AcceptanceCalibration(bins=10, prior_trials=4)
    q = torch.tensor([0.05, 0.55, 0.95])
    assert cal.rate(q).tolist() == pytest.approx(q.tolist())
    # Nodes drafted with q ~ 0.55 turn out to be accepted 95% of the time (an under-confident drafter).
    n = 400
    qs = torch.full((n,), 0.55)
    hits = torch.arange(n) % 20 != 0
    cal.observe(qs, torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), hits)
    assert float(cal.rate(torch.tensor([0.55]))) == pytest.approx((380 + 4 * 0.55) / (400 + 4))
    assert float(cal.rate(torch.tensor([0.05]))) == pytest.approx(0.05)  # other bins untouched
    # Only nodes whose parent was accepted are evidence.
    cal.observe(
        torch.tensor([0.05, 0.05]), torch.tensor([True, True]), torch.tensor([False, False]), torch.tensor([True, True])
    )
    assert float(cal.rate(torch.tensor([0.05]))) == pytest.approx(0.05)
    # First children and later siblings are separate bins.
    assert float(cal.rate(torch.tensor([0.55]), False)) == pytest.approx(0.55)


def test_calibrated_path_probabilities_multiply_along_the_path():
    cal = AcceptanceCalibration()
    # root -> a (q 0.55) -> b (q 0.55) -> c (q 0.55); root -> d (q 0.25, a's younger sibling)
    q = 0.55
    scores = torch.log(torch.tensor([q, 0.25, q * q, q**3]))
    parents = torch.tensor([-1, -1, 0, 2])
    assert AcceptanceCalibration.first_children(parents).tolist() == [True, False, True, True]
    assert cal.path_probs(scores, parents).tolist() == pytest.approx([q, 0.25, q * q, q**3], rel=1e-5)
    ones = torch.ones(50, dtype=torch.bool)
    cal.observe(torch.full((50,), q), ones, ones, ones)
    r = float(cal.rate(torch.tensor([q])))
    assert r > 0.95
    assert cal.path_probs(scores, parents).tolist() == pytest.approx([r, 0.25, r * r, r**3], rel=1e-5)


def test_incremental_extension_equals_the_full_computation():
    cal = AcceptanceCalibration()
    ones = torch.ones(30, dtype=torch.bool)
    cal.observe(torch.linspace(0.05, 0.95, 30), ones, ones, torch.arange(30) % 3 != 0)
    # A pool as the tree builder grows it: 2 root children, then 2 children each, then 2 children of the first two.
    parents = torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2, 3, 3])
    scores = torch.log(torch.tensor([0.7, 0.2, 0.6, 0.05, 0.1, 0.05, 0.5, 0.05, 0.01, 0.02]))
    level1 = cal.extend(torch.zeros(0), scores[:2], parents[:2])
    level2 = cal.extend(level1, scores[:6], parents[:6])
    level3 = cal.extend(level2, scores, parents)
    assert level3.tolist() == pytest.approx(cal.path_probs(scores, parents).tolist(), rel=1e-5)


def test_vectorised_sizes_match_a_plain_loop():
    m = fixed_model({2: 0.010, 10: 0.011, 60: 0.060})
    scores = torch.log(torch.tensor([0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05] + [0.01] * 20))
    for cap in (2, 5, 16, 60):
        n, rate = m.best_size(scores, 0.008, cap)
        e = RoundCostModel.expected_tokens(torch.sort(scores.exp(), descending=True).values)
        loop = max((float(e[k - 1]) / (0.002 + 0.008 + m.verify_time(k)), k) for k in range(2, min(cap, 28) + 1))
        assert (n, rate) == (loop[1], pytest.approx(loop[0]))


def test_end_to_end_speedup_model_and_its_inverse():
    from specvlm_lit.decoding.cost_model import end_to_end_speedup, round_steps_for_speedup

    # No prefill, free rounds of one AR step each: the speedup is the number of tokens per round, ~ sigma.
    assert end_to_end_speedup(101, sigma=101 / 21, round_steps=1.0, prefill_steps=0.0) == pytest.approx(5.0)
    # AR itself (sigma 1 would be N - 1 rounds of one step): speedup 1.
    assert end_to_end_speedup(30, sigma=1.0, round_steps=1.0, prefill_steps=6.0) == pytest.approx(1.0)
    tau = end_to_end_speedup(24, sigma=4.6, round_steps=3.1, prefill_steps=6.4)
    assert round_steps_for_speedup(tau, 24, 4.6, 6.4) == pytest.approx(3.1)
    # A prefill that alone exceeds the budget: no round cost reaches the goal.
    assert round_steps_for_speedup(10.0, 24, 4.6, 6.4) <= 0
    with pytest.raises(ValueError):
        end_to_end_speedup(0, 2.0, 1.0, 0.0)
