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


def _graph(fn):
    return torch.fx.symbolic_trace(fn)


def test_an_artifact_serves_every_size_its_guards_admit():
    """A guard relating two dims (a broadcast add asks ``Eq(s0, s1)``) is evaluated on each new
    size class: sizes that satisfy it reuse the artifact, sizes that do not compile anew."""
    from maskkv_compile.inductor import InductorGraph

    def add(tokens, x, y):
        return (tokens.float().sum() + (x + y),)  # a tuple, as the rewritten graphs return

    graph = InductorGraph(_graph(add), {"tokens": (1,), "x": (0,), "y": (0,)}, "tokens")
    tokens = torch.ones((1, 4), dtype=torch.long)
    for n in (3, 5, 9):  # x and y of one length: one compile serves them all
        x, y = torch.randn(n), torch.randn(n)
        torch.testing.assert_close(graph(tokens, x, y), add(tokens, x, y))
    assert graph.compiles == 1
    x, y = torch.randn(6), torch.randn(1)  # broadcasting: another size class (y of size 1)
    torch.testing.assert_close(graph(tokens, x, y), add(tokens, x, y))
    assert graph.compiles == 2


def test_a_guard_on_a_stride_is_checked_before_reuse():
    """A slice of a wider buffer and a contiguous tensor of the same sizes differ in a stride;
    each gets an artifact whose guards admit it, and both give eager's result."""
    from maskkv_compile.inductor import InductorGraph

    def total(tokens, kept):
        return (tokens.float().sum() + kept.exp().sum(-1),)

    graph = InductorGraph(_graph(total), {"tokens": (1,), "kept": (1,)}, "tokens")
    tokens = torch.ones((1, 4), dtype=torch.long)
    wide = torch.randn(3, 12)
    for kept in (wide[:, :5], wide[:, :7], torch.randn(3, 5), torch.randn(3, 7)):
        torch.testing.assert_close(graph(tokens, kept), total(tokens, kept))
    assert graph.compiles == 2  # one per layout (sliced, contiguous), whatever the width


def test_block_windows_of_every_length_reuse_one_compile_each():
    """LLaDA2's block loop under Inductor, over prompts of two lengths: every window a
    generation grows to (one passes 128, the head dim, as the width its (B, S) inputs are sliced
    from: a coincidence that must not tie the two sizes together) reuses one compile of each
    graph, and the tokens are eager's."""
    from maskkv_compile.bench_block import block_generate, build_model

    model = build_model(2, 128, 512, 1024)  # hidden 128: one head of 128
    loop = dict(gen_length=64, block_length=16, steps=4)
    runs = {}
    for backend in ("eager", "inductor"):
        optimized = maskkv_compile.optimize(model, budget=16, backend=backend)
        for length in (100, 150):
            prompt = torch.randint(0, 250, (1, length), generator=torch.Generator().manual_seed(1))
            runs[backend, length] = block_generate(optimized, prompt, **loop)
    for length in (100, 150):
        assert torch.equal(runs["inductor", length], runs["eager", length])
    runtime = optimized.runtime
    compiles = {g: runtime.compiled(g).compiles for g in ("prefill", "step", "step_kv", "reselect")}
    assert compiles == {"prefill": 1, "step": 1, "step_kv": 1, "reselect": 1}, compiles
    assert optimized.cache_stats()["transitions"]["extend"] == 8
