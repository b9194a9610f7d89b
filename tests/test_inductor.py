"""The Inductor-compiled graphs against the eager ones; one compile for every prompt length."""

import pytest
import torch
from helpers import build, prompt_and_masks
from torch._dynamo.utils import counters

import maskkv_compile

pytestmark = pytest.mark.inductor


def drive(model, x, steps):
    """Prefill then ``steps`` step-graph calls, committing one token each time."""
    mask_id = model.mask_token_id
    x = x.clone()
    outs = []
    for _ in range(steps + 1):
        logits = model(x).logits
        outs.append(logits)
        masked = (x == mask_id).nonzero()
        row, col = masked[0]
        x[row, col] = logits[row, col].argmax()
    return outs


@pytest.mark.parametrize("family", ["dream"])  # GQA + biases: the harder stand-in
def test_inductor_matches_eager_and_does_not_recompile(family):
    counters.clear()  # Inductor's counters are process-wide: count this test's compiles only
    model = build(family, layers=2)
    eager = maskkv_compile.optimize(model, budget=6, backend="eager")
    compiled = maskkv_compile.optimize(model, budget=6, backend="inductor")
    _, x = prompt_and_masks(model, prompt_len=20, gen_len=8)
    for ours, theirs in zip(drive(compiled, x, 2), drive(eager, x, 2)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    _, longer = prompt_and_masks(model, prompt_len=33, gen_len=8, seed=5)
    for ours, theirs in zip(drive(compiled, longer, 2), drive(eager, longer, 2)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert len(compiled.backend.runtimes) == 1, (
        "the outer graph was recompiled for a new prompt length"
    )
    runtime = compiled.backend.runtimes[0]
    assert runtime.compiled("prefill").compiles == 1 and runtime.compiled("step").compiles == 1, (
        "Inductor recompiled for a new length"
    )
    assert (
        counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] == 2
    )
