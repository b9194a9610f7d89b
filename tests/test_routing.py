"""The drop-in contract's routing rules (runtime.py), one test per rule and per case that
used to fool it: classifier-free guidance (two calls and LLaDA's batched call), a new prompt
after an all-mask input, a model that commits the mask id, restarts and refreshes. Every
test drives an unmodified loop and asserts which path ran."""

import pytest
import torch
from helpers import build, prompt_and_masks
from loops import interleaved, llada_loop

import maskkv_compile

P, L = 12, 6


def transitions(optimized) -> dict:
    return dict(optimized.runtime.counts.transitions)


def test_continuing_a_prompt_runs_the_step_graph():
    model = build("llada")
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    llada_loop(optimized, prompt, model.config.mask_token_id, L, L)
    assert transitions(optimized) == {"new": 1, "step": L - 1}
    assert optimized.cache_stats()["prompt_len"] == P


def test_cfg_as_two_calls_caches_both_halves_then_a_new_prompt_is_cached_too():
    """The unconditional call (all masks) is a masked copy of the conditional prompt: its own
    session with a prompt of P masks, never a session that swallows the next prompt."""
    model = build("llada")
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    llada_loop(optimized, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False)
    assert transitions(optimized) == {"new": 2, "step": 2 * (L - 1)}
    assert optimized.cache_stats()["prompt_lens"] == [
        P
    ]  # the unconditional half: P masked prompt positions
    other, _ = prompt_and_masks(model, P, L, seed=7)
    llada_loop(optimized, other, mask_id, L, L)  # no reset: the loop knows nothing about MaskKV
    assert transitions(optimized) == {"new": 3, "step": 3 * (L - 1)}
    stats = optimized.cache_stats()
    assert stats["prompt_len"] == P and stats["response_len"] == L
    assert all(layer["kept_per_kv_head"] == [4] * 4 for layer in stats["layers"])


def test_llada_batched_cfg_equals_the_uncached_loop_at_full_budget_and_refresh():
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L, batch=2)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    ours = llada_loop(optimized, prompt, mask_id, L, L, cfg_scale=2.0)
    assert torch.equal(ours, llada_loop(model, prompt, mask_id, L, L, cfg_scale=2.0))
    assert transitions(optimized) == {"new": 1, "refresh": L - 1}


def test_llada_batched_cfg_runs_steps_under_eviction():
    model = build("llada")
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L, batch=2)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    llada_loop(optimized, prompt, mask_id, L, L, cfg_scale=1.0)
    assert transitions(optimized) == {"new": 1, "step": L - 1}
    session = optimized.runtime.last_session
    assert session.layout.twins == (
        None,
        None,
        0,
        1,
    )  # rows 2, 3 are the masked copies of rows 0, 1
    assert session.layout.prompt_lens == [P] * 4 and session.layout.response_lens == [L] * 4
    assert session.layout.rows.tolist() == list(
        range(P, P + L)
    )  # the step computes the response only


def test_a_model_that_commits_the_mask_id_still_runs_one_prefill_per_generation():
    model = build("llada")
    mask_id = model.config.mask_token_id
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[mask_id] = 1e4  # argmax is the mask id everywhere
    model.lm_head = head
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    out = llada_loop(optimized, prompt, mask_id, L, L)
    assert bool((out[:, P:] == mask_id).all())
    assert transitions(optimized) == {"new": 1, "step": L - 1}
    optimized.generate(
        prompt, gen_length=L, steps=L, block_length=L
    )  # a generation method starts afresh
    assert transitions(optimized) == {"new": 1, "step": L - 1}


def test_a_response_position_going_back_to_the_mask_restarts():
    model = build("llada")
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    first = llada_loop(optimized, prompt, mask_id, L, L)
    second = llada_loop(
        optimized, prompt, mask_id, L, L
    )  # the same prompt generated again, no reset
    assert torch.equal(first, second)
    assert transitions(optimized) == {"new": 1, "restart": 1, "step": 2 * (L - 1)}


def test_an_all_mask_input_never_captures_the_next_prompt():
    model = build("llada")
    mask_id = model.config.mask_token_id
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    everything = torch.full((1, P + L), mask_id)
    with pytest.warns(maskkv_compile.CacheFallbackWarning, match="no prompt"):
        optimized(everything)
    optimized(
        everything
    )  # nothing tells a continuation from a new prompt: a prefill, no session kept
    assert transitions(optimized) == {"uncached": 2}
    assert optimized.cache_stats()["fallbacks"] == {"no_prompt": 2}
    assert optimized.cache_stats()["prompt_len"] == 0
    _, x = prompt_and_masks(model, P, L)
    optimized(x)
    x[0, P] = 3
    optimized(x)
    assert transitions(optimized) == {"uncached": 2, "new": 1, "step": 1}
    assert optimized.cache_stats()["prompt_len"] == P


