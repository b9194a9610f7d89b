"""Budget allocators, rounding helpers, voter helpers and the policy registry
(maskkv_compile.budgets).

Expectations are computed independently (plain-Python oracles, brute force) or are invariants.
"""

import itertools
import math
import random

import pytest
import torch

from maskkv_compile import policies as pol
from maskkv_compile.budgets import (
    adakv_head_budgets,
    clamp_and_redistribute,
    largest_remainder,
    layer_slot_totals,
    maskkv_head_budgets,
    maskkv_layer_budgets,
    prompt_preference,
    pyramid_layer_budgets,
    squeeze_layer_budgets,
    uniform_head_budgets,
    uniform_layer_budgets,
)
from maskkv_compile.policies import (
    POLICIES,
    format_budget_table,
    get_policy,
    random_votes,
    snapkv_pool,
    streaming_votes,
    voter_positions,
)


def _hamilton(quotas, total):
    """Oracle: floor, then +1 to the largest remainders, lower index first on ties
    (plain Python)."""
    floors = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


# ---------------------------------------------------------------- layer level


@pytest.mark.parametrize("seed", range(20))
def test_layer_allocators_preserve_total(seed):
    rng = random.Random(seed)
    n, budget = rng.randint(1, 40), rng.uniform(1, 1000)
    imp = [rng.uniform(0, 0.5) for _ in range(n)]
    for ks in (
        uniform_layer_budgets(n, budget),
        maskkv_layer_budgets(imp, budget, beta=rng.random()),
        pyramid_layer_budgets(n, budget, beta=rng.uniform(1, 40)),
        squeeze_layer_budgets(imp, budget),
    ):
        assert len(ks) == n
        assert sum(ks) == pytest.approx(n * budget, rel=1e-9)
        assert all(k >= 0 for k in ks)


@pytest.mark.parametrize("seed", range(10))
def test_maskkv_layers_follow_group_importance(seed):
    rng = random.Random(seed)
    n, budget, beta = rng.randint(3, 32), rng.uniform(8, 512), rng.uniform(0, 0.9)
    imp = [rng.uniform(0.01, 1) for _ in range(n)]
    ks = maskkv_layer_budgets(imp, budget, beta=beta)
    boundary, middle = [ks[0], ks[-1]], ks[1:-1]
    assert boundary[0] == pytest.approx(boundary[1]) and all(
        k == pytest.approx(middle[0]) for k in middle
    )
    # the importance-driven part of each group is proportional to the group's importance sum
    extra_b = sum(boundary) - 2 * beta * budget
    extra_m = sum(middle) - (n - 2) * beta * budget
    i_b, i_m = imp[0] + imp[-1], sum(imp[1:-1])
    assert extra_b / (extra_b + extra_m) == pytest.approx(i_b / (i_b + i_m))
    assert min(ks) >= beta * budget - 1e-9


def test_maskkv_layers_edge_cases():
    assert maskkv_layer_budgets([0.3, 0.1, 0.2, 0.9], 64, beta=1.0) == pytest.approx([64] * 4)
    assert maskkv_layer_budgets([0.7], 64) == pytest.approx([64])
    assert maskkv_layer_budgets([0.7, 0.1], 64) == pytest.approx([64, 64])
    assert maskkv_layer_budgets([0.0] * 5, 64) == pytest.approx([64] * 5)
    # boundary layers more important -> more budget than the middle (the paper's bimodal profile)
    ks = maskkv_layer_budgets([0.5, 0.05, 0.05, 0.05, 0.5], 100)
    assert ks[0] > ks[2]
    with pytest.raises(ValueError):
        maskkv_layer_budgets([], 64)
    with pytest.raises(ValueError):
        maskkv_layer_budgets([0.1, float("nan")], 64)


