"""Ordinary reuse of one optimized model: each defect found by trying it as a new user would
(issue 21), as a regression test that failed on the runtime before the routing rewrite.

The exactness checks run at a budget of at least the prompt with ``prompt_refresh=1``, in
float64, where every call must equal the uncached model at every position holding the mask
token (invariant I1/I2 of ``test_invariants.py``)."""

import warnings
from collections import Counter

import pytest
import torch
from dream_model import tiny_dream_style
from helpers import build, prompt_and_masks
from loops import block_loop, llada_loop

import maskkv_compile
from maskkv_compile import CacheFallbackWarning

P, L = 10, 6


def exact(model, **options):
    return maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1, **options)


def assert_real_logits(ours, model, x, **kwargs):
    """Every position of ``x`` that holds the mask token gets the uncached model's logits."""
    with torch.no_grad():
        reference = model(x, **kwargs).logits
    masked = x == model.config.mask_token_id
    torch.testing.assert_close(ours[masked], reference[masked], atol=1e-9, rtol=1e-9)


class Recorder(torch.nn.Module):
    """The optimized model, checked against the uncached one at every call of a loop."""

    def __init__(self, optimized, model):
        super().__init__()
        self.optimized, self.model, self.calls = optimized, model, 0

    def forward(self, x, **kwargs):
        out = self.optimized(x, **kwargs)
        assert_real_logits(out.logits, self.model, x, **kwargs)
        self.calls += 1
        return out


def test_an_unconditional_generation_after_a_conditional_one_gets_real_logits():
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L)
    checked = Recorder(exact(model), model)
    llada_loop(checked, prompt, mask_id, L, L)  # conditional
    with pytest.warns(CacheFallbackWarning, match="no prompt"):
        llada_loop(
            checked, prompt[:, :0], mask_id, P + L, P + L
        )  # unconditional: 16 masks, no prompt
    assert checked.optimized.cache_stats()["fallbacks"] == {"no_prompt": 1}  # only its first call


def test_cfg_as_two_calls_for_two_prompts_never_takes_the_wrong_response():
    """condA, condB, uncondA at step 0: the all-mask row mirrors both sessions, so it is
    nobody's copy (a prefill without a cache); it never takes B's response."""
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    a = torch.cat([prompt_and_masks(model, 10, 0)[0], torch.full((1, 6), mask_id)], 1)
    b = torch.cat([prompt_and_masks(model, 12, 0, seed=2)[0], torch.full((1, 4), mask_id)], 1)
    optimized = maskkv_compile.optimize(
        model, budget=64, backend="eager", config=maskkv_compile.MaskKVConfig(max_sessions=4)
    )
    for x in (a, b):
        optimized(x)
    uncond_a = torch.full_like(a, mask_id)
    with pytest.warns(CacheFallbackWarning):
        assert_real_logits(optimized(uncond_a).logits, model, uncond_a)
    assert optimized.cache_stats()["transitions"] == {"new": 2, "uncached": 1}


def test_cfg_as_two_calls_after_an_abandoned_prompt_of_the_same_length_runs_cached():
    """A generation abandoned after its first call leaves a session whose response is all
    masks. The next prompt, of the same length, under CFG as two calls: its all-mask
    unconditional call mirrors both sessions, which put the response at the same positions,
    so it is the previous call's copy, as on a fresh model: cached, and the same tokens.
    (Found by a randomized run: it ran without a cache, then re-prefilled at its next call.)"""
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    abandoned, _ = prompt_and_masks(model, P, L, seed=3)
    prompt, _ = prompt_and_masks(model, P, L)
    fresh = maskkv_compile.optimize(model, budget=3, backend="eager")
    reused = maskkv_compile.optimize(model, budget=3, backend="eager")
    with torch.no_grad():  # a loop's first call (under no_grad, as the loop's), then given up
        reused(torch.cat([abandoned, torch.full((1, L), mask_id)], 1))
    before = Counter(reused.cache_stats()["transitions"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheFallbackWarning)
        tokens = llada_loop(reused, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False)
    ran = Counter(reused.cache_stats()["transitions"]) - before
    assert ran == {"new": 2, "step": 2 * (L - 1)}
    assert torch.equal(
        tokens, llada_loop(fresh, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False)
    )


def test_cfg_as_two_calls_reads_the_unconditional_call_as_a_copy_of_the_previous_one_only():
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, L)
    optimized = exact(model)
    llada_loop(optimized, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False)
    transitions = optimized.cache_stats()["transitions"]
    assert transitions == {"new": 2, "refresh": 2 * (L - 1)}  # the copy is cached: no uncached call
    assert llada_loop(optimized, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False).equal(
        llada_loop(model, prompt, mask_id, L, L, cfg_scale=1.0, batched_cfg=False)
    )


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer_step", "to_dtype"])
def test_weights_changed_in_place_are_seen(change):
    model = build("llada", dtype=torch.float64)
    _, x = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager")
    optimized(x)
    if change == "load_state_dict":
        other = build("llada", dtype=torch.float64, seed=5)
        model.load_state_dict(other.state_dict())
    elif change == "optimizer_step":
        model.train()
        loss = model(x).logits.square().mean()
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=10.0).step()
        model.zero_grad(set_to_none=True)
        model.eval()
    else:
        model.to(torch.float32).to(torch.float64)  # a round trip: new storage, same values
        with torch.no_grad():
            model.lm_head.weight.mul_(2)
    assert_real_logits(optimized(x).logits, model, x)
    stats = optimized.cache_stats()
    assert stats["transitions"].get("step", 0) == 0
    if (
        change != "to_dtype"
    ):  # a dtype change makes dynamo recompile: a new runtime, a plain new prompt
        assert stats["fallbacks"] == {"weights_changed": 1}


