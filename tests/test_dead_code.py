"""Dead-code elimination keeps in-place writes that something reads (passes/dead_code.py).

Found by running LLaDA2.0-mini's released modeling file: its MoE gate builds a mask with
``group_mask.scatter_(1, group_idx, 1)`` and never reads the call's result; FX's own DCE
dropped the write, and at full budget the optimized model routed every token differently.
"""

import torch
import torch.fx as fx
import torch.nn.functional as F
from helpers import build, prompt_and_masks
from maskkv_compile.passes.dead_code import eliminate_dead_code
from test_exactness import run_against_reference

import maskkv_compile
from maskkv_compile.generate import generate


def _names(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op in ("call_method", "call_function")]


def _scatter_read(x, idx):
    mask = torch.zeros_like(x)
    mask.scatter_(1, idx, 1.0)  # the result is never read; ``mask`` is
    return x + mask


def _write_through_a_view(x, idx):
    mask = torch.zeros_like(x)
    mask.view(-1).index_fill_(0, idx, 1.0)
    return x * mask


def _dead_write(x, idx):
    scratch = torch.zeros_like(x)
    scratch.fill_(2.0)  # nothing reads scratch: removable
    unused = x * 3  # noqa: F841
    return x + 1


def _inplace_kwarg_and_out(x, idx):
    y = x * 1
    F.relu(y, inplace=True)
    z = torch.empty_like(x)
    torch.add(y, 1.0, out=z)
    return z


def _writes_an_input(x, idx):
    x.add_(1.0)
    return x.sum()


def test_writes_that_are_read_stay_and_dead_code_goes():
    x, idx = torch.randn(3, 4), torch.tensor([[1], [0], [3]])
    for fn in (_scatter_read, _write_through_a_view, _inplace_kwarg_and_out):
        gm = fx.symbolic_trace(fn)
        expected = fn(x.clone(), idx.flatten() if fn is _write_through_a_view else idx)
        eliminate_dead_code(gm.graph)
        gm.recompile()
        got = gm(x.clone(), idx.flatten() if fn is _write_through_a_view else idx)
        assert torch.equal(got, expected), fn.__name__
    # FX's own DCE drops the scatter_ (the reason for this module)
    plain = fx.symbolic_trace(_scatter_read)
    plain.graph.eliminate_dead_code()
    assert "scatter_" not in _names(plain)

    gm = fx.symbolic_trace(_dead_write)
    assert eliminate_dead_code(gm.graph)
    assert _names(gm) == ["<built-in function add>"]  # the dead write and product are gone

    gm = fx.symbolic_trace(_writes_an_input)
    eliminate_dead_code(gm.graph)
    assert "add_" in _names(gm)  # a graph input's storage: a side effect


class ScatterGatedMLP(torch.nn.Module):
    """An MLP scaled by a routing mask written in place, as LLaDA2's released MoE gate writes its
    group mask: ``keep.scatter_(...)``, whose result is never read."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        scores = x[..., :8]  # (B, S, 8)
        keep = torch.zeros_like(scores)
        keep.scatter_(-1, scores.topk(2, dim=-1).indices, 1.0)
        return self.mlp(x) * (scores * keep).sum(-1, keepdim=True).sigmoid()


def test_a_model_that_writes_in_place_is_exact_at_full_budget():
    model = build("llada", dtype=torch.float64)
    for layer in model.model.layers:
        layer.mlp = ScatterGatedMLP(layer.mlp)
    prompt, _ = prompt_and_masks(model, prompt_len=12, gen_len=8)
    kwargs = dict(gen_length=8, steps=8, block_length=8)
    expected = generate(model, prompt, mask_token_id=model.config.mask_token_id, **kwargs)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    assert torch.equal(optimized.generate(prompt, **kwargs), expected)
    assert optimized.cache_stats()["transitions"] == {"new": 1, "refresh": 7}
    # the step graph keeps the write too: every step equals the prompt-cache reference
    _, x = prompt_and_masks(model, prompt_len=12, gen_len=8)
    stepping, _, _ = run_against_reference(model, x, torch.arange(12, 20), budget=64, steps=4)
    assert stepping.cache_stats()["transitions"] == {"new": 1, "step": 3}