@pytest.mark.parametrize("n,beta", [(2, 20), (5, 20), (32, 20), (28, 7.5)])
def test_pyramid_decreases_with_depth(n, beta):
    ks = pyramid_layer_budgets(n, 256, beta=beta)
    assert all(a > b for a, b in zip(ks, ks[1:]))
    assert ks[-1] == pytest.approx(256 / beta)
    assert sum(ks) == pytest.approx(n * 256)
    diffs = [a - b for a, b in zip(ks, ks[1:])]
    assert all(d == pytest.approx(diffs[0]) for d in diffs)  # arithmetic sequence
    assert pyramid_layer_budgets(n, 256, beta=1) == pytest.approx([256] * n)
    with pytest.raises(ValueError):
        pyramid_layer_budgets(n, 256, beta=0.5)


def _brute_force_low_group(values):
    """Oracle: try every labelling into 3 non-empty groups; return the lowest-mean group of
    the best."""
    best = None
    for labels in itertools.product(range(3), repeat=len(values)):
        groups = [[v for v, g in zip(values, labels) if g == k] for k in range(3)]
        if any(not g for g in groups):
            continue
        cost = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups)
        if best is None or cost < best[0] - 1e-12:
            low = min(range(3), key=lambda k: sum(groups[k]) / len(groups[k]))
            best = (cost, {i for i, g in enumerate(labels) if g == low})
    return best[1]


@pytest.mark.parametrize("seed", range(8))
def test_squeeze_gives_40_percent_to_least_important_group(seed):
    rng = random.Random(seed)
    n, budget = rng.randint(3, 8), rng.uniform(16, 512)
    imp = [rng.uniform(0, 1) for _ in range(n)]
    ks = squeeze_layer_budgets(imp, budget)
    low = _brute_force_low_group(imp)
    for l in range(n):
        if l in low:
            assert ks[l] == pytest.approx(0.4 * budget)
        else:
            assert ks[l] == pytest.approx((n * budget - 0.4 * budget * len(low)) / (n - len(low)))
    assert sum(ks) == pytest.approx(n * budget)


def test_squeeze_degenerate_inputs_are_uniform():
    assert squeeze_layer_budgets([0.2, 0.5], 10) == pytest.approx([10, 10])
    assert squeeze_layer_budgets([0.3] * 6, 10) == pytest.approx([10] * 6)


def test_layer_slot_totals_exact():
    rng = random.Random(0)
    for _ in range(50):
        n, heads, budget = rng.randint(1, 40), rng.randint(1, 16), rng.randint(1, 512)
        ks = maskkv_layer_budgets([rng.random() for _ in range(n)], budget)
        totals = layer_slot_totals(ks, heads)
        assert sum(totals) == n * heads * budget
        assert all(abs(t - heads * k) < 1 for t, k in zip(totals, ks))


# ---------------------------------------------------------------- rounding helpers


@pytest.mark.parametrize("seed", range(30))
def test_largest_remainder_matches_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 20, (1,), generator=gen))
    shares = torch.rand(n, generator=gen, dtype=torch.float64) * 10
    total = int(torch.randint(0, 1000, (1,), generator=gen))
    k = largest_remainder(shares, total)
    assert k.dtype == torch.int64 and int(k.sum()) == total
    quotas = [float(s) / float(shares.sum()) * total for s in shares]
    assert k.tolist() == _hamilton(quotas, total)


def test_largest_remainder_ties_and_zero_shares():
    assert largest_remainder(torch.ones(4), 6).tolist() == [2, 2, 1, 1]
    assert largest_remainder(torch.zeros(3), 4).tolist() == [2, 1, 1]
    with pytest.raises(ValueError):
        largest_remainder(torch.tensor([1.0, -1.0]), 3)


