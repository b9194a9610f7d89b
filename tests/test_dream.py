"""Dream (token i predicted at row i-1) through MaskKV: the family setting, Dream's own
``diffusion_generate`` on the optimized model, the project's ``dream_generate``, and each
step against the prompt-cache reference at the rows Dream's loop reads."""

import pytest
import torch
from dream_model import DREAM_ALGS, tiny_dream_style
from helpers import build, kept_positions
from reference import PromptCacheReference

import maskkv_compile
from maskkv_compile.dream import dream_generate

P, L = 14, 6


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny float64 matmuls: threads only contend on 2 cores
    yield
    torch.set_num_threads(threads)


def prompt_ids(batch=1, length=P, seed=0):
    return torch.randint(0, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(lengths=(5, 9, 14), seed=3):
    """Left-padded prompts of different lengths and their 2-D attention mask."""
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), 254)  # the pad id
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, longest - n :] = prompt_ids(1, n, seed + row)[0]
        mask[row, longest - n :] = 1
    return ids, mask


def test_the_family_is_detected_and_can_be_overridden():
    model = tiny_dream_style()
    assert maskkv_compile.optimize(model, backend="eager").maskkv_config.family == "dream"
    assert (
        maskkv_compile.optimize(model, backend="eager", family="llada").maskkv_config.family
        == "llada"
    )
    assert (
        maskkv_compile.optimize(build("dream"), backend="eager").maskkv_config.family == "llada"
    )  # a Qwen2
    with pytest.raises(maskkv_compile.MaskKVConfigError, match="family"):
        maskkv_compile.optimize(model, family="gpt")


@pytest.mark.parametrize("alg", DREAM_ALGS)
@pytest.mark.parametrize("padded", [False, True])
def test_diffusion_generate_on_the_optimized_model_equals_the_uncached_model(alg, padded):
    """Whole prompt kept + a prefill every step: Dream's own loop, token for token."""
    model = tiny_dream_style(dtype=torch.float64)
    ids, mask = padded_batch() if padded else (prompt_ids(), None)
    kwargs = dict(attention_mask=mask, max_new_tokens=L, steps=L, alg=alg, temperature=0.0)
    torch.manual_seed(5)
    theirs = model.diffusion_generate(ids, **kwargs)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    torch.manual_seed(5)
    ours = optimized.diffusion_generate(ids, **kwargs)
    assert torch.equal(ours, theirs)
    assert optimized.runtime.counts.transitions == {"new": 1, "refresh": L - 1}


@pytest.mark.parametrize("padded", [False, True])
def test_diffusion_generate_under_eviction_runs_the_step_graph(padded):
    model = tiny_dream_style()
    ids, mask = padded_batch() if padded else (prompt_ids(), None)
    optimized = maskkv_compile.optimize(model, budget=3, backend="eager")
    out = optimized.diffusion_generate(
        ids, attention_mask=mask, max_new_tokens=L, steps=L, alg="entropy"
    )
    assert not bool((out[:, -L:] == model.config.mask_token_id).any())
    stats = optimized.cache_stats()
    assert stats["transitions"] == {"new": 1, "step": L - 1}
    lengths = mask.sum(1).tolist() if padded else [P]
    assert stats["prompt_lens"] == lengths
    assert all(layer["kept_per_row"] == [[3, 3]] * len(lengths) for layer in stats["layers"])
    # the step computes the last prompt row too: it holds the first response token's logits
    assert optimized.runtime.last_session.layout.rows.tolist() == list(
        range(ids.shape[1] - 1, ids.shape[1] + L)
    )


def test_padding_right_before_a_response_is_refused_where_the_row_before_is_read():
    """Dream reads token i's logits at row i-1. A right-padded row of Dream's own loop puts a
    pad row there, which attends to no key: the uncached model's logits at it are not the
    prompt's (found by running the released Dream files). Refused, naming row and position;
    padding after the response, or on the left, runs."""
    model = tiny_dream_style()
    ids, mask = padded_batch()
    right = mask.flip(1)  # (B, P) 1s first, then padding
    ids = torch.where(right.bool(), ids.flip(1), ids)  # the same tokens, padded on the right
    optimized = maskkv_compile.optimize(model, budget=3, backend="eager")
    with pytest.raises(ValueError, match=r"row 0 has padding at position 13, right before"):
        optimized.diffusion_generate(ids, attention_mask=right, max_new_tokens=L, steps=L)
    mask_id = model.config.mask_token_id
    x = torch.cat([ids[1:2, :9], torch.full((1, L), mask_id), ids[1:2, 9:]], dim=1)
    keys = torch.cat([right[1:2, :9], torch.ones(1, L, dtype=torch.long), right[1:2, 9:]], 1)
    optimized(x, attention_mask=keys)  # padding after the response: read rows are real
    assert optimized.cache_stats()["transitions"] == {"new": 1}


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus"])
def test_dream_generate_on_the_optimized_model_equals_the_uncached_model(alg):
    model = tiny_dream_style(dtype=torch.float64)
    ids, mask = padded_batch()
    kwargs = dict(
        mask_token_id=model.config.mask_token_id,
        attention_mask=mask,
        max_new_tokens=L,
        steps=L,
        alg=alg,
    )
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    assert torch.equal(
        dream_generate(optimized, ids, **kwargs), dream_generate(model, ids, **kwargs)
    )
    small = maskkv_compile.optimize(model, budget=3, backend="eager")
    dream_generate(small, ids, **kwargs)
    assert small.runtime.counts.transitions == {"new": 1, "step": L - 1}


def dream_steps(model, budget, steps=4, **options):
    """A Dream-style drop-in loop (``self(x, "full", None)``, logits shifted by the loop) on the
    optimized model; every step's read rows against the prompt-cache reference."""
    mask_id = model.config.mask_token_id
    x = torch.cat([prompt_ids(), torch.full((1, L), mask_id)], dim=1)
    resp, read = torch.arange(P, P + L), torch.arange(P - 1, P + L - 1)
    optimized = maskkv_compile.optimize(model, budget=budget, backend="eager", **options)
    reference = PromptCacheReference(model, budget=budget, family="dream", **options)
    for step in range(steps):
        logits = optimized(x, "full", None).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's shift
        ours = logits[:, resp]
        torch.testing.assert_close(
            ours, reference(x, resp, prefill=step == 0, rows=read), atol=1e-5, rtol=1e-5
        )
        masked = (x[0, resp] == mask_id).nonzero().flatten()
        confidence, token = ours[0, masked].softmax(-1).max(-1)
        pick = masked[confidence.argmax()]
        x[0, P + pick] = token[confidence.argmax()]
    assert optimized.runtime.counts.transitions == {"new": 1, "step": steps - 1}
    return optimized, reference


def test_whole_prompt_without_refresh_matches_the_prompt_cache_step_by_step():
    dream_steps(tiny_dream_style(), budget=64)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eviction_keeps_the_top_k_of_the_shifted_votes(attn):
    optimized, reference = dream_steps(
        tiny_dream_style(attn=attn), budget=5, policy="mask_voting_uniform"
    )
    for layer, cache in enumerate(optimized.runtime.last_session.layers):
        assert kept_positions(cache) == reference.kept_positions(layer)
