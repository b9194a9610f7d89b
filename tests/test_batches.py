"""Padded batches in every spelling, and batch invariance: each row of a left-padded batch of
prompts of different lengths gets what it gets alone (float64)."""

import pytest
import torch
from dream_model import tiny_dream_style
from helpers import build
from transformers import LlamaForCausalLM

import maskkv_compile
from maskkv_compile.masks import key_padding

L = 5
LENGTHS = (6, 11, 18, 9)  # up to 3x apart
PAD = 250


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LLaDAStyle(LlamaForCausalLM):
    """A Llama whose forward takes LLaDA's additive ``attention_bias`` (B, 1, S, S)."""

    def forward(self, input_ids, attention_bias=None, **kwargs):
        return super().forward(input_ids, attention_mask=attention_bias, **kwargs)


def model_for(name: str):
    if name == "dream":
        return tiny_dream_style(dtype=torch.float64)
    base = build("llada" if name in ("llama", "llada_bias") else "dream", dtype=torch.float64)
    if name != "llada_bias":
        return base
    model = LLaDAStyle(base.config).to(torch.float64).eval()
    model.load_state_dict(base.state_dict())
    return maskkv_compile.tiny_models.set_causal(model, False)


def batch_inputs(model, lengths=LENGTHS, seed=0):
    """Left-padded [prompt][L masks] rows, the 2-D mask and cumsum positions."""
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths) + L
    x = torch.full((len(lengths), width), PAD)
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        x[row, width - L - n : width - L] = torch.randint(0, PAD, (n,), generator=gen)
        valid[row, width - L - n :] = True
    x[:, -L:] = mask_id
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return x, valid, positions


def spelled(spelling: str, valid: torch.Tensor, positions: torch.Tensor) -> dict:
    """The forward kwargs of each way loops pass padding."""
    if spelling == "hf_2d":  # a tokenizer's mask, positions left to the model (arange)
        return {"attention_mask": valid.long()}
    if spelling == "hf_2d+position_ids":
        return {"attention_mask": valid.long(), "position_ids": positions}
    if spelling == "dream_4d":  # Dream's loop: pad keys and pad queries false, tok_idx positions
        return {
            "attention_mask": valid[:, None, :, None] & valid[:, None, None, :],
            "position_ids": positions,
        }
    if spelling == "llada_bias":  # additive; padding queries see the real keys
        bias = torch.zeros(valid.shape, dtype=torch.float64).masked_fill(
            ~valid, torch.finfo(torch.float64).min
        )
        return {
            "attention_bias": bias[:, None, None, :].expand(-1, 1, valid.shape[1], -1),
            "position_ids": positions,
        }
    raise ValueError(spelling)


def shift_of(name):
    return 1 if name == "dream" else 0


def response_logits(logits, shift):
    return logits[:, -L - shift : logits.shape[1] - shift]


def loop(net, x, kwargs, shift, steps=3):
    """Greedy drop-in loop committing one token per row per step; the response logits per step."""
    x = x.clone()
    mask_id = net.config.mask_token_id
    seen = []
    with torch.no_grad():
        for _ in range(steps):
            logits = response_logits(net(x, **kwargs).logits, shift)
            seen.append(logits)
            confidence, token = logits.softmax(-1).max(-1)
            confidence = confidence.masked_fill(x[:, -L:] != mask_id, -1)
            pick = confidence.argmax(-1)
            for row in range(x.shape[0]):
                x[row, x.shape[1] - L + pick[row]] = token[row, pick[row]]
    return x, seen


CASES = [
    ("llama", "hf_2d"),
    ("llama", "hf_2d+position_ids"),
    ("qwen2", "hf_2d+position_ids"),
    ("dream", "dream_4d"),
    ("dream", "hf_2d+position_ids"),
    ("llada_bias", "llada_bias"),
]