@pytest.mark.parametrize("seed", range(30))
def test_clamp_and_redistribute_keeps_total_and_bounds(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 16, (1,), generator=gen))
    quotas = torch.rand(n, generator=gen, dtype=torch.float64) ** 3 * 200
    lo, hi = (
        int(torch.randint(0, 10, (1,), generator=gen)),
        int(torch.randint(10, 120, (1,), generator=gen)),
    )
    total = int(quotas.sum().round())
    k = clamp_and_redistribute(quotas, total, lo, hi)
    assert int(k.sum()) == min(max(total, n * lo), n * hi)
    assert bool((k >= lo).all() and (k <= hi).all())
    # heads strictly inside the bounds follow one common scale of their quotas (within rounding)
    free = [(float(q), int(v)) for q, v in zip(quotas, k) if lo < v < hi and q > 0]
    if len(free) >= 2:
        lam = sum(v for _, v in free) / sum(q for q, _ in free)
        assert all(abs(v - lam * q) <= 1 + 1e-6 for q, v in free)
    # a head clamped at hi wanted at least hi; a head at lo wanted at most lo (after scaling)


def test_clamp_frees_slots_to_the_other_heads():
    k = clamp_and_redistribute(torch.tensor([300.0, 50.0, 50.0]), 400, 1, 200)
    assert k.tolist() == [200, 100, 100]
    k = clamp_and_redistribute(torch.tensor([0.0, 60.0, 40.0]), 100, 10, 100)
    assert k.tolist() == [10, 54, 36]
    assert clamp_and_redistribute(torch.tensor([5.0, 5.0]), 50, 0, 20).tolist() == [
        20,
        20,
    ]  # infeasible
    assert clamp_and_redistribute(torch.tensor([0.0, 10.0]), 30, 0, 20).tolist() == [
        10,
        20,
    ]  # zero quota fills last


def test_clamp_without_clamping_is_floor_plus_remainder():
    quotas = [10.0, 33.7, 20.2, 36.4]
    assert clamp_and_redistribute(torch.tensor(quotas), 100, 1, 500).tolist() == _hamilton(
        quotas, 100
    )


# ---------------------------------------------------------------- head level


def _maskkv_oracle(pref_kv, k_l, alpha):
    n = len(pref_kv)
    p_hat = [p / sum(pref_kv) for p in pref_kv]
    quotas = [alpha * k_l + (1 - alpha) * n * k_l * p for p in p_hat]
    return _hamilton(quotas, math.floor(n * k_l + 0.5))


@pytest.mark.parametrize("seed", range(40))
def test_maskkv_heads_total_and_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    n_kv = int(torch.randint(1, 9, (1,), generator=gen))
    group = int(torch.randint(1, 5, (1,), generator=gen))
    batch = int(torch.randint(1, 4, (1,), generator=gen))
    n_voters = int(torch.randint(1, 64, (1,), generator=gen))
    k_l = float(torch.rand(1, generator=gen, dtype=torch.float64)) * 300 + 1
    alpha = float(torch.rand(1, generator=gen))
    mass = torch.rand(batch, n_kv * group, generator=gen, dtype=torch.float64) * n_voters
    k = maskkv_head_budgets(
        mass, n_voters, k_l, alpha=alpha, min_keep=0, prompt_len=10_000, n_kv_heads=n_kv
    )
    assert k.dtype == torch.int64 and k.shape == (n_kv,)
    assert int(k.sum()) == math.floor(n_kv * k_l + 0.5)
    pref = (mass / n_voters).mean(0).view(n_kv, group).sum(1).tolist()
    assert k.tolist() == _maskkv_oracle(pref, k_l, alpha)


def test_maskkv_heads_alpha_one_is_uniform():
    mass = torch.tensor([9.0, 0.5, 3.0, 0.0, 1.0])
    assert torch.equal(
        maskkv_head_budgets(mass, 10, 37.4, alpha=1.0, prompt_len=100),
        uniform_head_budgets(5, 37.4, 100),
    )


def test_zero_preference_head_gets_alpha_floor():
    mass = torch.tensor([[6.0, 0.0, 2.0, 4.0]])
    k = maskkv_head_budgets(mass, 8, 100, alpha=0.1, min_keep=1, prompt_len=1000)
    assert int(k[1]) == math.floor(0.1 * 100)
    k = maskkv_head_budgets(mass, 8, 57.3, alpha=0.1, min_keep=1, prompt_len=1000)
    assert math.floor(0.1 * 57.3) <= int(k[1]) <= math.floor(0.1 * 57.3) + 1
    k = maskkv_head_budgets(mass, 8, 100, alpha=0.1, min_keep=25, prompt_len=1000)
    assert int(k[1]) == 25 and int(k.sum()) == 400


