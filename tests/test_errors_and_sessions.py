"""Bad input gets a clear error; prompts never share state; batches and short prompts."""

import logging

import pytest
import torch
from helpers import build, prompt_and_masks
from reference import PromptCacheReference

import maskkv_compile
from maskkv_compile import MaskKVConfigError, NoMaskTokenError, UnsupportedModelError
from maskkv_compile.generate import generate


@pytest.mark.parametrize("budget", [0, -3, 2.5, "64", True])
def test_bad_budget_is_refused(budget):
    with pytest.raises(MaskKVConfigError, match="budget"):
        maskkv_compile.optimize(build("llada"), budget=budget)


def test_unknown_option_is_named():
    with pytest.raises(MaskKVConfigError, match="bugdet"):
        maskkv_compile.MaskKVConfig.from_options({"bugdet": 3})


def test_no_mask_token_at_step_zero():
    model = build("llada")
    optimized = maskkv_compile.optimize(model, budget=8, backend="eager")
    prompt, _ = prompt_and_masks(model, prompt_len=12, gen_len=0)
    with pytest.raises(NoMaskTokenError, match=r"no mask token \(id 255\)"):
        optimized(prompt)


def test_causal_model_is_refused():
    model = build("llada")
    model.config.is_causal = True
    with pytest.raises(UnsupportedModelError, match="config.is_causal=True"):
        maskkv_compile.optimize(model, budget=8, backend="eager")
    # the pass itself refuses the causal mask even when the config does not say so
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = True
    model.config.is_causal = None
    _, x = prompt_and_masks(model, 10, 4)
    with pytest.raises(UnsupportedModelError, match="causal attention"):
        maskkv_compile.optimize(model, budget=8, backend="eager")(x)


class NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"mask_token_id": 9})()
        self.embed = torch.nn.Embedding(10, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, input_ids, use_cache=False):
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.head(torch.relu(self.embed(input_ids))))


def test_model_without_attention_lists_ops_seen():
    optimized = maskkv_compile.optimize(NoAttention(), budget=4, backend="eager")
    x = torch.tensor([[1, 2, 3, 9, 9]])
    with pytest.raises(UnsupportedModelError, match=r"no attention found.*ops seen: .*embedding"):
        optimized(x)


logger = logging.getLogger(__name__)  # as a model file has


class Logs(torch.nn.Module):
    """A forward that logs, as the released LLaDA file does under transformers 5 (its
    ``config.use_return_dict`` calls ``logger.warning_once``), or that breaks the graph."""

    def __init__(self, inner, graph_break=False):
        super().__init__()
        self.inner, self.config, self.graph_break = inner, inner.config, graph_break

    def forward(self, input_ids, use_cache=False):
        logger.warning_once("this attribute is deprecated")  # transformers adds it to Logger
        logger.info("forward of %d tokens", input_ids.shape[1])
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_log_calls_in_the_forward_trace_and_a_graph_break_is_named():
    model = build("llada", dtype=torch.float64)
    prompt, _ = prompt_and_masks(model, prompt_len=10, gen_len=6)
    kwargs = dict(gen_length=6, steps=6, block_length=6)
    plain = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    logs = maskkv_compile.optimize(Logs(model), budget=64, backend="eager", prompt_refresh=1)
    assert torch.equal(logs.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))
    assert logs.cache_stats()["transitions"] == {"new": 1, "refresh": 5}
    broken = maskkv_compile.optimize(Logs(model, graph_break=True), budget=8, backend="eager")
    with pytest.raises(UnsupportedModelError, match=r"cannot trace Logs.forward as one graph"):
        broken.generate(prompt, **kwargs)


def test_prompt_shorter_than_budget_is_exact():
    model = build("dream", dtype=torch.float64)
    prompt, _ = prompt_and_masks(model, prompt_len=6, gen_len=8)
    optimized = maskkv_compile.optimize(model, budget=256, backend="eager")
    out = optimized.generate(prompt, gen_length=8, steps=8, block_length=8)
    # everything kept: the prompt cache, and nothing but it
    stats = optimized.cache_stats()
    assert stats["prompt_len"] == 6
    assert all(layer["kept_per_kv_head"] == [6, 6] for layer in stats["layers"])
    ref = PromptCacheReference(model, budget=None)
    x = torch.cat([prompt, torch.full((1, 8), model.config.mask_token_id)], 1)
    resp = torch.arange(6, 14)
    optimized.reset()
    torch.testing.assert_close(optimized(x).logits[:, resp], ref(x, resp, prefill=True))
    assert out.shape == (1, 14)