@pytest.mark.parametrize("name,spelling", CASES)
def test_full_budget_and_refresh_equal_the_uncached_model(name, spelling):
    model = model_for(name)
    x, valid, positions = batch_inputs(model)
    kwargs = spelled(spelling, valid, positions)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    ours, ours_logits = loop(optimized, x, kwargs, shift_of(name))
    theirs, their_logits = loop(model, x, kwargs, shift_of(name))
    assert torch.equal(ours, theirs)
    for a, b in zip(ours_logits, their_logits):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    assert optimized.cache_stats()["prompt_lens"] == list(LENGTHS)


@pytest.mark.parametrize("name,spelling", CASES)
def test_every_row_under_eviction_equals_the_row_alone(name, spelling):
    model = model_for(name)
    x, valid, positions = batch_inputs(model)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    batched, batched_logits = loop(
        optimized, x, spelled(spelling, valid, positions), shift_of(name)
    )
    assert optimized.runtime.counts.transitions == {"new": 1, "step": 2}
    # the positions each row has in the batch (arange when the model is left to choose them)
    effective = (
        positions
        if "position_ids" in spelled(spelling, valid, positions)
        else torch.arange(x.shape[1]).expand_as(x)
    )
    for row, n in enumerate(LENGTHS):
        alone_kwargs = {"position_ids": effective[row : row + 1, -L - n :]}
        alone, alone_logits = loop(
            optimized, x[row : row + 1, -L - n :], alone_kwargs, shift_of(name)
        )
        assert torch.equal(batched[row, -L - n :], alone[0])
        for a, b in zip(batched_logits, alone_logits):
            torch.testing.assert_close(a[row : row + 1], b, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", ["llama", "dream"])
def test_padding_never_votes_is_never_kept_and_its_content_never_matters(name):
    model = model_for(name)
    x, valid, positions = batch_inputs(model)
    kwargs = {"attention_mask": valid.long(), "position_ids": positions}
    optimized = maskkv_compile.optimize(model, budget=4, policy="all_voting", backend="eager")
    _, first = loop(optimized, x, kwargs, shift_of(name))
    layout = optimized.runtime.last_session.layout
    for row in range(x.shape[0]):
        voters = layout.voter_idx[layout.voter_valid[row]]
        assert bool(valid[row, voters].all()), "a padding position votes"
        for cache in optimized.runtime.last_session.layers:
            kept = cache.kept_pos[row][cache.kept_pos[row] >= 0]
            assert kept.numel() and bool(valid[row, kept].all()), "a padding key is kept"
    garbage = x.clone()
    garbage[~valid] = torch.randint(
        0, 249, (int((~valid).sum()),), generator=torch.Generator().manual_seed(9)
    )
    _, second = loop(optimized, garbage, kwargs, shift_of(name))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "mask,match",
    [
        (lambda v: v.long() * 2, "values other than 0 and 1"),
        (lambda v: v.double() * 0.5, "values other than 0 and 1"),
        (
            lambda v: torch.ones(v.shape[0], 1, v.shape[1], v.shape[1], dtype=torch.bool).tril(),
            "does not see exactly",
        ),
        (lambda v: torch.randn(v.shape[0], 1, v.shape[1], v.shape[1]), "values other than 0"),
        (lambda v: v[:, :-1], "expected"),
        (lambda v: torch.zeros_like(v), "no real token"),
    ],
)
def test_masks_that_are_not_padding_are_refused_with_what_is_supported(mask, match):
    model = build("llada")
    x, valid, _ = batch_inputs(model)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    with pytest.raises(ValueError, match=match) as info:
        optimized(x, attention_mask=mask(valid))
    assert "padding and block-causal masks only" in str(info.value)


def test_key_padding_reads_every_spelling_alike():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    four_d = valid[:, None, :, None] & valid[:, None, None, :]
    bias = torch.zeros(2, 1, 3, 3).masked_fill(~four_d, float("-inf"))
    for mask in (valid.long(), four_d, bias, valid[:, None, None, :]):
        assert torch.equal(key_padding("m", mask, 2, 3), valid)
    assert (
        key_padding("m", "full", 2, 3) is None and key_padding("m", torch.ones(2, 3), 2, 3) is None
    )