def test_maskkv_heads_clamp_to_prompt_len_and_redistribute():
    mass = torch.tensor([9.0, 1.0, 1.0, 1.0])
    k = maskkv_head_budgets(mass, 12, 64, prompt_len=100)
    assert int(k.max()) == 100 and int(k.sum()) == 256
    k = maskkv_head_budgets(mass, 12, 64, prompt_len=40)  # prompt shorter than the budget: keep all
    assert k.tolist() == [40, 40, 40, 40]


def test_maskkv_heads_deterministic_and_permutation_equivariant():
    gen = torch.Generator().manual_seed(1)
    mass = torch.rand(2, 16, generator=gen)
    a = maskkv_head_budgets(mass, 32, 77.7, prompt_len=500, n_kv_heads=8)
    assert torch.equal(a, maskkv_head_budgets(mass, 32, 77.7, prompt_len=500, n_kv_heads=8))
    perm = torch.randperm(8, generator=gen)
    q_perm = (perm[:, None] * 2 + torch.arange(2)).flatten()  # move whole GQA groups
    b = maskkv_head_budgets(mass[:, q_perm], 32, 77.7, prompt_len=500, n_kv_heads=8)
    assert torch.equal(b, a[perm])
    # exact ties go to the lower head index
    assert maskkv_head_budgets(torch.ones(3), 4, 10, prompt_len=50).tolist() == [10, 10, 10]
    assert maskkv_head_budgets(torch.ones(3), 4, 10.5, prompt_len=50).tolist() == [11, 11, 10]


def test_prompt_preference_reductions():
    mass = torch.tensor([[4.0, 2.0, 1.0, 3.0], [2.0, 2.0, 3.0, 1.0]])
    pref = prompt_preference(mass, torch.tensor([8.0, 4.0]), n_kv_heads=2)
    expected = [((4 / 8 + 2 / 4) + (2 / 8 + 2 / 4)) / 2, ((1 / 8 + 3 / 4) + (3 / 8 + 1 / 4)) / 2]
    assert pref.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError):
        prompt_preference(mass, 4, n_kv_heads=3)


def test_uniform_head_budgets():
    assert uniform_head_budgets(4, 100.3, 300).tolist() == [101, 100, 100, 100]
    assert uniform_head_budgets(4, 100, 30).tolist() == [30] * 4
    assert (
        uniform_head_budgets(3, 2, 100, min_keep=5).tolist() == [5] * 3
    )  # min_keep wins over the budget
    assert int(uniform_head_budgets(4, 10.125, 100).sum()) == 41  # round half up: 40.5 -> 41


def _adakv_oracle_counts(scores, rest):
    flat = [(-float(s), h, p) for h, row in enumerate(scores) for p, s in enumerate(row)]
    won = sorted(flat)[:rest]
    return [sum(1 for _, h, _ in won if h == head) for head in range(len(scores))]


