"""Issue 23: SDAR's released block loop, which keeps its own KV cache (``kv_loop.py``), run
unmodified on a MaskKV model.

* exactness: at a budget above the window, the tokens equal the same loop on the plain model
  (with its real cache) and the window loop's, in float64, over seeded cases (blocks 4-16,
  prompts shorter than a block and not multiples of it, batch 1-2, static and dynamic
  remasking), and the path that ran is the cached one (one ``new``, an ``extend`` a window);
* eviction: every refinement call's logits are finite and the cache stays within the budget;
* a cache object is one generation; calls off the protocol are refused with what was seen.
"""

import random

import pytest
import torch
from block_loops import block_causal_mask, sdar_generate
from helpers import reset_or_perturb

import maskkv_compile
from maskkv_compile.sdar_standin import sdar_cached_generate, tiny_sdar

MASK = 255


def _model(dtype=torch.float64):
    model = tiny_sdar(dtype=dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0  # a trained dLLM never predicts the mask
    return model


def _prompt(batch, length, seed):
    ids = torch.randint(0, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(ids == MASK, 0)


@pytest.fixture(scope="module")
def pair():
    model = _model()
    return model, maskkv_compile.optimize(model, budget=10**6, backend="eager")


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("seed", range(12))
def test_full_budget_gives_the_plain_loops_tokens_on_the_cached_path(pair, seed):
    model, optimized = pair
    rng = random.Random(seed)
    block = rng.choice([4, 8, 16])
    prompt = _prompt(rng.choice([1, 2]), rng.randint(2, 3 * block + 1), seed)
    kwargs = dict(
        gen_length=rng.randint(1, 3) * block - rng.randint(0, block - 1),
        block_length=block,
        mask_id=MASK,
        steps=rng.choice([2, 4]),
        remasking=rng.choice(["low_confidence_static", "low_confidence_dynamic"]),
    )
    reference = sdar_cached_generate(model, prompt, **kwargs)
    # the cached loop means the window loop: the same tokens
    assert torch.equal(sdar_generate(model, prompt, mask_kind="bool", **kwargs), reference)
    optimized.reset()
    got = sdar_cached_generate(optimized, prompt, **kwargs)
    assert torch.equal(got, reference), kwargs
    stats = optimized.cache_stats()
    p, total = prompt.shape[1], reference.shape[1]
    windows = -(-total // block) - p // block
    cached = windows - (p < block)  # a window of one block has no prefix: it runs whole
    transitions = stats["transitions"]
    assert transitions.get("new", 0) == (cached > 0)
    assert transitions.get("extend", 0) == max(cached - 1, 0)
    assert transitions.get("uncached", 0) >= (p < block)
    assert stats["fallbacks"] == {}
    if cached:
        assert stats["prompt_len"] > 0  # the last window's prefix is cached


def test_the_prefill_computes_nothing_and_the_first_step_prefills_the_window(pair):
    model, optimized = pair
    optimized.reset()
    from transformers import DynamicCache

    cache = DynamicCache()
    prompt = _prompt(1, 8, seed=1)
    out = optimized(prompt, past_key_values=cache, use_cache=True, store_kv=True)
    vocab = model.get_output_embeddings().weight.shape[0]
    assert out.logits.shape == (1, 8, vocab) and not out.logits.any()
    assert optimized.cache_stats()["prefills"] == 0
    block = torch.full((1, 4), MASK)
    logits = optimized(block, past_key_values=cache, use_cache=True, store_kv=False).logits
    stats = optimized.cache_stats()
    assert logits.shape == (1, 4, vocab) and dict(stats["transitions"]) == {"new": 1}
    assert stats["prompt_len"] == 8
    window = torch.cat([prompt, block], 1)  # blocks of 4: the prompt's two, then this one
    plain = model(window, attention_mask=block_causal_mask(12, 4, kind="bool")).logits[:, 8:]
    torch.testing.assert_close(logits, plain)
    assert cache.get_seq_length() == 0  # the loop's cache object is never written


def test_under_eviction_every_step_has_real_logits_and_the_cache_stays_bounded():
    model = _model(torch.float32)
    optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
    seen = []

    def call(*args, **kwargs):
        out = optimized(*args, **kwargs)
        if not kwargs["store_kv"]:
            seen.append(bool(torch.isfinite(out.logits).all() and out.logits.abs().sum() > 0))
        return out

    prompt = _prompt(1, 37, seed=2)
    out = sdar_cached_generate(
        model, prompt, gen_length=20, block_length=8, mask_id=MASK, steps=4, call=call
    )
    assert out.shape == (1, 57) and not (out == MASK).any()
    assert seen and all(seen)
    stats = optimized.cache_stats()
    # windows end at 40 (the prompt's tail and the first masks), 48, 56 and 64
    assert dict(stats["transitions"])["extend"] == 3 and stats["fallbacks"] == {}
    for layer in stats["layers"]:
        assert max(layer["kept_per_kv_head"]) <= 6


def test_a_cache_is_one_generation_and_a_fresh_one_starts_again(pair):
    model, optimized = pair
    optimized.reset()
    prompt = _prompt(1, 13, seed=5)
    kwargs = dict(gen_length=9, block_length=4, mask_id=MASK, steps=2)
    first = sdar_cached_generate(optimized, prompt, **kwargs)
    second = sdar_cached_generate(optimized, prompt, **kwargs)  # a fresh DynamicCache
    other = sdar_cached_generate(optimized, _prompt(1, 13, seed=6), **kwargs)
    assert torch.equal(first, second)
    assert torch.equal(other, sdar_cached_generate(model, _prompt(1, 13, seed=6), **kwargs))


def _cache():
    from transformers import DynamicCache

    return DynamicCache()


@pytest.mark.parametrize(
    "calls, what",
    [
        # positions that do not continue what the cache holds
        ([(8, True, {"position_ids": torch.arange(1, 9)[None]})], "do not continue"),
        # a stored call holding the mask token
        ([(8, True, {}), (4, True, {"mask_at": 0})], "mask token"),
        # a refinement call that is not one whole block of the grid
        ([(8, True, {}), (4, False, {}), (3, False, {})], "one whole block"),
        # a prefill of blocks of 4, then blocks of 8; a prefill of one block of 8, then of 4
        ([(8, True, {"prefill_block": 4}), (8, False, {})], "one whole block"),
        ([(8, True, {"prefill_block": 8}), (4, False, {})], "one whole block"),
        # a refinement call whose mask hides keys
        ([(8, True, {}), (4, False, {"hide": True})], "hides some keys"),
        # a prefill mask that is not block-causal
        ([(8, True, {"causal": True})], "not block-causal"),
        # another batch size on the same cache
        ([(8, True, {}), (4, False, {"batch": 2})], "pass a fresh cache"),
    ],
)
def test_calls_off_the_protocol_are_refused_with_what_was_seen(pair, calls, what):
    _, optimized = pair
    optimized.reset()
    cache, held = _cache(), 0
    with pytest.raises(ValueError, match=what):
        for n, store, how in calls:
            ids = _prompt(how.get("batch", 1), n, seed=n) if store else torch.full((1, n), MASK)
            ids = ids.expand(how.get("batch", 1), -1)
            if "mask_at" in how:
                ids = ids.clone()
                ids[:, how["mask_at"]] = MASK
            kwargs = {"position_ids": torch.arange(held, held + n)[None]}
            kwargs.update({k: v for k, v in how.items() if k == "position_ids"})
            if how.get("hide"):
                kwargs["attention_mask"] = torch.ones(1, n, held + n).tril(held)
            if "prefill_block" in how:
                blocks = torch.arange(n) // how["prefill_block"]
                kwargs["attention_mask"] = (blocks[None, :] <= blocks[:, None]).float()[None]
            if how.get("causal"):
                kwargs["attention_mask"] = torch.ones(1, n, n).tril()
            optimized(ids, past_key_values=cache, use_cache=True, store_kv=store, **kwargs)
            held += n if store else 0


def test_a_cache_without_the_store_flag_is_still_refused(pair):
    _, optimized = pair
    with pytest.raises(ValueError, match="past_key_values= is not supported.*store_kv"):
        optimized(torch.full((1, 4), MASK), past_key_values=_cache(), use_cache=True)


@pytest.mark.parametrize("seed", range(3))
def test_random_sequences_of_generations_leak_nothing(seed):
    """One optimized model drives a seeded sequence of cached-loop generations (prompts, blocks,
    batch sizes, remasking), window-loop generations, resets and in-place weight changes mixed
    in; every generation equals the plain model's with the weights of the moment."""
    rng = random.Random(seed)
    model = _model()
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    for _ in range(12):
        action = rng.choice(["cached", "cached", "window", "reset", "weights"])
        if reset_or_perturb(action, rng, model, optimized):
            continue
        block = rng.choice([4, 8])
        prompt = _prompt(rng.choice([1, 2]), rng.randint(2, 2 * block + 3), rng.randrange(100))
        kwargs = dict(gen_length=rng.randint(1, 2 * block), block_length=block, mask_id=MASK)
        kwargs["steps"] = rng.choice([1, 2, 4])
        if action == "cached":
            got = sdar_cached_generate(optimized, prompt, **kwargs)
            reference = sdar_cached_generate(model, prompt, **kwargs)
        else:
            got = sdar_generate(optimized, prompt, mask_kind="bool", **kwargs)
            reference = sdar_generate(model, prompt, mask_kind="bool", **kwargs)
        assert torch.equal(got, reference), (action, kwargs, prompt.shape)


@pytest.mark.inductor
def test_inductor_matches_eager_on_the_cached_loop_under_eviction():
    model = _model()  # the configuration of test_block_diffusion's Inductor test: its graphs
    prompt = _prompt(1, 45, seed=7)
    kwargs = dict(gen_length=24, block_length=8, mask_id=MASK, steps=2)
    runs = {}
    for backend in ("eager", "inductor"):
        optimized = maskkv_compile.optimize(model, budget=5, backend=backend)
        runs[backend] = sdar_cached_generate(optimized, prompt, **kwargs)
        transitions = dict(optimized.cache_stats()["transitions"])
        assert transitions["new"] == 1 and transitions["extend"] == 3, transitions  # 4 windows
    assert torch.equal(runs["inductor"], runs["eager"])
