"""MaskKV(layers="coverage"): calibrate's attention-coverage curves, the greedy layer split, the
profile's file format, and the runtime keeping what the split says."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import maskkv_compile
from maskkv_compile.budgets import coverage_layer_budgets, layer_slot_totals
from maskkv_compile.calibrate import COVERAGE_K, coverage_curve
from maskkv_compile.generate import generate
from maskkv_compile.policies import PolicyError
from maskkv_compile.profile import PROFILE_VERSION, LayerProfile
from maskkv_compile.tiny_models import tiny_llada


def _concave_curve(gen: random.Random, ks) -> list[float]:
    """A cumulative sum of sorted (descending) shares, read at ks: what calibrate measures."""
    shares = sorted((gen.random() ** 3 for _ in range(ks[-1])), reverse=True)
    scale = gen.uniform(0.3, 1.0) / sum(shares)
    cum = [0.0]
    for share in shares:
        cum.append(cum[-1] + share * scale)
    return [cum[k] for k in ks]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_split_is_optimal_and_sums_to_the_total(seed):
    """On integer budgets the greedy split reaches the best summed coverage that any split with
    the same floor reaches (brute force over 3 layers), and sums to N * B."""
    gen = random.Random(seed)
    ks = list(range(13))  # every k: the curves are exact, no interpolation
    curves = [_concave_curve(gen, ks) for _ in range(3)]
    budget, beta = gen.choice([2, 4, 6]), gen.choice([0.0, 0.5])  # integral floors
    got = coverage_layer_budgets(curves, ks, budget, beta)
    assert sum(got) == pytest.approx(3 * budget)
    assert all(b >= beta * budget - 1e-9 for b in got)
    floor = int(beta * budget)
    best = max(
        sum(c[k] for c, k in zip(curves, split))
        for split in itertools.product(range(floor, 13), repeat=3)
        if sum(split) == 3 * budget
    )
    assert sum(c[round(b)] for c, b in zip(curves, got)) == pytest.approx(best)


def test_beta_one_is_uniform_and_flat_curves_share_evenly():
    curves = [[0.0, 0.5, 0.6, 0.6], [0.0, 0.1, 0.2, 0.3]]
    assert coverage_layer_budgets(curves, [0, 1, 2, 3], 4, beta=1.0) == [4.0, 4.0]
    flat = [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert coverage_layer_budgets(flat, [0, 64], 5, beta=0.0) == [5.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="one curve per layer"):
        coverage_layer_budgets([[0.0, 1.0]], [0, 1, 2], 4)


def test_coverage_curve_matches_a_direct_count():
    """coverage_curve: top-k of each head's votes over the voters' whole attention, averaged."""
    votes = torch.rand(2, 3, 40) * 0.2  # (B, Hkv, P)
    n_voters = 5
    curve = coverage_curve(votes, n_voters)
    for i, k in enumerate(COVERAGE_K):
        top = votes.double().topk(min(k, 40), -1).values.sum(-1) if k else torch.zeros(2, 3)
        assert curve[i].item() == pytest.approx((top / n_voters).mean().item())


def test_calibrate_measures_curves_and_the_runtime_keeps_the_split():
    model = tiny_llada(layers=3, seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (1, 30 + 5 * i), generator=gen) for i in range(3)]
    profile = maskkv_compile.calibrate(model, prompts, gen_length=8, progress=False)
    assert profile.has_coverage and profile.coverage_k == COVERAGE_K
    for curve in profile.coverage:
        assert curve[0] == 0.0 and all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
        # past the longest prompt the curve is the whole prompt share: below 1 (the voters
        # also attend to the response)
        assert 0.0 < curve[-1] < 1.0

    policy = maskkv_compile.MaskKV(profile=profile, layers="coverage")
    budgets = policy.layer_budgets(3, 6)
    assert sum(budgets) == pytest.approx(18)
    assert budgets != maskkv_compile.MaskKV(profile=profile).layer_budgets(3, 6)
    assert "coverage-greedy" in maskkv_compile.MaskKVConfig(policy=policy).describe()

    optimized = maskkv_compile.optimize(model, budget=6, policy=policy, backend="eager")
    prompt = torch.randint(0, 200, (1, 40), generator=gen)
    generate(optimized, prompt, mask_token_id=255, gen_length=8, steps=8, block_length=8)
    stats = optimized.cache_stats()
    assert stats["prefills"] == 1 and stats["steps"] == 7
    kv_heads = model.config.num_key_value_heads
    kept = [sum(layer["kept_per_kv_head"]) for layer in stats["layers"]]
    assert kept == layer_slot_totals(budgets, kv_heads)


def test_profile_file_round_trip_and_errors(tmp_path):
    fingerprint = {"model_class": "M", "n_layers": 2}
    curves = ((0.0, 0.4, 0.5), (0.0, 0.1, 0.3))
    prof = LayerProfile((0.1, 0.2), fingerprint, coverage=curves, coverage_k=(0, 1, 4))
    back = LayerProfile.load(prof.save(tmp_path / "p.json"))
    assert back.coverage == curves and back.coverage_k == (0, 1, 4)
    assert json.loads((tmp_path / "p.json").read_text())["version"] == PROFILE_VERSION

    old = {k: v for k, v in prof.to_dict().items() if not k.startswith("coverage")}
    (tmp_path / "v1.json").write_text(json.dumps({**old, "version": 1}))
    v1 = LayerProfile.load(tmp_path / "v1.json")
    assert not v1.has_coverage
    with pytest.raises(PolicyError, match="this one has none"):
        maskkv_compile.MaskKV(profile=v1, layers="coverage")
    with pytest.raises(PolicyError, match="not a layer allocation"):
        maskkv_compile.MaskKV(layers="depth")
    with pytest.raises(ValueError, match="go together"):
        LayerProfile((0.1, 0.2), fingerprint, coverage=curves)
    with pytest.raises(ValueError, match="increase strictly from 0"):
        LayerProfile((0.1, 0.2), fingerprint, coverage=curves, coverage_k=(1, 2, 4))
    with pytest.raises(ValueError, match="non-decreasing"):
        LayerProfile((0.1, 0.2), fingerprint, coverage=((0, 0.5, 0.4),) * 2, coverage_k=(0, 1, 2))
    with pytest.raises(ValueError, match="2 curves"):
        LayerProfile((0.1, 0.2), fingerprint, coverage=curves[:1], coverage_k=(0, 1, 4))


def test_the_coverage_variant_is_an_opt_in_policy_by_name():
    from maskkv_compile.policies import POLICIES, MaskKVCoverage, get_policy

    assert "maskkv_coverage" not in POLICIES  # the default sweeps run the paper's ten
    policy = get_policy("maskkv_coverage")
    assert isinstance(policy, MaskKVCoverage) and policy.layers == "coverage"
    model = tiny_llada(layers=3, seed=2)
    prompts = [torch.randint(0, 200, (1, 30))]
    profile = maskkv_compile.calibrate(model, prompts, gen_length=8, progress=False)
    config = maskkv_compile.MaskKVConfig(policy="maskkv_coverage", profile=profile)
    assert config.eviction.layers == "coverage" and config.eviction.profile is profile
    assert config.eviction.layer_budgets(3, 6) == coverage_layer_budgets(
        profile.coverage, profile.coverage_k, 6, 0.4
    )