@pytest.mark.parametrize("seed", range(20))
def test_adakv_safeguard_and_joint_topk(seed):
    gen = torch.Generator().manual_seed(seed)
    n, p = (
        int(torch.randint(1, 9, (1,), generator=gen)),
        int(torch.randint(20, 200, (1,), generator=gen)),
    )
    scores = torch.rand(n, p, generator=gen, dtype=torch.float64) ** (
        1 + 4 * torch.rand(n, 1, generator=gen)
    )
    k_l = int(torch.randint(1, p // 2, (1,), generator=gen))
    k = adakv_head_budgets(scores, k_l, safeguard=0.2, min_keep=0)
    assert int(k.sum()) == n * k_l
    assert bool((k >= math.floor(0.2 * k_l)).all()) and bool((k <= p).all())
    guard = _hamilton([0.2 * n * k_l / n] * n, math.floor(0.2 * n * k_l + 0.5))
    counts = _adakv_oracle_counts(scores.tolist(), n * k_l - sum(guard))
    assert k.tolist() == [g + c for g, c in zip(guard, counts)]


def test_adakv_batch_mean_and_clamp():
    scores = torch.zeros(2, 3, 10)
    scores[:, 0] = 1.0  # head 0 wins every top entry
    k = adakv_head_budgets(scores, 6, safeguard=0.2, min_keep=1)
    assert int(k.sum()) == 18 and int(k[0]) == 10 and bool((k[1:] >= 1).all())


# ---------------------------------------------------------------- voters


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_snapkv_pool_equals_naive_loop(kernel):
    votes = torch.rand(2, 3, 11, generator=torch.Generator().manual_seed(kernel))
    out = snapkv_pool(votes, kernel)
    r = kernel // 2
    naive = torch.zeros_like(votes)
    for b, h, pos in itertools.product(range(2), range(3), range(11)):
        naive[b, h, pos] = (
            sum(float(votes[b, h, q]) for q in range(pos - r, pos + r + 1) if 0 <= q < 11) / kernel
        )
    assert out.shape == votes.shape
    torch.testing.assert_close(out, naive)
    with pytest.raises(ValueError):
        snapkv_pool(votes, 4)


@pytest.mark.parametrize("P,sink", [(20, 4), (5, 4), (9, 0), (3, 5)])
def test_streaming_topk_is_sink_plus_recent(P, sink):
    scores = streaming_votes(P, sink)
    for k in range(P + 1):
        kept = set(torch.topk(scores, k).indices.tolist())
        n_sink = min(k, sink, P)
        expected = set(range(n_sink)) | set(range(P - (k - n_sink), P))
        assert kept == expected


def test_random_votes_seeded():
    a = random_votes(2, 3, 17, seed=5)
    assert a.shape == (2, 3, 17)
    assert torch.equal(a, random_votes(2, 3, 17, seed=5))
    assert not torch.equal(a, random_votes(2, 3, 17, seed=6))


def test_voter_positions():
    prompt, resp = torch.arange(0, 40), torch.arange(40, 48)
    assert voter_positions("maskkv", prompt, resp).tolist() == list(range(40, 48))
    assert voter_positions("mask_voting_uniform", prompt, resp, shift=-1).tolist() == list(
        range(39, 47)
    )
    assert voter_positions("maskkv", prompt, resp, shift=1).tolist() == list(range(41, 48)) + [47]
    assert voter_positions("snapkv", prompt, resp, window=32).tolist() == list(range(8, 40))
    assert voter_positions("snapkv", prompt[:10], resp, window=32).tolist() == list(range(10))
    assert voter_positions("prompt_voting", prompt, resp).tolist() == list(range(40))
    assert voter_positions("all_voting", prompt, resp).tolist() == list(range(48))
    assert voter_positions("streaming", prompt, resp).numel() == 0
    with pytest.raises(ValueError, match="1-D"):
        voter_positions("maskkv", prompt[None], resp)


# ---------------------------------------------------------------- registry and reporting


def test_registry_names_and_errors():
    expected = {
        "maskkv",
        "snapkv",
        "prompt_voting",
        "all_voting",
        "streaming",
        "random",
        "pyramidkv",
        "squeezeattention",
        "adakv",
        "mask_voting_uniform",
    }
    assert set(POLICIES) == expected
    with pytest.raises(ValueError) as err:
        get_policy("h2o")
    assert "h2o" in str(err.value) and all(name in str(err.value) for name in expected)
    assert get_policy(POLICIES["adakv"]) is POLICIES["adakv"]
    for policy in POLICIES.values():  # every named component exists
        assert policy.voters in pol._VOTERS and policy.vote_transform in pol._VOTE_TRANSFORMS
        assert (
            policy.layer_allocator in pol._LAYER_ALLOCATORS
            and policy.head_allocator in pol._HEAD_ALLOCATORS
        )


def test_policy_dispatch():
    imp = [0.4, 0.1, 0.1, 0.5]
    assert POLICIES["maskkv"].needs_profile and not POLICIES["snapkv"].needs_profile
    assert POLICIES["maskkv"].layer_budgets(4, 64, imp) == maskkv_layer_budgets(imp, 64)
    assert POLICIES["pyramidkv"].layer_budgets(4, 64) == pyramid_layer_budgets(4, 64)
    with pytest.raises(ValueError, match="profile"):
        POLICIES["squeezeattention"].layer_budgets(4, 64)
    mass = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert torch.equal(
        POLICIES["maskkv"].head_budgets(
            50, n_kv_heads=2, prompt_len=200, prompt_mass=mass, n_voters=4
        ),
        maskkv_head_budgets(mass, 4, 50, prompt_len=200, n_kv_heads=2),
    )
    with pytest.raises(ValueError, match="votes"):
        POLICIES["adakv"].head_budgets(50, n_kv_heads=2, prompt_len=200)
    votes = torch.rand(1, 2, 9)
    torch.testing.assert_close(
        POLICIES["snapkv"].selection_scores(votes, votes.shape), snapkv_pool(votes)
    )
    assert POLICIES["streaming"].selection_scores(None, (2, 3, 9)).shape == (2, 3, 9)
    assert torch.equal(
        POLICIES["random"].selection_scores(None, (1, 2, 9), seed=3), random_votes(1, 2, 9, seed=3)
    )


def test_policy_objects_use_their_own_options():
    """A policy object's methods default to its own options (the registry's defaults are the
    paper's); an explicit argument (what the ops pass) still wins."""
    from maskkv_compile.policies import MaskKV, Random, SnapKV, StreamingLLM
    from maskkv_compile.profile import LayerProfile

    imp = [0.4, 0.1, 0.1, 0.5]
    profile = LayerProfile(tuple(imp), {"n_layers": 4})
    chosen = MaskKV(alpha=0.5, beta=0.2, profile=profile)
    assert not chosen.needs_profile and POLICIES["maskkv"].needs_profile
    assert chosen.layer_budgets(4, 64) == maskkv_layer_budgets(imp, 64, beta=0.2)
    assert chosen.layer_budgets(4, 64, beta=0.4) == maskkv_layer_budgets(imp, 64, beta=0.4)
    mass = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert torch.equal(
        chosen.head_budgets(50, n_kv_heads=2, prompt_len=200, prompt_mass=mass, n_voters=4),
        maskkv_head_budgets(mass, 4, 50, alpha=0.5, prompt_len=200, n_kv_heads=2),
    )
    votes = torch.rand(1, 2, 9)
    torch.testing.assert_close(
        SnapKV(kernel=3).selection_scores(votes, votes.shape), snapkv_pool(votes, 3)
    )
    assert not torch.equal(snapkv_pool(votes, 3), snapkv_pool(votes, 5))
    assert torch.equal(
        StreamingLLM(sinks=2).selection_scores(None, (1, 1, 9)),
        streaming_votes(9, 2).expand(1, 1, 9),
    )
    assert torch.equal(
        Random(seed=3).selection_scores(None, (1, 2, 9)), random_votes(1, 2, 9, seed=3)
    )


def test_format_budget_table():
    text = format_budget_table([torch.tensor([3, 5]), torch.tensor([11, 2])])
    lines = text.splitlines()
    assert "kv0" in lines[0] and "kv1" in lines[0] and "total" in lines[0]
    assert lines[-1].split() == ["1", "11", "2", "13"]


@pytest.mark.parametrize("policy", ["maskkv", "mask_voting_uniform"])
@pytest.mark.parametrize("seed", range(6))
def test_head_budgets_op_every_row_at_once_equals_each_row_alone(policy, seed):
    """``maskkv::head_budgets`` allocates every row of a batch at once, on the device, reading
    nothing (``clamp_and_redistribute_rows``); each row's budgets must equal the policy's host
    allocator run on that row alone. Ragged prompts (rows shorter than the budget are kept
    whole), all-zero or half-zero prompt mass, clamps at ``min_keep`` and at the prompt length."""
    rng = random.Random(seed)
    import maskkv_compile.kernels  # noqa: F401  (registers the ops)

    chosen = get_policy(policy)
    for case in range(40):
        batch, kv_heads, group = (
            rng.randint(1, 3),
            rng.choice([1, 2, 4, 8, 32]),
            rng.choice([1, 2, 4]),
        )
        num, budget = rng.randint(1, 300), rng.randint(1, 64)
        layer_budget = round(budget * rng.uniform(0.3, 2.0) * kv_heads) / kv_heads
        alpha, min_keep = rng.choice([0.0, 0.1, 0.5, 1.0]), rng.choice([0, 1, 4, 16])
        gen = torch.Generator().manual_seed(seed * 100 + case)
        mass = torch.rand(batch, kv_heads * group, generator=gen) ** rng.choice(
            [1, 3, 8]
        ) * rng.uniform(0.01, 20)
        if case % 7 == 0:
            mass[:, : kv_heads * group // 2] = 0
        if case % 11 == 0:
            mass.zero_()
        scores = torch.rand(batch, kv_heads, num, generator=gen)
        for row in range(batch):
            scores[row, :, rng.randint(0, num) :] = float("-inf")  # the row's prompt is a prefix
        voter_valid = torch.rand(batch, 20, generator=gen) < rng.random()
        got = torch.ops.maskkv.head_budgets(
            mass, scores, voter_valid, float(layer_budget), budget, policy, alpha, min_keep
        )
        for row in range(batch):
            prompt_len = int(torch.isfinite(scores[row, 0]).sum())
            if prompt_len <= budget:
                assert got[row].tolist() == [prompt_len] * kv_heads
                continue
            options = {"alpha": alpha} if chosen.head_allocator == "maskkv" else {}
            alone = chosen.head_budgets(
                layer_budget,
                n_kv_heads=kv_heads,
                prompt_len=prompt_len,
                min_keep=min_keep,
                prompt_mass=mass[row : row + 1],
                n_voters=max(int(voter_valid[row].sum()), 1),
                **options,
            )
            assert got[row].tolist() == alone.tolist(), (case, row)


@pytest.mark.parametrize("policy", ["snapkv", "streaming"])
def test_selection_scores_op_every_row_at_once_equals_each_row_alone(policy):
    """``maskkv::selection_scores`` pools (SnapKV) or orders (StreamingLLM) every row at once,
    its own prompt columns moved to the front, without reading the device; each row's scores
    must equal the policy's transform run on that row's own columns alone, bit for bit, and
    be -inf elsewhere. Own columns anywhere (left padding, holes), in float32 and float64."""
    import maskkv_compile.kernels  # noqa: F401  (registers the ops)

    rng = random.Random(1)
    chosen = get_policy(policy)
    for case in range(60):
        batch, kv_heads, num = rng.randint(1, 4), rng.choice([1, 2, 4]), rng.randint(1, 60)
        gen = torch.Generator().manual_seed(case)
        votes = torch.rand(
            batch, kv_heads, num, generator=gen, dtype=rng.choice([torch.float32, torch.float64])
        )
        valid = torch.rand(batch, num, generator=gen) < rng.uniform(0.2, 1.0)
        valid[:, rng.randrange(num)] = True  # every row has a prompt
        kernel, sink = rng.choice([1, 3, 5, 7]), rng.randint(0, 8)
        got = torch.ops.maskkv.selection_scores(votes, valid, policy, kernel, sink, 0, 0)
        for row in range(batch):
            columns = valid[row].nonzero().flatten()
            own = votes[row : row + 1].index_select(2, columns)
            alone = chosen.selection_scores(
                own, tuple(own.shape), votes.device, kernel=kernel, sink=sink
            )
            assert torch.equal(got[row][:, columns], alone[0].to(votes.dtype)), (case, row)
            assert (got[row][:, ~valid[row]] == float("-inf")).all()
