"""A seeded randomized differential test: families x prompt lengths x budgets x batch layouts
x SDPA/eager attention, each case against its reference.

Every row of every case is compared with ``PromptCacheReference`` run on that row alone
(unpadded, its own layout): the prefill's and the next step's logits at the rows the
family reads (response rows; for Dream the row before each), with the kept sets and the
votes the reference computes from materialized attention. So one case checks padding,
masked-copy (CFG) rows, infilling spans, shifted logits, per-row budgets and eviction at
once. Float64 tiny models on the eager backend; one optimized model per (family, attention,
budget), reset between cases.
"""

import random

import pytest
import torch
from dream_model import tiny_dream_style
from helpers import build, kept_positions
from reference import PromptCacheReference

import maskkv_compile

CASES = 216
FAMILIES = {
    "llama": lambda attn: build("llada", attn, dtype=torch.float64),
    "qwen2": lambda attn: build("dream", attn, dtype=torch.float64),
    "dream": lambda attn: tiny_dream_style(attn=attn, dtype=torch.float64),
}
BUDGETS = (2, 5, 64)  # 64: the whole prompt is kept
LAYOUTS = ("single", "padded", "cfg", "infill")
PAD = 250


def make_case(seed: int):
    rng = random.Random(seed)
    family, attn = rng.choice(sorted(FAMILIES)), rng.choice(("sdpa", "eager"))
    budget, layout = rng.choice(BUDGETS), rng.choice(LAYOUTS)
    gen = torch.Generator().manual_seed(seed)
    mask_id = 255
    if layout == "infill":
        n = rng.randint(10, 24)
        row = torch.randint(0, PAD, (1, n), generator=gen)
        start = rng.randint(1, n - 4)
        row[0, start : start + rng.randint(1, 3)] = mask_id
        return family, attn, budget, layout, row, None, [row[0].tolist()]
    gen_len = rng.randint(1, 5)
    lengths = [rng.randint(3, 18) for _ in range(rng.randint(2, 3) if layout == "padded" else 1)]
    width = max(lengths) + gen_len
    x = torch.full((len(lengths), width), PAD)
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, width - gen_len - n : width - gen_len] = torch.randint(0, PAD, (n,), generator=gen)
        valid[b, width - gen_len - n :] = True
    x[:, -gen_len:] = mask_id
    if layout == "cfg":  # LLaDA's batched guidance: the prompt masked in a second row
        twin = x.clone()
        twin[:, :-gen_len] = mask_id
        x, valid = torch.cat([x, twin]), torch.cat([valid, valid])
    rows = [x[b, valid[b]].tolist() for b in range(x.shape[0])]
    return family, attn, budget, layout, x, (valid if layout == "padded" else None), rows


_models: dict = {}  # (family, attn) -> model
_optimized: dict = {}  # (family, attn, budget) -> its optimized form


def optimized_for(family, attn, budget):
    """The (family, attn) model, built once, and its optimized form at ``budget``: the budgets
    of one model share its trace (``optimize`` traces a model once), as a user's would."""
    if (family, attn) not in _models:
        _models[family, attn] = FAMILIES[family](attn)
    model = _models[family, attn]
    key = (family, attn, budget)
    if key not in _optimized:
        _optimized[key] = maskkv_compile.optimize(
            model, budget=budget, backend="eager", policy="mask_voting_uniform"
        )
    optimized = _optimized[key]
    optimized.reset()
    return model, optimized


def commit_one(x, logits_rows, response, mask_id):
    """Commit the most confident masked response position of every row (in place)."""
    for b in range(x.shape[0]):
        positions = response[b].nonzero().flatten()
        masked = positions[x[b, positions] == mask_id]
        if masked.numel() == 0:
            continue
        confidence, token = logits_rows[b].softmax(-1).max(-1)
        pick = int(confidence[: masked.numel()].argmax())
        x[b, masked[pick]] = token[pick]


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("seed", range(CASES))
def test_case_against_reference(seed):
    family, attn, budget, layout, x, valid, _ = make_case(seed)
    model, optimized = optimized_for(family, attn, budget)
    shift = optimized.maskkv_config.logits_shift
    mask_id = model.config.mask_token_id
    kwargs = {}
    if valid is not None:
        kwargs = {
            "attention_mask": valid.long(),
            "position_ids": (valid.long().cumsum(-1) - 1).clamp(min=0),
        }
    x = x.clone()
    first_rows = []  # each row as the prefill saw it (the reference replays it)
    for step in range(2):
        with torch.no_grad():
            logits = optimized(x, **kwargs).logits  # (B, S, V)
        layout_ = optimized.runtime.last_session.layout
        reads = []
        for b in range(x.shape[0]):
            real = layout_.key_valid[b].nonzero().flatten()
            offset = int(real[0])
            response = layout_.response[b].nonzero().flatten()
            read = (response - shift).clamp(min=int(real[0]))
            ours = logits[b : b + 1, read]
            reference = PromptCacheReference(
                model, budget=budget, family="dream" if shift else "llada"
            )
            for replay in range(
                step + 1
            ):  # the reference's prefill saw the row as it was at step 0
                row = first_rows[b] if replay == 0 and step > 0 else x[b : b + 1, offset:]
                theirs = reference(row, response - offset, prefill=replay == 0, rows=read - offset)
            torch.testing.assert_close(
                ours, theirs, atol=1e-7, rtol=1e-7, msg=lambda m, b=b: f"case {seed} row {b}: {m}"
            )
            if step == 0:
                for layer, cache in enumerate(optimized.runtime.last_session.layers):
                    ours_kept = [[p - offset for p in head] for head in kept_positions(cache)[b]]
                    assert ours_kept == reference.kept_positions(layer)[0], (
                        f"case {seed} row {b} layer {layer}"
                    )
            reads.append(ours[0])
        if step == 0:
            first_rows = [
                x[b : b + 1, int(layout_.key_valid[b].nonzero()[0]) :].clone()
                for b in range(x.shape[0])
            ]
            assert optimized.runtime.counts.transitions == {"new": 1}
        commit_one(x, reads, layout_.response, mask_id)
    assert optimized.runtime.counts.transitions == {"new": 1, "step": 1}, (
        f"case {seed}: the step graph did not run"
    )


def test_the_cases_cover_every_combination():
    seen = {make_case(seed)[:4] for seed in range(CASES)}
    assert {(f, a) for f, a, _, _ in seen} == {(f, a) for f in FAMILIES for a in ("sdpa", "eager")}
    assert {layout for *_, layout in seen} == set(LAYOUTS) and {b for _, _, b, _ in seen} == set(
        BUDGETS
    )