def test_a_changed_per_token_input_at_the_prompt_is_a_new_prompt():
    model = build("llada")
    _, x = prompt_and_masks(model, P, L)
    positions = torch.arange(P + L)[None]
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    optimized(x, position_ids=positions)
    optimized(x, position_ids=positions.clone())
    shifted = positions.clone()
    shifted[0, 0] = 1
    optimized(x, position_ids=shifted)
    assert transitions(optimized) == {"new": 2, "step": 1}


@pytest.mark.parametrize("refresh", [1, 3])
def test_prompt_refresh_reruns_the_prefill_on_schedule(refresh):
    model = build("llada")
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager", prompt_refresh=refresh)
    llada_loop(optimized, prompt, model.config.mask_token_id, L, L)
    expected = {"new": 1, "refresh": (L - 1) // refresh}
    if L - 1 - expected["refresh"]:
        expected["step"] = L - 1 - expected["refresh"]
    assert transitions(optimized) == expected


def test_rows_with_different_mask_layouts_each_get_their_own_response():
    """An infilling batch whose rows mask different spans: each row equals itself alone."""
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    _, x = prompt_and_masks(model, P + L, 0, batch=2)
    x[0, 3:7] = mask_id
    x[1, 10:16] = mask_id
    optimized = maskkv_compile.optimize(model, budget=5, backend="eager")
    batch = optimized(x).logits
    assert optimized.runtime.last_session.layout.rows.tolist() == [3, 4, 5, 6, *range(10, 16)]
    for row in range(2):
        optimized.reset()
        alone = optimized(x[row : row + 1]).logits
        torch.testing.assert_close(batch[row : row + 1], alone, atol=1e-10, rtol=1e-10)
    # response-only logits need rectangular responses
    with (
        pytest.raises(ValueError, match="same number of response positions"),
        maskkv_compile.response_logits_only(),
    ):
        optimized(x)


def test_a_row_masking_part_of_another_rows_prompt_is_its_own_row_not_a_cfg_copy():
    """Two infilling variants of one sequence: the second masks an extra span. Only a row that
    masks the other's whole prompt is read as CFG's unconditional copy."""
    model = build("llada")
    mask_id = model.config.mask_token_id
    _, x = prompt_and_masks(model, P + L, 0)
    x = x.repeat(2, 1)
    x[:, 14:18] = mask_id
    x[1, 2:5] = mask_id  # an extra span: response too
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    logits = optimized(x).logits
    layout = optimized.runtime.last_session.layout
    assert layout.twins == (None, None)
    assert layout.response[1].nonzero().flatten().tolist() == [2, 3, 4, 14, 15, 16, 17]
    assert bool((logits[1, 2:5] != 0).any(-1).all())  # the extra span's logits are returned


def _greedy(call, prompt, gen_length, mask_id, per_call):
    """LLaDA's loop as a generator (it yields after every model call, so that generations can
    be served in turn): greedy, ``per_call`` tokens a call. Returns the (1, P + L) tokens."""
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], 1)
    while (x == mask_id).any():
        with torch.no_grad():
            logits = call(x).logits
        yield
        confidence, token = logits.softmax(-1).max(-1)
        confidence = confidence.masked_fill(x != mask_id, -1)
        pick = confidence.topk(min(per_call, int((x == mask_id).sum())), -1).indices
        x[0, pick[0]] = token[0, pick[0]]
    return x


def test_a_generation_of_the_same_prompt_started_meanwhile_keeps_the_first_ones_session():
    """A second generation of one prompt (two tokens a call) starts while the first (one token a
    call) is under way, and the two are served a call each in turn: a server's requests, or n
    samples of one prompt. The second's first call restarted the first's session in place, and
    from then on each call restarted the session the other had left: a prefill per call,
    re-voted with what masks were left. A restarted session now stays live, and a call goes on
    with the session its own last call left: each generation gets its tokens alone, with one
    prefill each. (Started together, their first calls are the very same call, which a loop
    that commits nothing at a call also makes: the second then steps on the first's prefill.)
    Found by a randomized hunt."""
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L)

    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    first, second = (_greedy(optimized, prompt, L, mask_id, n) for n in (1, 2))
    next(first)  # the first generation's first call
    got = interleaved([first, second])
    for i, per_call in enumerate((1, 2)):
        fresh = maskkv_compile.optimize(model, budget=4, backend="eager")
        alone = interleaved([_greedy(fresh, prompt, L, mask_id, per_call)])[0]
        assert torch.equal(got[i], alone)
    counts = transitions(optimized)
    assert (counts["new"], counts.get("restart", 0)) == (1, 1)
    assert counts["step"] == (L - 1) + (L // 2 - 1)