@pytest.mark.parametrize("lose", ["reset", "another_prompt"])
def test_the_dual_cache_after_a_lost_session_computes_every_masked_row_of_the_loops_block(lose):
    model = build("llada")
    mask_id = model.config.mask_token_id
    prompt, _ = prompt_and_masks(model, P, 0)
    other, _ = prompt_and_masks(model, P, 0, seed=9)
    optimized = maskkv_compile.optimize(
        model,
        budget=4,
        backend="eager",
        block_length=4,
        config=maskkv_compile.MaskKVConfig(max_sessions=1),
    )
    lost = []

    def before_call(step):
        if step == 5:  # mid-block: block 1 has one token committed
            if lose == "reset":
                optimized.reset()
            else:
                optimized(torch.cat([other, torch.full((1, 8), mask_id)], 1))
            lost.append(step)

    def check(x, logits, block):
        masked = block[x[0, block] == mask_id]
        assert bool((logits[0, masked] != 0).any(-1).all()), (
            "a masked row of the loop's block got zero logits"
        )

    with pytest.warns(CacheFallbackWarning, match="block_length"):
        out = block_loop(optimized, prompt, mask_id, 8, 4, before_call=before_call, check=check)
    assert lost and bool((out != mask_id).all())
    stats = optimized.cache_stats()
    assert "block_length" in stats["block_cache"]["note"]  # the resumed prompt runs plain steps
    assert stats["transitions"]["step"] > 0 and stats["fallbacks"]["block_grid"] == 1
    if lose == "another_prompt":
        assert stats["fallbacks"]["session_dropped"] == 1


def test_generate_follows_its_own_block_length():
    model = build("llada")
    prompt, _ = prompt_and_masks(model, P, 0)
    four = maskkv_compile.optimize(model, budget=4, backend="eager", block_length=4)
    ours = four.generate(prompt, gen_length=24, steps=24, block_length=24)
    right = maskkv_compile.optimize(model, budget=4, backend="eager", block_length=24)
    assert torch.equal(ours, right.generate(prompt, gen_length=24, steps=24, block_length=24))
    assert four.cache_stats()["transitions"] == right.cache_stats()["transitions"]
    assert four.cache_stats()["transitions"]["block_step"] > 0


def test_a_wrapped_generate_method_runs_without_the_dual_cache():
    """Dream's diffusion_generate unmasks anywhere: on a block_length model it must run plain
    steps."""
    model = tiny_dream_style(dtype=torch.float64)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    blocks = maskkv_compile.optimize(model, budget=64, backend="eager", block_length=4)
    plain = maskkv_compile.optimize(model, budget=64, backend="eager")
    with pytest.warns(UserWarning, match="without the dual cache"):
        ours = blocks.diffusion_generate(
            ids, max_new_tokens=8, steps=8, generator=torch.Generator().manual_seed(1)
        )
    assert torch.equal(
        ours,
        plain.diffusion_generate(
            ids, max_new_tokens=8, steps=8, generator=torch.Generator().manual_seed(1)
        ),
    )
    assert "block_step" not in blocks.cache_stats()["transitions"]


