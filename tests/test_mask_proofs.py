"""mask_proofs: an attention mask built from index ranges is dropped only when it provably
masks nothing, for every sequence length; the model then runs through MaskKV exactly."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from maskkv_compile.passes.mask_proofs import bound

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.tiny_models import tiny_llada

RULES = {
    # name: (rule on arange(S), what is provable for every S)
    "ge0 (transformers, torch < 2.12)": (lambda a: a[None, None, :, None] + 0 >= 0, True),
    "shifted gt": (lambda a: (a + 1) > 0, True),
    "flipped le": (lambda a: 0 <= a, True),
    "and of two": (lambda a: (a >= 0) & (a + 2 > 1), True),
    "or with one": (lambda a: (a >= 5) | (a >= 0), True),
    "ones bool": (lambda a: torch.ones(a.shape[0], dtype=torch.bool), True),
    "lt0": (lambda a: a < 0, False),
    "ge3 (true only past 3)": (lambda a: a >= 3, None),
    "sub then ge": (lambda a: a - 1 >= 0, None),
    "data dependent": (lambda a: a.float().sin() > -2, None),
}


class _Mask(torch.nn.Module):
    def __init__(self, rule):
        super().__init__()
        self.rule = rule

    def forward(self, x):
        return self.rule(torch.arange(x.shape[1]))


@pytest.mark.parametrize("name", list(RULES))
def test_bounds_of_index_range_masks(name):
    rule, want = RULES[name]
    graph = fx.symbolic_trace(_Mask(rule)).graph
    (out,) = [n for n in graph.nodes if n.op == "output"]
    assert bound(out.args[0]) is want


def _with_index_mask(rule):
    """A tiny LLaDA whose attention hands SDPA ``rule(arange(S))`` as its mask."""
    from transformers import AttentionInterface

    def attention(module, q, k, v, mask, **kwargs):
        s = q.shape[2]
        m = rule(torch.arange(s, device=q.device))
        m = m.reshape(1, 1, s, 1).expand(q.shape[0], 1, s, s)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=kwargs.get("scaling"))
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_index_mask", attention)
    model = tiny_llada(dtype=torch.float64)
    model.set_attn_implementation("test_index_mask")
    return model


def test_an_all_true_index_mask_runs_through_maskkv_exactly():
    """The masked model optimizes to what the unmasked one does: exact at full budget with a
    refresh every step (the reference contract), and the same tokens as the unmasked model's
    MaskKV on the step path under eviction."""
    model = _with_index_mask(lambda a: a + 0 >= 0)
    plain = tiny_llada(dtype=torch.float64)
    prompt = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    loop = dict(mask_token_id=255, gen_length=8, steps=8, block_length=8)
    want = generate(model, prompt, **loop)
    exact = maskkv_compile.optimize(model, budget=1024, backend="eager", prompt_refresh=1)
    assert torch.equal(generate(exact, prompt, **loop), want)
    net = maskkv_compile.optimize(model, budget=8, backend="eager")
    reference = maskkv_compile.optimize(plain, budget=8, backend="eager")
    assert torch.equal(generate(net, prompt, **loop), generate(reference, prompt, **loop))
    stats = net.cache_stats()
    assert stats["prefills"] == 1 and stats["steps"] == 7 and stats["prompt_len"] == 30


def test_a_mask_that_masks_something_stays_refused():
    model = _with_index_mask(lambda a: a >= 3)
    net = maskkv_compile.optimize(model, budget=8, backend="eager")
    prompt = torch.randint(0, 200, (1, 30))
    # built from the length alone: computed for the call's length and read, which names it
    with pytest.raises(ValueError, match="the attention mask the model builds in forward"):
        generate(net, prompt, mask_token_id=255, gen_length=8, steps=8, block_length=8)
