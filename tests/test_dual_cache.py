"""The dual cache (``block_length``) against a dual-cache reference written here, step by step.

``DualCacheReference`` runs the original model (eager torch, transformers' attention
registry) with an attention function that follows the documented rule (``dual_cache.py``):
at the prefill, full attention, recording each layer's post-RoPE K/V of the prompt; at a
block refresh, every query attends to [recorded prompt K/V ; current response K/V] and the
response K/V are recorded; at a block step, every query attends to [recorded prompt K/V ;
recorded response K/V outside the current block ; current K/V of the block]. With
``kept`` (per layer, row and KV head: the prompt positions kept) only those prompt entries
are attended to: the eviction test takes them from the optimized model's cache, since which
entries are kept is tested in test_exactness.py and test_budgets.py.
"""

import copy

import pytest
import torch
from helpers import build, kept_positions, prompt_and_masks
from transformers import AttentionInterface

import maskkv_compile

_NAME = "maskkv_test_dual_cache_reference"


class DualCacheReference:
    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.prompt_kv, self.response_kv = {}, {}
        self.kept = (
            None  # layer -> [row][kv head] -> kept prompt positions (None: the whole prompt)
        )
        self.mode, self.prompt, self.response, self.block = "prefill", None, None, None
        AttentionInterface.register(_NAME, self._attention)
        self.model.set_attn_implementation(_NAME)

    def _attention(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        assert attention_mask is None
        layer = module.layer_idx
        batch, heads = query.shape[:2]
        group = heads // key.shape[1]
        if self.mode == "prefill":
            self.prompt_kv[layer] = (key[:, :, self.prompt], value[:, :, self.prompt])
            weights = torch.softmax(
                query @ key.repeat_interleave(group, 1).transpose(-2, -1) * scaling, -1
            )
            return (weights @ value.repeat_interleave(group, 1)).transpose(1, 2).contiguous(), None
        if self.mode == "refresh":
            self.response_kv[layer] = (key[:, :, self.response], value[:, :, self.response])
        prompt_k, prompt_v = self.prompt_kv[layer]
        out = torch.empty_like(query)
        for b in range(batch):
            for h in range(heads):
                kv = h // group
                keep = (
                    list(range(len(self.prompt)))
                    if self.kept is None
                    else [self.prompt.index(p) for p in self.kept[layer][b][kv]]
                )
                keys, values = [prompt_k[b, kv, keep]], [prompt_v[b, kv, keep]]
                if self.mode == "refresh":
                    keys.append(key[b, kv, self.response])
                    values.append(value[b, kv, self.response])
                else:
                    outside = [i for i, p in enumerate(self.response) if p not in self.block]
                    keys += [self.response_kv[layer][0][b, kv, outside], key[b, kv, self.block]]
                    values += [self.response_kv[layer][1][b, kv, outside], value[b, kv, self.block]]
                weights = torch.softmax(query[b, h] @ torch.cat(keys).T * scaling, -1)
                out[b, h] = weights @ torch.cat(values)
        return out.transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def __call__(self, x, response: list[int], mode: str, block: list[int] = ()):
        self.mode, self.response, self.block = mode, response, list(block)
        self.prompt = [i for i in range(x.shape[1]) if i not in response]
        return self.model(x, use_cache=False).logits


def drive(model, x, response, block_length, budget=None, use_kept=False, tol=1e-5):
    """A drop-in semi-autoregressive loop (one token per step, most confident masked position
    of the current block, LLaDA's rule) on the dual-cache model; each call's logits against
    the reference under the mode the documented rule gives."""
    mask_id = model.config.mask_token_id
    shift = 1 if model.config.model_type == "qwen2" else 0
    optimized = maskkv_compile.optimize(
        model,
        budget=budget or 4096,
        backend="eager",
        block_length=block_length,
        **({"family": "dream"} if shift else {}),
    )
    reference = DualCacheReference(model)
    blocks = [response[i : i + block_length] for i in range(0, len(response), block_length)]
    x, cached, modes = x.clone(), None, []
    for call in range(len(response)):
        current = next(i for i, blk in enumerate(blocks) if bool((x[:, blk] == mask_id).any()))
        mode = "prefill" if call == 0 else ("block" if cached == current else "refresh")
        cached = current if mode != "prefill" else None
        with torch.no_grad():
            ours = optimized(x).logits
        if mode == "prefill" and use_kept:
            reference.kept = {
                layer: kept_positions(cache)
                for layer, cache in enumerate(optimized.runtime.last_session.layers)
            }
        theirs = reference(x, response, mode, blocks[current])
        compared = response if mode != "block" else blocks[current]
        rows = [p - shift if p - shift >= 0 else p for p in compared]
        torch.testing.assert_close(ours[:, rows], theirs[:, rows], atol=tol, rtol=tol)
        if mode == "block":  # response rows outside the block (and not read for it) are zeros
            outside = sorted({p - shift for p in response} - set(blocks[current]) - set(rows))
            assert not ours[:, outside].any()
        modes.append(mode)
        probs = torch.softmax(ours.double(), -1)
        conf, token = probs.max(-1)
        block = torch.tensor(blocks[current])
        read = block - shift
        conf_block = torch.where(x[:, block] == mask_id, conf[:, read], -1.0)
        pick = conf_block.argmax(-1)
        for b in range(x.shape[0]):
            x[b, block[pick[b]]] = token[b, read[pick[b]]]
    return optimized, x, modes


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dual_cache_whole_prompt_matches_reference(family):
    model = build(family)
    _, x = prompt_and_masks(model, prompt_len=20, gen_len=16)
    optimized, out, modes = drive(model, x, list(range(20, 36)), block_length=4)
    assert (
        modes
        == ["prefill"] + ["refresh", "block", "block"] + ["refresh", "block", "block", "block"] * 3
    )
    stats = optimized.cache_stats()
    assert stats["transitions"] == {"new": 1, "block_refresh": 4, "block_step": 11}
    assert stats["block_cache"]["current_block"] == 3 and stats["block_cache"]["note"] is None
    assert (out != model.config.mask_token_id).all()


def test_dual_cache_under_eviction_matches_reference_on_the_kept_entries():
    model = build("llada")
    _, x = prompt_and_masks(model, prompt_len=24, gen_len=8, batch=2)
    optimized, _, _ = drive(model, x, list(range(24, 32)), block_length=4, budget=5, use_kept=True)
    assert optimized.runtime.last_session.layers[0].kept_len.tolist() == [[5] * 4] * 2
    assert optimized.cache_stats()["transitions"] == {"new": 1, "block_refresh": 2, "block_step": 5}


def test_generate_with_blocks_equals_the_drop_in_loop():
    """LLaDA's own loop (response_logits_only) on the dual cache: same tokens as the drop-in
    loop."""
    model = build("llada")
    prompt, x = prompt_and_masks(model, prompt_len=20, gen_len=16)
    _, via_loop, _ = drive(model, x, list(range(20, 36)), block_length=4)
    optimized = maskkv_compile.optimize(model, budget=4096, backend="eager", block_length=4)
    out = optimized.generate(prompt, gen_length=16, steps=16, block_length=4)
    assert torch.equal(out, via_loop)
    assert optimized.cache_stats()["transitions"] == {
        "new": 1,
        "block_refresh": 4,
        "block_step": 11,
    }


def test_rows_with_different_response_lengths_fall_back_to_plain_steps():
    model = build("llada")
    mask_id = model.config.mask_token_id
    _, x = prompt_and_masks(model, prompt_len=20, gen_len=8, batch=2)
    x[1, 20:22] = 3  # row 1: 6 response positions
    optimized = maskkv_compile.optimize(model, budget=4096, backend="eager", block_length=4)
    plain = maskkv_compile.optimize(model, budget=4096, backend="eager")
    for _ in range(3):
        ours, theirs = optimized(x).logits, plain(x).logits
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
        x[:, 27] = 5
        x[:, 26 if (x[:, 26] == mask_id).all() else 25] = 5
    stats = optimized.cache_stats()
    assert stats["transitions"] == {"new": 1, "step": 2}
    assert "different numbers of response positions" in stats["block_cache"]["note"]


def test_block_length_option_is_validated_and_off_by_default():
    with pytest.raises(maskkv_compile.MaskKVConfigError, match="block_length"):
        maskkv_compile.MaskKVConfig(block_length=0)
    model = build("llada")
    optimized = maskkv_compile.optimize(model, budget=4096, backend="eager")
    _, x = prompt_and_masks(model, prompt_len=20, gen_len=8)
    optimized(x), optimized(x)
    assert optimized.cache_stats()["transitions"] == {"new": 1, "step": 1}
    assert optimized.cache_stats()["block_cache"] is None


@pytest.mark.inductor
def test_inductor_block_steps_do_not_recompile():
    model = build("llada")
    prompt, _ = prompt_and_masks(model, prompt_len=20, gen_len=16)
    compiled = maskkv_compile.optimize(model, budget=4096, backend="inductor", block_length=4)
    eager = maskkv_compile.optimize(model, budget=4096, backend="eager", block_length=4)
    ours = compiled.generate(prompt, gen_length=16, steps=16, block_length=4)
    assert torch.equal(ours, eager.generate(prompt, gen_length=16, steps=16, block_length=4))
    runtime = compiled.runtime
    assert runtime.counts.transitions == {"new": 1, "block_refresh": 4, "block_step": 11}
    assert runtime.compiled("step").compiles == 1, (
        "Inductor recompiled the step graph for the block's rows"
    )


def test_cfg_runs_block_steps_on_both_halves():
    """LLaDA's loop with classifier-free guidance (one batch [x ; un_x] a step): the
    unconditional rows are masked copies of the conditional ones, and the batch runs block
    steps as one session."""
    model = build("llada")
    prompt, _ = prompt_and_masks(model, prompt_len=20, gen_len=16)
    optimized = maskkv_compile.optimize(model, budget=4096, backend="eager", block_length=4)
    out = optimized.generate(prompt, gen_length=16, steps=16, block_length=4, cfg_scale=1.0)
    assert (out != model.config.mask_token_id).all()
    assert optimized.cache_stats()["transitions"] == {
        "new": 1,
        "block_refresh": 4,
        "block_step": 11,
    }
    assert optimized.runtime.last_session.layout.twins == (None, 0)
