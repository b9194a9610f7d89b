"""The optimized model against its references, step by step (eager backend)."""

import pytest
import torch
from helpers import MODEL_KINDS, build, kept_positions, prompt_and_masks
from reference import PromptCacheReference

import maskkv_compile
from maskkv_compile.generate import generate


def commit_most_confident(x, logits, resp_idx, mask_id):
    """One LLaDA-style step: unmask the single most confident masked response position."""
    masked = x[:, resp_idx] == mask_id
    probs = torch.softmax(logits.double(), -1)
    conf, token = probs.max(-1)
    conf = torch.where(masked, conf, -1.0)
    pick = conf.argmax(-1)
    for b in range(x.shape[0]):
        x[b, resp_idx[pick[b]]] = token[b, pick[b]]
    return x


def run_against_reference(
    model, x, resp_idx, budget, steps, tol=1e-5, policy="mask_voting_uniform", **options
):
    """Drop-in loop on the MaskKV model; every step's response logits vs the reference."""
    mask_id = model.config.mask_token_id
    config = maskkv_compile.MaskKVConfig(budget=budget, backend="eager", policy=policy, **options)
    optimized = maskkv_compile.optimize(model, config=config)
    reference = PromptCacheReference(model, budget=budget, policy=policy, **options)
    x = x.clone()
    outputs = []
    for step in range(steps):
        with torch.no_grad():
            ours = optimized(x).logits[:, resp_idx]
        theirs = reference(x, resp_idx, prefill=step == 0)
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
        outputs.append(ours)
        x = commit_most_confident(x, ours, resp_idx, mask_id)
    return optimized, reference, outputs


@pytest.mark.parametrize("family,attn", MODEL_KINDS)
def test_full_budget_refresh_every_step_matches_uncached_tokens(family, attn):
    model = build(family, attn, dtype=torch.float64)
    prompt, _ = prompt_and_masks(model, prompt_len=20, gen_len=16)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    kwargs = dict(gen_length=16, steps=16, block_length=8)
    ours = optimized.generate(prompt, **kwargs)
    uncached = generate(model, prompt, mask_token_id=model.config.mask_token_id, **kwargs)
    assert torch.equal(ours, uncached)
    assert optimized.runtime.counts.prefills == 16 and optimized.runtime.counts.steps == 0


@pytest.mark.parametrize("family,attn", MODEL_KINDS)
def test_full_budget_no_refresh_matches_prompt_cache(family, attn):
    model = build(family, attn)
    _, x = prompt_and_masks(model, prompt_len=20, gen_len=12)
    resp = torch.arange(20, 32)
    optimized, _, _ = run_against_reference(model, x, resp, budget=64, steps=6)
    assert optimized.runtime.counts.prefills == 1 and optimized.runtime.counts.steps == 5


@pytest.mark.parametrize("family,attn", MODEL_KINDS)
def test_eviction_attends_to_exactly_the_kept_entries(family, attn):
    model = build(family, attn)
    _, x = prompt_and_masks(model, prompt_len=24, gen_len=8)
    resp = torch.arange(24, 32)
    optimized, reference, outputs = run_against_reference(model, x, resp, budget=5, steps=4)
    session = optimized.runtime.last_session
    for layer, cache in enumerate(session.layers):
        ours = kept_positions(cache)
        assert ours == reference.kept_positions(layer)
        assert cache.kept_len.tolist() == [[5] * cache.kept_len.shape[1]]
    # a different budget changes what the steps compute
    other, _, other_outputs = run_against_reference(model, x, resp, budget=12, steps=2)
    assert not torch.allclose(outputs[1], other_outputs[1], atol=1e-4)


@pytest.mark.parametrize("family,attn", MODEL_KINDS)
@pytest.mark.parametrize("policy", ["maskkv", "snapkv"])
def test_recent_window_is_kept_in_every_head(family, attn, policy):
    """``recent=3``: every head of every layer keeps the 3 prompt entries nearest the response,
    the rest of its budget as the policy ranks; the steps attend to exactly that set."""
    model = build(family, attn)
    _, x = prompt_and_masks(model, prompt_len=24, gen_len=8)
    resp = torch.arange(24, 32)
    optimized, reference, _ = run_against_reference(
        model, x, resp, budget=5, steps=3, policy=policy, recent=3
    )
    assert optimized.runtime.counts.steps == 2
    for layer, cache in enumerate(optimized.runtime.last_session.layers):
        ours = kept_positions(cache)
        assert ours == reference.kept_positions(layer)
        assert all({21, 22, 23} <= set(head) for row in ours for head in row), (layer, ours)