def test_new_prompt_after_a_finished_one_leaks_nothing():
    model = build("llada")
    kwargs = dict(gen_length=8, steps=8, block_length=8)
    first, _ = prompt_and_masks(model, 14, 8, seed=1)
    second, _ = prompt_and_masks(model, 14, 8, seed=2)
    reused = maskkv_compile.optimize(model, budget=5, backend="eager")
    reused.generate(first, **kwargs)
    after_first = reused.generate(second, **kwargs)
    fresh = maskkv_compile.optimize(model, budget=5, backend="eager").generate(second, **kwargs)
    assert torch.equal(after_first, fresh)
    # the same prompt again starts over from a prefill and gives the same answer
    assert torch.equal(reused.generate(second, **kwargs), fresh)


def test_batch_of_two_prompts_equals_each_alone():
    model = build("dream", dtype=torch.float64)
    prompts, _ = prompt_and_masks(model, 12, 8, batch=2)
    kwargs = dict(gen_length=8, steps=8, block_length=4)
    batched = maskkv_compile.optimize(model, budget=5, backend="eager").generate(prompts, **kwargs)
    for row in range(2):
        alone = maskkv_compile.optimize(model, budget=5, backend="eager").generate(
            prompts[row : row + 1], **kwargs
        )
        assert torch.equal(batched[row : row + 1], alone)


def test_classifier_free_guidance_runs_cached_and_matches_full_budget():
    model = build("llada", dtype=torch.float64)
    prompt, _ = prompt_and_masks(model, 10, 8)
    kwargs = dict(gen_length=8, steps=8, block_length=8, cfg_scale=1.5)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", prompt_refresh=1)
    ours = optimized.generate(prompt, **kwargs)
    assert torch.equal(
        ours, generate(model, prompt, mask_token_id=model.config.mask_token_id, **kwargs)
    )


def test_generate_validates_its_arguments():
    model = build("llada")
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    prompt, _ = prompt_and_masks(model, 6, 0)
    with pytest.raises(ValueError, match="multiple of block_length"):
        optimized.generate(prompt, gen_length=10, steps=10, block_length=4)
    with pytest.raises(ValueError, match="remasking"):
        optimized.generate(prompt, gen_length=8, steps=8, block_length=8, remasking="entropy")
    with pytest.raises(ValueError, match="contains the mask token"):
        optimized.generate(torch.tensor([[1, 255]]), gen_length=8, steps=8, block_length=8)


def test_temperature_sampling_is_seeded():
    model = build("llada")
    prompt, _ = prompt_and_masks(model, 8, 8)
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager")
    kwargs = dict(gen_length=8, steps=8, block_length=8, temperature=1.0)
    a = optimized.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    b = optimized.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    c = optimized.generate(
        prompt, generator=torch.Generator().manual_seed(1), remasking="random", **kwargs
    )
    assert torch.equal(a, b) and not (a == 255).any() and not (c == 255).any()


def test_per_token_inputs_are_sliced_and_an_all_ones_mask_is_dropped():
    model = build("llada")
    _, x = prompt_and_masks(model, 16, 6)
    resp = torch.arange(16, 22)
    plain = maskkv_compile.optimize(model, budget=5, backend="eager")
    explicit = maskkv_compile.optimize(model, budget=5, backend="eager")
    positions = torch.arange(x.shape[1])[None]
    for step in range(3):
        ours = explicit(x, position_ids=positions, attention_mask=torch.ones_like(x)).logits[
            :, resp
        ]
        torch.testing.assert_close(ours, plain(x).logits[:, resp])
        x[0, 16 + step] = 7
    assert explicit.runtime.counts.steps == 2
    # different position ids at the prompt positions: a different prompt, so a new prefill
    with pytest.raises(NoMaskTokenError):
        explicit(x.masked_fill(x == 255, 3), position_ids=positions + 1)
    with pytest.raises(ValueError, match="padding"):
        explicit(x, attention_mask=torch.zeros_like(x))
