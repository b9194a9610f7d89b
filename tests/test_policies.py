"""Every policy of the registry, wired into the graph, against its pure-torch reference."""

import pytest
import torch
from helpers import build, kept_positions, prompt_and_masks
from test_exactness import run_against_reference

import maskkv_compile
from maskkv_compile.policies import POLICIES, get_policy
from maskkv_compile.profile import (
    LayerProfile,
    ProfileMismatchError,
    attention_importance,
    model_fingerprint,
)


def profile_for(model, importance):
    return LayerProfile(tuple(importance), model_fingerprint(model.config, type(model).__name__))


def policy_with(name, **options):
    """The policy called ``name`` with those of ``options`` (flat names: profile, window, ...)
    that it has; the others do not apply to it (and would be refused)."""
    policy = get_policy(name)
    for option, value in options.items():
        if policy.takes(option):
            policy = policy.with_flat(option, value)
    return policy


@pytest.fixture(scope="module")
def three_layers():
    """family -> its 3-layer model, built once for the module (the policies share its trace)."""
    return {family: build(family, layers=3) for family in ("llada", "dream")}


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_policy_keeps_what_its_reference_keeps(policy, family, three_layers):
    model = three_layers[family]
    _, x = prompt_and_masks(model, prompt_len=40, gen_len=8)
    resp = torch.arange(40, 48)
    profile = profile_for(model, [0.05, 0.3, 0.2])
    chosen = policy_with(policy, profile=profile, window=8)
    optimized, reference, _ = run_against_reference(
        model, x, resp, budget=6, steps=2, policy=chosen
    )
    stats = optimized.cache_stats()
    for layer, cache in enumerate(optimized.runtime.last_session.layers):
        ours = kept_positions(cache)
        assert ours == reference.kept_positions(layer), f"{policy} layer {layer}"
    kv_heads = model.config.num_key_value_heads
    total = sum(sum(layer["kept_per_kv_head"]) for layer in stats["layers"])
    # exact, except where the min_keep=1 floor lifts a starved layer (PyramidKV's top layer
    # gets B/20)
    assert (
        3 * kv_heads * 6 <= total <= 3 * kv_heads * 6 + (kv_heads if policy == "pyramidkv" else 0)
    )


@pytest.fixture(scope="module")
def dream3():
    return build("dream", layers=3, dtype=torch.float64)


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_budget_at_least_prompt_is_exact_for_every_policy(policy, dream3):
    model = dream3
    prompt, _ = prompt_and_masks(model, prompt_len=12, gen_len=8)
    kwargs = dict(gen_length=8, steps=8, block_length=8)
    profile = profile_for(model, [0.05, 0.3, 0.2])
    ours = maskkv_compile.optimize(
        model, budget=12, backend="eager", policy=policy_with(policy, profile=profile)
    )
    out = ours.generate(prompt, **kwargs)
    assert all(layer["kept_per_kv_head"] == [12, 12] for layer in ours.cache_stats()["layers"])
    no_eviction = maskkv_compile.optimize(model, budget=10_000, backend="eager").generate(
        prompt, **kwargs
    )
    assert torch.equal(out, no_eviction)


def test_ragged_cache_bytes_are_the_head_budgets_plus_padding():
    model = build("dream", layers=3)
    _, x = prompt_and_masks(model, prompt_len=40, gen_len=8)
    optimized = maskkv_compile.optimize(
        model,
        budget=6,
        backend="eager",
        policy="maskkv",
        profile=profile_for(model, [0.05, 0.3, 0.2]),
    )
    optimized(x)
    stats = optimized.cache_stats()
    entry = 16 * 2 * 4  # one (k, v) pair: head_dim 16, float32
    for layer in stats["layers"]:
        assert layer["valid_bytes"] == sum(layer["kept_per_kv_head"]) * entry
        assert (
            layer["bytes"]
            == len(layer["kept_per_kv_head"]) * max(layer["kept_per_kv_head"]) * entry
        )
    assert stats["uniform_bytes"] == 3 * 2 * 6 * entry == stats["valid_bytes"]
    assert "kv0" in optimized.explain_budgets()


def test_a_profile_for_another_model_is_refused():
    model = build("dream", layers=3)
    other = profile_for(build("llada", layers=2), [0.1, 0.2])
    with pytest.raises(ProfileMismatchError, match="n_layers"):
        maskkv_compile.optimize(model, budget=6, profile=other)


def _reference_importance(model, x, attention_mask=None) -> list[float]:
    """Independent measurement: hooks on the HF layers (input of the layer; input + attention
    output)."""
    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: captured.__setitem__(
                    ("in", i), k.get("hidden_states", a[0] if a else None)
                ),
                with_kwargs=True,
            )
        )
        hooks.append(
            layer.self_attn.register_forward_hook(
                lambda m, a, out, i=i: captured.__setitem__(("attn", i), out[0])
            )
        )
    with torch.no_grad():
        model(x, attention_mask=attention_mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    return [
        attention_importance(captured[("in", i)], captured[("in", i)] + captured[("attn", i)])
        for i in range(len(model.model.layers))
    ]


def test_calibrate_measures_the_residual_stream_around_attention():
    model = build("llada", layers=3)
    prompts = [
        prompt_and_masks(model, prompt_len=20 + 5 * i, gen_len=0, seed=i)[0] for i in range(2)
    ]
    profile = maskkv_compile.calibrate(model, prompts, gen_length=8, progress=False)
    assert profile.fingerprint == model_fingerprint(model.config, type(model).__name__)
    mask = model.config.mask_token_id
    expected = [
        _reference_importance(model, torch.cat([p, torch.full((1, 8), mask)], 1)) for p in prompts
    ]
    torch.testing.assert_close(
        torch.tensor(profile.importance, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64).mean(0),
        atol=1e-5,
        rtol=1e-5,
    )


def test_calibrate_a_block_diffusion_model_on_its_first_window_block_causally():
    """``block_length=b``: the prompt and masks to the end of its block, the model called with
    the block-causal mask (an independent reference through the model's own 4-D mask); the
    profile differs from one measured bidirectionally, which such a model never runs."""
    from maskkv_compile.evaluation.ruler import block_mask

    model = build("llada", layers=3)
    prompts = [
        prompt_and_masks(model, prompt_len=21 + 8 * i, gen_len=0, seed=i)[0] for i in range(2)
    ]
    profile = maskkv_compile.calibrate(model, prompts, block_length=8, progress=False)
    assert profile.meta["block_length"] == 8 and "gen_length" not in profile.meta
    expected = []
    for p in prompts:
        end = (p.shape[1] // 8 + 1) * 8
        x = torch.cat([p, torch.full((1, end - p.shape[1]), model.config.mask_token_id)], 1)
        expected.append(_reference_importance(model, x, block_mask(end, 8)))
    torch.testing.assert_close(
        torch.tensor(profile.importance, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64).mean(0),
        atol=1e-5,
        rtol=1e-5,
    )
    bidirectional = maskkv_compile.calibrate(model, prompts, gen_length=3, progress=False)
    assert not torch.allclose(
        torch.tensor(profile.importance), torch.tensor(bidirectional.importance), atol=1e-4
    )
    with pytest.raises(ValueError, match="leave gen_length unset"):
        maskkv_compile.calibrate(model, prompts, block_length=8, gen_length=8)