def test_generate_with_cfg_and_one_session():
    model = build("llada")
    prompt, _ = prompt_and_masks(model, P, 0)
    one = maskkv_compile.optimize(
        model, budget=4, backend="eager", config=maskkv_compile.MaskKVConfig(max_sessions=1)
    )
    two = maskkv_compile.optimize(model, budget=4, backend="eager")
    out = one.generate(prompt, gen_length=8, steps=8, block_length=8, cfg_scale=1.5)
    assert torch.equal(
        out, two.generate(prompt, gen_length=8, steps=8, block_length=8, cfg_scale=1.5)
    )
    assert one.cache_stats()["transitions"] == {"new": 1, "step": 7}


def test_plain_inputs_get_clear_errors_or_work():
    model = build("llada", dtype=torch.float64)
    _, x = prompt_and_masks(model, P, L)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager")
    with pytest.raises(ValueError, match="labels="):
        optimized(x, labels=x)
    with pytest.raises(ValueError, match="logits_to_keep=3"):
        optimized(x, logits_to_keep=3)
    # a step computes the response rows only: the other rows' states do not exist (a block
    # step returned the block's rows alone, found by a randomized hunt)
    for name in ("output_hidden_states", "output_attentions"):
        with pytest.raises(ValueError, match=f"{name}=True.*call the original model"):
            optimized(x, **{name: True})
    assert optimized(x, output_hidden_states=False).logits.shape[:2] == x.shape
    from transformers import DynamicCache

    # a loop that keeps its own cache (SDAR's, Fast-dLLM v2's) is told what to call instead
    with pytest.raises(ValueError, match=r"past_key_values=.*\[prompt ; finished blocks"):
        optimized(x, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(ValueError, match=r"\(2, 0\) holds no token"):
        optimized(torch.zeros((2, 0), dtype=torch.long))
    assert optimized(x, logits_to_keep=0).logits.shape[:2] == x.shape


def test_a_4d_padding_mask_whose_padding_rows_see_every_key():
    """transformers' _unmask_unattended opens the padding query rows to every key."""
    model = build("llada", dtype=torch.float64)
    mask_id = model.config.mask_token_id
    _, x = prompt_and_masks(model, P, L, batch=2)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    x[1, :3] = 0
    square = (valid[:, None, :] & valid[:, :, None]) | ~valid[:, :, None]  # (B, S, S)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager")
    ours = optimized(x, attention_mask=square[:, None]).logits
    optimized.reset()
    torch.testing.assert_close(ours, optimized(x, attention_mask=valid.long()).logits)
    assert bool((ours[x == mask_id] != 0).any(-1).all())


def test_cache_stats_total_every_runtime_and_runtimes_lists_optimizes():
    model = build("llada")
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    for batch in (1, 2, 3):
        _, x = prompt_and_masks(model, P, L, batch=batch)
        optimized(x)
        x[:, P] = 1
        optimized(x)
    stats = optimized.cache_stats()
    assert stats["prefills"] == 3 and stats["steps"] == 3
    assert len(stats["runtime_counts"]) == len(maskkv_compile.runtimes(optimized)) >= 2
    assert maskkv_compile.runtimes(optimized) == optimized.runtimes


@pytest.mark.parametrize("dynamic", [True, None])
def test_the_backend_serves_every_batch_size_without_a_recompile_each(dynamic):
    """dynamic=True: one graph, one runtime, for every batch size; without it, dynamo's
    automatic dynamic shapes: a static graph for the first size, one dynamic graph after."""
    torch._dynamo.reset()
    model = build("llada", dtype=torch.float64)
    compiled = torch.compile(
        model,
        backend="maskkv",
        dynamic=dynamic,
        options={
            "budget": 64,
            "mask_token_id": model.config.mask_token_id,
            "backend": "eager",
            "prompt_refresh": 1,
        },
    )
    sizes = (2, 3, 4, 5, 6, 7, 8, 9, 10, 3)  # more than dynamo's recompile limit (8)
    for batch in sizes:
        _, x = prompt_and_masks(model, 25, 8, batch=batch, seed=batch)
        for _ in range(2):
            assert_real_logits(compiled(x, use_cache=False).logits, model, x, use_cache=False)
            x[:, 25] = 3
    runtimes = maskkv_compile.runtimes(compiled)
    assert len(runtimes) == (1 if dynamic else 2)
    assert sum(r.counts.prefills + r.counts.steps for r in runtimes) == 2 * len(
        sizes
    )  # MaskKV ran every call


def test_the_backend_under_a_models_own_generate_method():
    """torch.compile returns a wrapper whose methods run the original module: the trap is named
    by runtimes(); model.compile(backend="maskkv") compiles in place, and Dream's own loop then
    runs through MaskKV, token for token the uncached loop's at full budget with refresh."""
    torch._dynamo.reset()
    model = tiny_dream_style(dtype=torch.float64)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    options = {
        "budget": 64,
        "mask_token_id": model.config.mask_token_id,
        "backend": "eager",
        "prompt_refresh": 1,
        "family": "dream",
    }

    def run(m):
        return m.diffusion_generate(
            ids, max_new_tokens=8, steps=8, generator=torch.Generator().manual_seed(1)
        )

    reference = run(model)
    wrapper = torch.compile(model, backend="maskkv", options=options)
    run(wrapper)
    with pytest.raises(RuntimeError, match=r"model.compile\(backend='maskkv'"):
        maskkv_compile.runtimes(wrapper)
    model.compile(backend="maskkv", options=options)
    assert torch.equal(run(model), reference)
    (runtime,) = maskkv_compile.runtimes(model)
    assert dict(runtime.counts.transitions) == {"new": 1, "refresh": 7}


@pytest.mark.parametrize(
    "kind, words",
    [
        ("causal", "causal (each token sees the tokens up to itself)"),
        ("window", "a causal sliding window of 3"),
    ],
)
def test_a_mask_that_is_not_padding_is_named_for_what_it_is(kind, words):
    """Causal and sliding-window masks are refused by name (a block-causal one is block
    diffusion: tests/test_block_diffusion.py)."""
    model = build("llada")
    _, x = prompt_and_masks(model, 8, 6)
    pos = torch.arange(x.shape[1])
    causal = pos[None, :] <= pos[:, None]
    allowed = {
        "causal": causal,
        "window": causal & (pos[:, None] - pos[None, :] < 3),
    }[kind]
    additive = torch.where(allowed, 0.0, float("-inf")).to(torch.bfloat16)[None, None]
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        optimized(x, attention_mask=additive)


def test_optimizes_of_one_model_share_its_trace_and_nothing_else(monkeypatch):
    """Two configurations of one model: dynamo traces it once (``shared_trace.py``), and each
    configuration keeps its own runtime, sessions and counts, calls interleaved. A weight change
    is a new trace, which both then use."""
    from maskkv_compile.shared_trace import SharedTrace

    traces = []
    handed_over = SharedTrace.__call__
    monkeypatch.setattr(
        SharedTrace, "__call__", lambda self, gm, ex: traces.append(1) or handed_over(self, gm, ex)
    )
    model = build("llada", dtype=torch.float64)
    mask = model.config.mask_token_id
    prompt, x = prompt_and_masks(model, P, L)
    evicting = maskkv_compile.optimize(model, budget=3, backend="eager")
    exact_model = exact(model)
    alone = maskkv_compile.optimize(build("llada", dtype=torch.float64), budget=3, backend="eager")
    assert torch.equal(
        llada_loop(evicting, prompt, mask, L, 3), llada_loop(alone, prompt, mask, L, 3)
    )
    assert torch.equal(
        llada_loop(exact_model, prompt, mask, L, 3), llada_loop(model, prompt, mask, L, 3)
    )
    assert len(traces) == 2  # the model's and the separately built one's; none for exact_model
    assert evicting.cache_stats()["transitions"] == {"new": 1, "step": 2}
    assert exact_model.cache_stats()["transitions"] == {"new": 1, "refresh": 2}
    assert not set(map(id, evicting.runtimes)) & set(map(id, exact_model.runtimes))

    evicting.reset()
    with torch.no_grad():  # as the loops ran (grad mode is one of dynamo's guards)
        evicting(x)  # interleaved: a call of the other configuration leaves this session alone
        exact_model(x)
        evicting(x)
        assert evicting.cache_stats()["transitions"] == {"new": 1, "step": 1}

        model.to(torch.float32)  # a weight change: one new trace, which both configurations run
        evicting(x)
        exact_model(x)
    assert len(traces) == 3
    assert evicting.cache_stats()["transitions"] == {"new": 2, "step": 1}