@pytest.mark.parametrize(
    "kind,family", [("llada", "llada"), ("dream", "llada"), ("dream", "dream")]
)
def test_votes_equal_eager_attention_probabilities(kind, family):
    """What the optimized prefill graph computed, against the model's own eager forward only (no
    oracle): each layer keeps, per KV head, exactly the top-``budget`` prompt positions of the
    votes summed from the model's eager attention probabilities (mask rows, or for Dream the rows
    before them, over the prompt columns, summed over the KV head's query heads), the kept K/V
    are the model's own post-RoPE K/V at those positions, and ``prompt_mass`` is the voters'
    probability mass on the prompt. ``kind`` is the model (Llama MHA / Qwen2 GQA), ``family``
    the logits convention the optimized model is told to use."""
    budget, prompt_len, gen_len = 4, 18, 6
    # float64 weights; transformers' eager attention still takes its softmax in float32, so the
    # model's own probabilities (and the votes from them) are exact to about 1e-7
    model = build(kind, "eager", dtype=torch.float64)
    _, x = prompt_and_masks(model, prompt_len=prompt_len, gen_len=gen_len)
    optimized = maskkv_compile.optimize(
        model, budget=budget, backend="eager", policy="mask_voting_uniform", family=family
    )
    with torch.no_grad():
        optimized(x)
        own = model(x, use_cache=True, output_attentions=True)
    assert optimized.runtime.counts.prefills == 1
    voters = torch.arange(prompt_len, prompt_len + gen_len) - (1 if family == "dream" else 0)
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    layers = optimized.runtime.last_session.layers
    assert len(layers) == model.config.num_hidden_layers
    for layer, cache in enumerate(layers):
        probs = own.attentions[layer][:, :, voters][
            ..., :prompt_len
        ]  # (1, H, R, P): the model's eager softmax
        torch.testing.assert_close(cache.prompt_mass, probs.sum((2, 3)), atol=1e-6, rtol=1e-6)
        votes = probs.sum(2).view(1, kv_heads, heads // kv_heads, prompt_len).sum(2)  # (1, Hkv, P)
        top = votes.topk(budget + 1, dim=-1)
        # the top-k must be unambiguous for the comparison to mean anything: the budget-th and
        # (budget+1)-th votes at least 10x the probabilities' error apart
        gap = top.values[..., budget - 1] - top.values[..., budget]
        assert bool((gap > 1e-6).all()), (
            f"layer {layer}: votes {budget} and {budget + 1} tie ({gap.tolist()})"
        )
        assert cache.kept_len.tolist() == [[budget] * kv_heads]
        assert kept_positions(cache) == [
            [sorted(top.indices[0, h, :budget].tolist()) for h in range(kv_heads)]
        ]
        keys, values = (
            own.cache.layers[layer].keys,
            own.cache.layers[layer].values,
        )  # post-RoPE, (1, Hkv, S, D)
        for h in range(kv_heads):
            at = cache.kept_pos[0, h, :budget]
            torch.testing.assert_close(
                cache.kept_k[0, h, :budget], keys[0, h, at], atol=1e-10, rtol=1e-10
            )
            torch.testing.assert_close(
                cache.kept_v[0, h, :budget], values[0, h, at], atol=1e-10, rtol=1e-10
            )


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_infilling_a_span_in_the_middle(family):
    model = build(family)
    mask_id = model.config.mask_token_id
    _, x = prompt_and_masks(model, prompt_len=30, gen_len=0)
    resp = torch.arange(10, 18)
    x[:, resp] = mask_id
    optimized, _, _ = run_against_reference(model, x, resp, budget=64, steps=4)
    assert optimized.runtime.last_session.resp_idx.tolist() == resp.tolist()
    run_against_reference(model, x, resp, budget=6, steps=4)


def test_drop_in_loop_equals_generate():
    """An unmodified LLaDA-style loop calling model(x).logits on the whole sequence."""
    model = build("llada")
    prompt, _ = prompt_and_masks(model, prompt_len=16, gen_len=8)
    mask_id = model.config.mask_token_id

    def llada_style_loop(net, prompt, gen_length=8, steps=8):
        x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1)
        for _ in range(steps):
            mask_index = x == mask_id
            logits = net(x).logits
            p = torch.softmax(logits, dim=-1)
            x0 = logits.argmax(-1)
            x0_p = torch.gather(p, -1, x0[..., None]).squeeze(-1)
            confidence = torch.where(mask_index, x0_p, float("-inf"))
            pick = confidence.topk(1, dim=-1).indices
            x[0, pick[0]] = x0[0, pick[0]]
        return x

    optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
    via_loop = llada_style_loop(optimized, prompt)
    optimized.reset()
    via_generate = optimized.generate(prompt, gen_length=8, steps=8, block_length=8)
    assert torch.equal(via_loop, via_generate)
    assert optimized.runtime.counts.steps > 0


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_long_prompt_cache_attends_in_two_segments_and_equals_the_reference(family, monkeypatch):
    """A prompt past ``TWO_SEGMENTS_FROM``: every step attends over the kept prompt and the
    response as two segments (the kept K/V are not copied), and each step's response logits
    equal the prompt-cache reference's (float64, every prompt entry kept)."""
    from maskkv_compile.kernels import cached_attention as op

    calls = []
    two_segments = op._two_segments_cpu
    monkeypatch.setattr(op, "_two_segments_cpu", lambda *a: calls.append(1) or two_segments(*a))
    model = build(family, dtype=torch.float64)
    prompt_len = op.TWO_SEGMENTS_FROM + 37
    _, x = prompt_and_masks(model, prompt_len=prompt_len, gen_len=6)
    resp = torch.arange(prompt_len, prompt_len + 6)
    optimized, _, _ = run_against_reference(model, x, resp, budget=10**6, steps=4, tol=1e-10)
    counts = optimized.runtime.counts
    assert counts.prefills == 1 and counts.steps == 3
    assert len(calls) == 3 * model.config.num_hidden_layers  # every layer of every step
