"""Submodules dynamo cannot trace, run as ``maskkv::token_module`` (token_modules option).

The MoE below dispatches on the host the way LLaDA2.0's released ``moe_infer`` does (expert
counts read with ``.cpu()``, empty experts skipped with an ``if``): dynamo breaks the graph
there. Written for these tests from that file's structure, not copied.
"""

import weakref

import pytest
import torch
from block_loops import sdar_generate, tiny_qwen3
from helpers import build, prompt_and_masks
from torch.library import opcheck

import maskkv_compile
from maskkv_compile import MaskKVConfigError, UnsupportedModelError
from maskkv_compile.generate import generate
from maskkv_compile.token_modules import _ENTRIES, _Entry, token_module

MASK = 255


class HostDispatchMoE(torch.nn.Module):
    """Top-2 of 4 expert MLPs, tokens sorted by expert and each expert run on its tokens, the
    counts read on the host; returns (output, (router logits, expert ids)), each (B, S, ...)."""

    def __init__(self, hidden: int, experts: int = 4, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.router = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.SiLU(),
                                torch.nn.Linear(2 * hidden, hidden))
            for _ in range(experts)
        )  # fmt: skip
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (N, H)
        logits = self.router(x)  # (N, E)
        weight, expert = logits.softmax(-1).topk(2, dim=-1)  # (N, 2)
        order = expert.flatten().argsort()
        tokens = x[order // 2]
        counts = torch.bincount(expert.flatten(), minlength=len(self.experts)).cpu().tolist()
        outputs, start = [], 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            outputs.append(self.experts[index](tokens[start : start + count]))
            start += count
        sorted_out = torch.cat(outputs)
        out = torch.empty_like(sorted_out)
        out[order] = sorted_out
        y = (out.view(-1, 2, hidden) * weight[..., None].to(out.dtype)).sum(1)
        return y.view(batch, seq, hidden), (
            logits.view(batch, seq, -1),
            expert.view(batch, seq, -1),
        )


class MoELayerMLP(torch.nn.Module):
    """The decoder layer's MLP slot: the MoE's first output (as LLaDA2's layer unpacks it)."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        self.moe = HostDispatchMoE(hidden, seed=seed)

    def forward(self, x):
        y, _router = self.moe(x)
        return y


def with_moe(model):
    for index, layer in enumerate(model.model.layers):
        layer.mlp = MoELayerMLP(model.config.hidden_size, seed=index).to(model.dtype)
    return model


def test_the_graph_break_is_named_and_token_modules_runs_the_loop_exactly():
    model = with_moe(build("llada", dtype=torch.float64))
    prompt, _ = prompt_and_masks(model, prompt_len=12, gen_len=8)
    kwargs = dict(gen_length=8, steps=8, block_length=8)
    broken = maskkv_compile.optimize(model, budget=64, backend="eager")
    with pytest.raises(UnsupportedModelError, match="token_modules"):
        broken.generate(prompt, **kwargs)

    expected = generate(model, prompt, mask_token_id=model.config.mask_token_id, **kwargs)
    exact = maskkv_compile.optimize(
        model, budget=64, backend="eager", prompt_refresh=1, token_modules=("HostDispatchMoE",)
    )
    assert torch.equal(exact.generate(prompt, **kwargs), expected)
    assert exact.cache_stats()["transitions"] == {"new": 1, "refresh": 7}
    step_code = maskkv_compile.runtimes(exact)[0].graphs.step.code
    assert step_code.count("maskkv.token_module") == model.config.num_hidden_layers
    # the model is unchanged outside the optimized model's calls
    assert "forward" not in vars(model.model.layers[0].mlp.moe)

    evicting = maskkv_compile.optimize(
        model, budget=4, backend="eager", token_modules=["HostDispatchMoE"]
    )
    out = evicting.generate(prompt, **kwargs)
    assert not bool((out == model.config.mask_token_id).any())
    assert evicting.cache_stats()["transitions"] == {"new": 1, "step": 7}


def test_a_block_loop_runs_through_token_modules():
    model = with_moe(tiny_qwen3(dtype=torch.float64))
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0
    prompt = torch.randint(0, 250, (1, 13), generator=torch.Generator().manual_seed(1))
    kwargs = dict(gen_length=16, block_length=8, mask_id=MASK, steps=4)
    expected = sdar_generate(model, prompt, **kwargs)
    optimized = maskkv_compile.optimize(
        model, budget=10**6, backend="eager", token_modules=("HostDispatchMoE",)
    )
    assert torch.equal(sdar_generate(optimized, prompt, **kwargs), expected)
    transitions = optimized.cache_stats()["transitions"]
    assert set(transitions) == {"new", "extend", "step"} and transitions["extend"] == 2


class MixesTokens(torch.nn.Module):
    def forward(self, x):
        return x + x.mean(-2, keepdim=True)


def test_what_token_modules_refuses():
    with pytest.raises(MaskKVConfigError, match="tuple of module class names"):
        maskkv_compile.MaskKVConfig(token_modules="HostDispatchMoE")
    model = build("llada")
    with pytest.raises(ValueError, match=r"names \['NoSuchBlock'\].*LlamaMLP"):
        maskkv_compile.optimize(model, token_modules=("NoSuchBlock",))
    for layer in model.model.layers:
        layer.mlp = MixesTokens()
    optimized = maskkv_compile.optimize(model, backend="eager", token_modules=("MixesTokens",))
    _, x = prompt_and_masks(model, prompt_len=6, gen_len=4)
    with pytest.raises(ValueError, match="MixesTokens is not token-wise"):
        optimized(x)
    with pytest.raises(Exception, match="token_modules is an option of maskkv_compile.optimize"):
        torch.compile(model, backend="maskkv", options={"token_modules": ("MixesTokens",)})(x)


def test_token_module_opcheck():
    moe = HostDispatchMoE(16)
    handle = max(_ENTRIES, default=-1) + 1000  # a handle of this test's own
    leaves = (((16,), torch.float32), ((4,), torch.float32), ((2,), torch.int64))
    _ENTRIES[handle] = _Entry(weakref.WeakMethod(moe.forward), leaves, None)
    x = torch.randn(2, 5, 16)
    try:
        outputs = token_module(x, handle)
        y, (logits, expert) = moe(x)
        assert torch.equal(outputs[0], y) and torch.equal(outputs[2], expert)
        opcheck(torch.ops.maskkv.token_module.default, (x, handle))
    finally:
        del _ENTRIES[handle]
