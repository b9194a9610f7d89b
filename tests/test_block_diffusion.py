"""Issue 23: MaskKV on block-diffusion models (LLaDA2-, SDAR-, Fast-dLLM-v2-style), under the
loops people run, unmodified.

* the mask: block-causal masks in every spelling are read as padding + block ends; other
  structures are refused with what they are; a 2-D mask is probed for the model's own rule;
* exactness: at a budget of at least the window, every call of every loop returns the
  uncached model's logits at the block rows and the tokens are the unoptimized loop's
  (seeded differential cases: LLaDA2's own ``generate``, the SDAR loop with bool and additive
  masks, diffusers' ``LLaDA2Pipeline``; blocks 4-32, prompts not a multiple of the block,
  batch 1-3 with left padding, editing on and off), and which path ran (``extend`` and
  ``step`` counted, no fallback);
* eviction: the kept prefix of each (row, KV head) is the top of the block's mask votes,
  and every masked row gets real logits.
"""

import functools
import random

import pytest
import torch
from block_loops import (
    block_causal_mask,
    sdar_generate,
    tiny_qwen2,
    tiny_qwen3,
    tiny_self_blocked_qwen3,
)
from loops import interleaved
from maskkv_compile.passes import UnsupportedModelError

import maskkv_compile
from maskkv_compile.layout import block_layout
from maskkv_compile.llada2_standin import llada2_block_mask, tiny_llada2
from maskkv_compile.mask_rule import probe_block_length
from maskkv_compile.masks import read_mask

MASK = 255


def _prompt(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (b, n), generator=g)


def _zero_mask_row(model):
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0
    return model


class Checked:
    """Every call of the optimized model also runs the original one on the same inputs; the
    largest difference of the logits at the last ``block`` rows is kept, at every row but the
    padding ones that hold no mask (their logits are the mask builder's convention and no loop
    reads them). Use as a context manager: the optimized model is left as it was."""

    def __init__(self, optimized, original, block, pad_id=0, shift=0):
        self.worst, self.calls = 0.0, 0
        block += shift  # a shifted loop reads the row before the block too
        self.optimized = optimized
        forward = type(optimized).forward

        def checking(input_ids, *args, **kwargs):
            out = forward(optimized, input_ids, *args, **dict(kwargs))
            ref = original(input_ids, *args, **dict(kwargs)).logits
            ids = input_ids[:, -block:]
            read = (ids != pad_id) | (ids == MASK)  # (B, block)
            diff = (out.logits - ref)[:, -block:].abs().amax(-1)  # (B, block)
            self.worst = max(self.worst, float(diff[read].max()))
            self.calls += 1
            return out

        self.checking = checking

    def __enter__(self):
        self.optimized.forward = self.checking
        return self

    def __exit__(self, *exc):
        del self.optimized.forward


# ----------------------------------------------------------------------------- the mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_llada2_additive_mask_is_read_as_block_ends(dtype):
    mask = llada2_block_mask(3, 4, dtype=dtype)[..., :12, :12]
    valid, end = read_mask("attention_mask", mask, 2, 12)  # (1, 1, S, S) serves the batch
    assert valid is None
    assert end.tolist() == [4] * 4 + [8] * 4 + [12] * 4


def test_bool_mask_with_left_and_tail_padding():
    pad = torch.ones(2, 14, dtype=torch.long)
    pad[1, :3] = 0
    pad[:, 13] = 0  # the tail past the generation length (diffusers marks it so)
    valid, end = read_mask("m", block_causal_mask(14, 4, padding=pad, kind="bool"), 2, 14)
    assert torch.equal(valid, pad.bool())
    assert end.tolist() == [4] * 4 + [8] * 4 + [12] * 4 + [14] * 2


def test_prompt_as_its_own_block():
    _, end = read_mask("m", block_causal_mask(14, 4, prompt_len=6), 1, 14)
    assert end.tolist() == [6] * 6 + [10] * 4 + [14] * 4


@pytest.mark.parametrize("seed", range(12))
def test_an_unpadded_block_mask_is_read_fast_as_the_general_reading_does(seed):
    """The loops' usual mask (block-causal, no padding) is read in three passes; what it finds
    is what the general reading finds, for every partition into blocks, spelling and batch."""
    from maskkv_compile import masks

    rng = random.Random(seed)
    seq, block = rng.randint(5, 40), rng.choice([2, 4, 8, 16])
    prompt_len = rng.choice([None, rng.randint(1, seq)])
    kind = rng.choice(["additive", "bool"])
    mask = block_causal_mask(seq, block, prompt_len, kind=kind, dtype=torch.float64)
    batch = rng.randint(1, 3)
    rows = masks._allowed("m", mask).expand(batch, 1, seq, seq)[:, 0]
    fast = masks._unpadded_block_ends(rows)
    general = masks._block_ends(rows)
    if bool(rows.all()):  # one block: read as such before the general reading
        assert fast.tolist() == [seq] * seq
    elif bool(general[0].all()):
        assert torch.equal(fast, general[1]), (seq, block, prompt_len)
    else:  # a last block of one token, which the general reading takes for a padding row
        assert general[0][:, :-1].all() and not general[0][:, -1].any()
        assert fast[-1] == seq and fast[-2] == seq - 1
        # which moves the block before it to end past that "padding"
        assert torch.equal(torch.where(fast == seq - 1, seq, fast), general[1])
    assert torch.equal(read_mask("m", mask, batch, seq)[1], fast)
    causal = torch.ones(batch, seq, seq, dtype=torch.bool).tril()
    assert masks._unpadded_block_ends(causal) is None  # blocks of one: left to the refusal
    padded = rows.clone()
    padded[-1, :, 0] = False  # a padding key in the last row: the general reading decides
    assert masks._unpadded_block_ends(padded) is None


@pytest.mark.parametrize("seed", range(16))
def test_a_grid_mask_is_read_in_one_pass_and_any_changed_entry_falls_through(seed, monkeypatch):
    """The one-pass reading of a block mask on a uniform grid from 0 (``grid_block_ends``) gives
    the general reading's block ends, in every spelling, dtype, batch and chunking; any entry
    changed off the grid (a key opened or closed, a bias that is neither 0 nor blocking, a NaN)
    makes it answer None, so the general reading decides (and refuses what it refuses)."""
    from maskkv_compile import masks

    rng = random.Random(seed)
    seq, block = rng.randint(5, 70), rng.choice([2, 3, 4, 8, 16])
    kind = rng.choice(["additive", "bool"])
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float64])
    batch = rng.randint(1, 3)
    monkeypatch.setattr(masks, "_CHUNK_BYTES", rng.choice([1, 300, 1 << 20]))
    mask = block_causal_mask(seq, block, kind=kind, dtype=dtype).expand(batch, 1, seq, seq)
    if rng.random() < 0.5:
        mask = mask.clone()
    fast = masks.grid_block_ends(mask)
    with monkeypatch.context() as general:
        general.setattr(masks, "grid_block_ends", lambda mask: None)
        expected = read_mask("m", mask, batch, seq)[1]
    if block >= seq:  # one block: left to the general reading
        assert fast is None
        return
    assert torch.equal(fast, expected)
    assert torch.equal(read_mask("m", mask, batch, seq)[1], expected)
    changed = mask.clone()
    row, i, j = rng.randrange(batch), rng.randrange(seq), rng.randrange(seq)
    opened = bool(changed[row, 0, i, j] if kind == "bool" else changed[row, 0, i, j] == 0)
    if kind == "bool":
        changed[row, 0, i, j] = not opened
    else:
        changed[row, 0, i, j] = rng.choice([float("nan"), -5.0, 1.0] + ([] if opened else [0.0]))
    assert masks.grid_block_ends(changed) is None
    if kind == "additive" and not opened:  # another blocking value: the same grid
        changed[row, 0, i, j] = -1e9
        assert torch.equal(masks.grid_block_ends(changed), expected)


@pytest.mark.parametrize(
    "mask,what",
    [
        (torch.ones(1, 1, 7, 7, dtype=torch.bool).tril(), "causal"),
        (
            torch.ones(7, 7, dtype=torch.bool).tril() & torch.ones(7, 7, dtype=torch.bool).triu(-2),
            "sliding window",
        ),
    ],
)
def test_other_structures_are_refused_with_what_they_are(mask, what):
    with pytest.raises(ValueError, match=what):
        read_mask("attention_mask", mask.view(1, 1, 7, 7), 1, 7)


def test_a_blocked_call_with_masks_before_its_last_block_runs_whole():
    model = _zero_mask_row(tiny_llada2(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    x = _prompt(1, 16)
    x[0, 9] = MASK  # a mask in block 2 of 4
    x[0, 12:] = MASK
    mask = llada2_block_mask(4, 4, dtype=torch.float64)
    with pytest.warns(maskkv_compile.CacheFallbackWarning, match="before its last block"):
        got = optimized(x, attention_mask=mask).logits
    # every block from the first one holding a mask carries the model's logits
    torch.testing.assert_close(got[:, 8:], model(x, attention_mask=mask).logits[:, 8:])
    assert not got[:, :8].any()
    assert optimized.cache_stats()["fallbacks"] == {"block_not_last": 1}


def test_a_window_grown_before_its_block_is_done_runs_whole():
    """A loop that caps its steps per block moves on with a mask left in the block it leaves.
    The grown window looked like an extension (same prefix, one more block) and its finished
    block was appended to the prefix while the new layout computed it again: the block's
    logits were off. It holds masks before its last block, so it runs whole, as the same
    call on a fresh model does. Found by a randomized hunt."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    x = _prompt(1, 16)
    x[:, 10:] = MASK  # a prompt of 10; the window [0, 12) refines the block [8, 12)
    with torch.no_grad():
        optimized(x[:, :12], attention_mask=block_causal_mask(12, 4, dtype=torch.float64))
        x[:, 10] = 5  # one token committed; position 11 still holds the mask
        mask = block_causal_mask(16, 4, dtype=torch.float64)
        with pytest.warns(maskkv_compile.CacheFallbackWarning, match="before its last block"):
            got = optimized(x, attention_mask=mask).logits
        want = model(x, attention_mask=mask).logits
    # every block from the one holding the first mask carries the model's logits
    assert (got - want)[:, 8:].abs().max() < 1e-10
    assert optimized.cache_stats()["transitions"] == {"new": 1, "uncached": 1}


def test_a_new_window_without_a_mask_in_its_last_block_runs_whole_and_says_so():
    """Nothing would vote for the prefix to keep (a scoring call, or a loop whose mask token is
    not ``mask_token_id``): the call runs uncached with a warning that names the likely cause,
    and the loop's next window, which holds masks, starts a session."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=4, mask_token_id=MASK, backend="eager")
    x = _prompt(1, 24)
    mask = block_causal_mask(24, 4, dtype=torch.float64)
    with pytest.warns(maskkv_compile.CacheFallbackWarning, match="mask_token_id is not"):
        got = optimized(x, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 20:], model(x, attention_mask=mask).logits[:, 20:])
    assert optimized.cache_stats()["fallbacks"] == {"block_no_mask": 1}
    x[:, 20:] = MASK
    optimized(x, attention_mask=mask)
    assert optimized.cache_stats()["transitions"] == {"uncached": 1, "new": 1}


def test_block_layout_computes_the_last_block_and_its_masks_vote():
    ids = _prompt(2, 12)
    ids[:, 9:] = MASK
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :2] = False
    end = torch.tensor([4] * 4 + [8] * 4 + [12] * 4)
    layout = block_layout(ids, valid, end, MASK, policy="maskkv", window=8)
    assert layout.block_start == 8 and layout.rows.tolist() == [8, 9, 10, 11]
    assert layout.prompt_lens == [8, 6] and layout.response_lens == [4, 4]
    assert layout.voter_idx.tolist() == [9, 10, 11]  # the prompt tail (8) does not vote
    assert not layout.masks_outside_block


def test_probe_reads_the_models_rule_for_a_2d_mask():
    assert probe_block_length(tiny_llada2(block_length=4), True) == 4
    assert probe_block_length(tiny_llada2(block_length=16), True) == 16
    assert probe_block_length(tiny_llada2(block_length=None), True) is None  # bidirectional
    assert probe_block_length(tiny_qwen3(), True) is None  # is_causal=False: padding only


# ----------------------------------------------------------------------------- exactness


def _case(seed):
    rng = random.Random(seed)
    loop = rng.choice(["llada2", "sdar_bool", "sdar_additive", "diffusers", "fastdllm"])
    block = rng.choice([4, 4, 8, 16, 32])
    prompt_len = rng.randint(block // 2 + 1, 2 * block + 3)
    gen = rng.randint(1, 2) * block + rng.choice([0, rng.randint(1, block - 1)])
    batch = 1 if loop == "llada2" else rng.choice([1, 2, 3])
    padded = batch > 1 and rng.random() < 0.7
    family = (
        "llada2" if loop in ("llada2", "diffusers") else rng.choice(["llada2", "qwen2", "qwen3"])
    )
    if loop == "fastdllm":  # Qwen2 with the token shift, optimized as a shifted family
        family = "qwen2_shifted"
    return {
        "loop": loop,
        "block": block,
        "prompt_len": prompt_len,
        "gen": gen,
        "batch": batch,
        "padded": padded,
        "editing": rng.choice([None, 0.5]),
        "steps": rng.choice([2, 4]),
        "family": family,
        "seed": seed,
    }


def _model(family, block):
    if family == "llada2":  # ``block``: what the model makes of a 2-D mask (diffusers' call)
        model = tiny_llada2(dtype=torch.float64, block_length=block, layers=2)
    elif family in ("qwen2", "qwen2_shifted"):
        model = tiny_qwen2(dtype=torch.float64)
    else:
        model = tiny_qwen3(dtype=torch.float64)
    return _zero_mask_row(model)


@functools.lru_cache(maxsize=None)
def _pair(family, block):
    """(model, its optimized form at full budget), built once per model: the differential cases
    reuse them (``reset()`` between generations, as a server would), so the cases cost runs, not
    traces."""
    model = _model(family, block)
    shifted = {"family": "dream"} if family == "qwen2_shifted" else {}
    return model, maskkv_compile.optimize(model, budget=10**6, backend="eager", **shifted)


def _run(case, model):
    b, block = case["batch"], case["block"]
    prompt = _prompt(b, case["prompt_len"], case["seed"])
    pad = None
    if case["padded"]:
        pad = torch.ones_like(prompt)
        for row in range(1, b):
            pad[row, : min(row * 2 + 1, block - 1, case["prompt_len"] - 1)] = 0
        prompt = prompt.masked_fill(pad == 0, 0)
    if case["loop"] == "llada2":
        return model.generate(
            prompt,
            block_length=block,
            steps=case["steps"],
            gen_length=case["gen"],
            threshold=0.95,
            mask_id=MASK,
            editing_threshold=case["editing"],
            max_post_steps=2,
            mask_dtype=torch.bfloat16,  # as released
        )
    if case["loop"].startswith("sdar") or case["loop"] == "fastdllm":
        shifted = case["loop"] == "fastdllm"  # Fast-dLLM v2's token shift, additive mask
        return sdar_generate(
            model,
            prompt,
            gen_length=case["gen"],
            block_length=block,
            mask_id=MASK,
            steps=case["steps"],
            mask_kind="additive" if shifted else case["loop"].split("_")[1],
            attention_mask=pad,
            shift=int(shifted),
        )
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.LLaDA2Pipeline(model=model, scheduler=diffusers.BlockRefinementScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        input_ids=prompt,
        attention_mask=pad,
        use_chat_template=False,
        gen_length=case["gen"],
        block_length=block,
        num_inference_steps=case["steps"],
        temperature=0.0,
        threshold=0.95,
        editing_threshold=case["editing"],
        max_post_steps=2,
        eos_early_stop=False,
        mask_token_id=MASK,
        output_type="seq",
    ).sequences


CASES = 208
CHUNKS = 2  # the cases of a chunk share the traced models (each test starts with a fresh dynamo)


def _model_key(case) -> tuple[str, int]:
    """The (family, block) of the model a case runs on (``_pair``'s arguments)."""
    return case["family"], case["block"] if case["loop"] == "diffusers" else 4


def _chunks() -> list[list[int]]:
    """The seeds split into CHUNKS by the model they run on, so each model is traced in one
    test only; the most used models first, each to the chunk with the fewest cases."""
    seeds: dict[tuple, list[int]] = {}
    for seed in range(CASES):
        seeds.setdefault(_model_key(_case(seed)), []).append(seed)
    chunks: list[list[int]] = [[] for _ in range(CHUNKS)]
    for group in sorted(seeds.values(), key=len, reverse=True):
        min(chunks, key=len).extend(group)
    return chunks


def _check_case(seed):
    case = _case(seed)
    model, optimized = _pair(*_model_key(case))
    reference = _run(case, model)
    optimized.reset()
    shift = int(case["loop"] == "fastdllm")
    with Checked(optimized, model, case["block"], shift=shift) as checked:
        got = _run(case, optimized)
    assert torch.equal(got, reference), case
    assert checked.calls > 0 and checked.worst < 1e-5, (checked.worst, case)
    stats = optimized.cache_stats()
    assert stats["fallbacks"] == {}, case
    windows = (case["prompt_len"] + case["gen"] + case["block"] - 1) // case["block"] - (
        case["prompt_len"] // case["block"]
    )
    transitions = stats["transitions"]
    # a window's first call is NEW (the first window with a prefix) or EXTEND (every later one);
    # a window of one block (a prompt shorter than the block) has no prefix and runs whole
    cached_windows = windows - (case["prompt_len"] < case["block"])
    assert transitions.get("extend", 0) == max(cached_windows - 1, 0), (transitions, case)
    assert transitions.get("new", 0) == (cached_windows > 0), (transitions, case)
    # the refinement calls after a window's first ran the step graph
    assert transitions.get("step", 0) + transitions.get("uncached", 0) + windows >= checked.calls


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_full_budget_reproduces_every_loop(chunk):
    _pair.cache_clear()  # models traced in this test's dynamo
    for seed in _chunks()[chunk]:
        _check_case(seed)


@pytest.mark.parametrize(
    "budget, loop", [(10**6, "fastdllm"), (5, "sdar_additive")], ids=["token shift", "evicting"]
)
def test_inductor_matches_eager_on_block_loops(budget, loop):
    """Compiled equals eager: at full budget with Fast-dLLM v2's token shift (the row before the
    block computed with it, seeing only itself), and under eviction (where each grown window's
    first step runs the re-selecting graph)."""
    family = "qwen2_shifted" if loop == "fastdllm" else "qwen3"
    case = {**_case(11), "loop": loop, "family": family, "block": 8}
    model = _model(case["family"], case["block"])
    options = {"family": "dream"} if loop == "fastdllm" else {}
    eager_model = maskkv_compile.optimize(model, budget=budget, backend="eager", **options)
    eager = _run(case, eager_model)
    compiled = maskkv_compile.optimize(model, budget=budget, **options)
    assert torch.equal(_run(case, compiled), eager)
    stats = compiled.cache_stats()
    assert stats["transitions"].get("extend", 0) > 0
    assert stats["reselects"] == eager_model.cache_stats()["reselects"]
    assert (stats["reselects"] > 0) == (budget == 5)
    for a, b in zip(stats["layers"], eager_model.cache_stats()["layers"]):
        assert a["kept_per_row"] == b["kept_per_row"]


def test_a_model_that_builds_its_block_mask_in_forward_runs_through_maskkv():
    """Fast-dLLM v2- / SDAR-style code makes its block-causal mask inside forward from a
    ``block_size`` in its config, and the loop passes none: FindAttentionPass drops the mask
    from every site (it depends on the length alone), the runtime computes it again for each
    window's length and reads its blocks. Exact at full budget; bounded under eviction."""
    model = _zero_mask_row(tiny_self_blocked_qwen3(4, dtype=torch.float64))
    prompt = _prompt(1, 30)
    kwargs = dict(gen_length=12, block_length=4, mask_id=MASK, steps=2, mask_kind="none")
    reference = sdar_generate(model, prompt, **kwargs)
    assert torch.equal(reference, sdar_generate(model, prompt, **{**kwargs, "mask_kind": "bool"}))
    exact = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    with Checked(exact, model, 4) as checked:
        assert torch.equal(sdar_generate(exact, prompt, **kwargs), reference)
    assert checked.calls > 0 and checked.worst == 0.0
    graphs = exact.runtime.graphs
    assert graphs.mask_fn is not None and all(site.graph_mask for site in graphs.sites)
    stats = exact.cache_stats()
    assert stats["transitions"] == {"new": 1, "extend": 3, "step": 3} and stats["fallbacks"] == {}
    bounded = maskkv_compile.optimize(model, budget=5, backend="eager")
    sdar_generate(bounded, prompt, **kwargs)
    stats = bounded.cache_stats()
    assert stats["transitions"]["extend"] == 3 and stats["reselects"] == 3
    assert all(layer["kept_per_row"] == [[5, 5]] for layer in stats["layers"])


@pytest.mark.parametrize("padded", [False, True], ids=["alone", "padded batch"])
def test_a_long_window_is_prefilled_in_two_segment_chunks_and_stays_exact(padded, monkeypatch):
    """A window past 2 * QUERY_CHUNK rows is prefilled in query chunks, on CPU each as two
    segments (kernels/attention.py): the SDAR loop over a prompt of 1030 (its tail inside the
    first block; in a batch of 2, the second row left-padded by 37) gives the unoptimized
    loop's tokens and, at every call, its logits to 1e-10 (float64), and the chunks of the
    prefill's first attention took the two segments."""
    from kernels import attention as attention_kernels

    chunks = []
    segments = attention_kernels._chunk_segments
    monkeypatch.setattr(
        attention_kernels,
        "_chunk_segments",
        lambda q, *a: chunks.append(q.shape[2]) or segments(q, *a),
    )
    monkeypatch.setattr(attention_kernels, "SEGMENTS_FROM", 1)  # every chunk that can
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt, pad = _prompt(1 + padded, 1030, seed=5), None
    if padded:
        pad = torch.ones_like(prompt)
        pad[1, :37] = 0
        prompt = prompt.masked_fill(pad == 0, 0)
    kwargs = dict(gen_length=8, block_length=4, mask_id=MASK, steps=2, attention_mask=pad)
    reference = sdar_generate(model, prompt, **kwargs)
    assert chunks == []  # the plain model's own attention
    exact = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    with Checked(exact, model, 4) as checked:
        assert torch.equal(sdar_generate(exact, prompt, **kwargs), reference)
    assert checked.calls > 0 and checked.worst < 1e-10
    assert exact.cache_stats()["transitions"]["new"] == 1
    window = 1032  # the prefill's window: the prompt and its first block
    chunk = attention_kernels.QUERY_CHUNK
    expected = [min(chunk, window - a) for a in range(0, window, chunk)]
    # padded: the first chunk holds row 1's padding queries whose blocks hold no real key
    # (they see every real key, as the op's contract says): that chunk takes the reference
    assert chunks == expected[padded:]


@pytest.mark.parametrize("shift", [0, 1], ids=["sdar", "token shift"])
def test_a_window_of_one_block_from_a_mask_built_in_forward_runs_whole(shift):
    """A prompt shorter than the block: the first window is one block, and the mask the model
    builds for it hides nothing, as a bidirectional model's would. At twice the length the model
    makes blocks, so the window is one block of a block model and runs whole, as with a mask the
    loop passes (Fast-dLLM v2's released model did the opposite here: its first window's later
    steps read the prompt's K/V from the first step, and its tokens differed)."""
    model = _zero_mask_row(tiny_self_blocked_qwen3(8, dtype=torch.float64))
    prompt = _prompt(1, 3)
    kwargs = dict(gen_length=13, block_length=8, mask_id=MASK, steps=4, shift=shift)
    reference = sdar_generate(model, prompt, mask_kind="none", **kwargs)
    options = {"family": "dream"} if shift else {}
    seen = []
    for kind in ("none", "bool"):  # built in forward, and passed by the loop: one reading
        optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager", **options)
        with Checked(optimized, model, 8, shift=shift) as checked:
            assert torch.equal(
                sdar_generate(optimized, prompt, mask_kind=kind, **kwargs), reference
            )
        assert checked.calls > 0 and checked.worst < 1e-12, (kind, checked.worst)
        seen.append(optimized.cache_stats()["transitions"])
    # the first window's calls (its steps after the first included) ran whole, both ways
    assert seen[0] == seen[1] and seen[0]["uncached"] >= 2 and seen[0]["new"] == 1, seen


def test_a_mask_built_in_forward_must_be_block_causal_and_from_the_length_alone():
    causal = maskkv_compile.optimize(
        _zero_mask_row(tiny_self_blocked_qwen3(1, dtype=torch.float64)), budget=4, backend="eager"
    )
    with pytest.raises(ValueError, match="the attention mask the model builds in forward.*causal"):
        causal(_prompt(1, 12))
    from_tokens = _zero_mask_row(tiny_self_blocked_qwen3(4, from_tokens=True))
    with pytest.raises(UnsupportedModelError, match="computed from the call's tensors"):
        maskkv_compile.optimize(from_tokens, budget=4, backend="eager")(_prompt(1, 12))


def test_optimized_generate_is_the_models_own_block_loop():
    model = _zero_mask_row(tiny_llada2(dtype=torch.float64))
    prompt = _prompt(1, 9)
    kwargs = dict(block_length=4, steps=4, gen_length=10, threshold=0.95, mask_id=MASK)
    reference = model.generate(prompt, **kwargs)
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    # LLaDA2's loop calls self.forward with its bf16 4-D block mask: on the optimized model that
    # is MaskKV (the counts say so), never LLaDA's full-attention loop
    assert torch.equal(optimized.generate(prompt, **kwargs), reference)
    stats = optimized.cache_stats()
    assert stats["transitions"]["extend"] == 2 and stats["transitions"]["step"] > 0
    assert stats["prefills"] == 1


# ----------------------------------------------------------------------------- eviction


def _block_votes(model, x, mask, start, masked):
    """Per layer (B, Hkv, start) votes of the block's masked rows over the prefix keys, from the
    original model's own attention probabilities (eager attention, the block mask)."""
    votes = []

    def record(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        heads, kv = query.shape[1], key.shape[1]
        k = key.repeat_interleave(heads // kv, dim=1)
        scores = query @ k.transpose(-2, -1) * scaling + attention_mask
        probs = torch.softmax(scores.float(), -1).to(query.dtype)  # (B, H, S, S)
        on_prefix = probs[:, :, masked][..., :start]  # (B, H, V, P)
        votes.append(on_prefix.sum(2).view(x.shape[0], kv, heads // kv, start).sum(2))
        out = probs @ value.repeat_interleave(heads // kv, dim=1)
        return out.transpose(1, 2).contiguous(), None

    _run_with_attention(model, record, x, mask)
    return votes


def _run_with_attention(model, attention, x, mask):
    """The original model on ``x`` with ``attention`` as its transformers attention function."""
    from transformers import AttentionInterface

    AttentionInterface.register("maskkv_test_attention", attention)
    model.config._attn_implementation = "maskkv_test_attention"
    try:
        with torch.no_grad():
            model(x, attention_mask=mask)
    finally:
        model.config._attn_implementation = "sdpa"


def test_kept_prefix_is_the_top_of_the_blocks_mask_votes():
    model = _zero_mask_row(tiny_llada2(dtype=torch.float64, block_length=4))
    x = _prompt(2, 24)
    x[:, 21:] = MASK
    mask = llada2_block_mask(6, 4, dtype=torch.float64)
    budget = 5
    optimized = maskkv_compile.optimize(
        model, budget=budget, policy="mask_voting_uniform", backend="eager"
    )
    logits = optimized(x, attention_mask=mask).logits
    assert torch.isfinite(logits).all() and (logits[:, 21:].abs().sum(-1) > 0).all()
    votes = _block_votes(model, x, mask, 20, torch.arange(21, 24))
    session = optimized.runtime.last_session
    for layer, cache in enumerate(session.layers):
        for b in range(2):
            for h in range(cache.kept_len.shape[1]):
                kept = sorted(cache.kept_pos[b, h][cache.kept_pos[b, h] >= 0].tolist())
                top = sorted(votes[layer][b, h].topk(int(cache.kept_len[b, h])).indices.tolist())
                assert kept == top, (layer, b, h)
    assert int(session.layers[0].kept_len.max()) <= budget


def _layer0_qk(model, x, mask):
    """Layer 0's post-RoPE (query (B, H, S, D), key (B, Hkv, S, D), scaling) in the original
    model's own call (eager attention, the block mask)."""
    seen = []

    def record(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        seen.append((query, key, scaling))
        heads, kv = query.shape[1], key.shape[1]
        scores = query @ key.repeat_interleave(heads // kv, 1).transpose(-2, -1) * scaling
        probs = torch.softmax(scores + attention_mask, -1)
        out = probs @ value.repeat_interleave(heads // kv, 1)
        return out.transpose(1, 2).contiguous(), None

    _run_with_attention(model, record, x, mask)
    return seen[0]


@pytest.mark.parametrize("recent", [0, 2], ids=["votes alone", "recent 2"])
@pytest.mark.parametrize("shift", [0, 1], ids=["llada2", "token shift"])
def test_a_grown_window_reselects_the_top_of_the_new_blocks_votes_over_kept_and_finished(
    shift, recent
):
    """Without ``revote``, the new block's first step re-selects each (row, KV head) over its
    own [kept prefix ; finished block]: at layer 0 (whose q and k the eviction upstream cannot
    change) the kept set is the top-budget of the new block's mask votes over exactly those
    candidates, the softmax running over them and the block's keys. With the token shift
    (Fast-dLLM v2: family "dream"), the row before each mask votes, the row before the block is
    computed with the block (never kept), and the finished rows are the block's shifted by one.
    With ``recent``, the prefix entries just before each block are kept first, in every head."""
    model = _zero_mask_row(tiny_llada2(dtype=torch.float64, block_length=4))
    budget = 5
    optimized = maskkv_compile.optimize(
        model,
        budget=budget,
        policy="mask_voting_uniform",
        backend="eager",
        family="dream" if shift else "llada",
        recent=recent,
    )
    x = _prompt(2, 28)
    first = x[:, :24].clone()
    first[:, 21:] = MASK  # window 1: prefix 0..19, block 20..23 (prompt tail 20)
    optimized(first, attention_mask=llada2_block_mask(6, 4, dtype=torch.float64))
    before = optimized.runtime.last_session.layers[0]
    old_pos, old_len = before.kept_pos.clone(), before.kept_len.clone()
    second = x.clone()
    second[:, 25:] = MASK  # window 2: block 20..23 finished, block 24..27 (24 committed)
    mask = llada2_block_mask(7, 4, dtype=torch.float64)
    logits = optimized(second, attention_mask=mask).logits
    stats = optimized.cache_stats()
    assert stats["transitions"]["extend"] == 1 and stats["reselects"] == 1
    assert torch.isfinite(logits).all() and (logits[:, 25:].abs().sum(-1) > 0).all()
    query, key, scaling = _layer0_qk(model, second, mask)
    after = optimized.runtime.last_session.layers[0]
    group = query.shape[1] // key.shape[1]
    # the voters, the rows computed at the step, the finished rows that joined the prefix
    voters, block = torch.arange(25, 28) - shift, torch.arange(24 - shift, 28)
    finished = torch.arange(20, 24) - shift
    for b in range(2):
        for h in range(key.shape[1]):
            kept = old_pos[b, h, : int(old_len[b, h])]
            assert int(old_len[b, h]) == budget  # a prompt of 20: every head evicted
            assert int(kept.max()) < 20 - shift  # the computed rows were never candidates
            nearest = set(range(20 - shift - recent, 20 - shift))  # just before window 1's block
            assert nearest <= set(kept.tolist())
            candidates = torch.cat([kept, finished])
            keys = key[b, h, torch.cat([candidates, block])]  # (budget + 4 + 4 + shift, D)
            probs = torch.softmax(
                query[b, h * group : (h + 1) * group, voters] @ keys.T * scaling, -1
            )
            votes = probs[..., : candidates.numel()].sum((0, 1))
            votes[candidates.numel() - recent :] = float("inf")  # the finished block's last
            top = sorted(candidates[votes.topk(budget).indices].tolist())
            assert after.kept_pos[b, h, : int(after.kept_len[b, h])].tolist() == top, (b, h)
            assert int(after.kept_len[b, h]) == budget


@pytest.mark.parametrize("budget, reselects", [(6, 4), (8, 3), (24, 0)])
def test_a_short_prompt_is_kept_whole_and_the_generation_grows_it_only_to_the_budget(
    budget, reselects
):
    """Prompt 5, blocks of 4, gen 16: windows end at 8, 12, ..., 24, and the prefix at each
    growth is 8, 12, 16, 20. A head that held its whole prefix holds the finished block too,
    up to the budget; past it the block's votes re-select. Below the budget the tokens are
    the uncached loop's."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt = _prompt(1, 5)
    kwargs = dict(gen_length=16, block_length=4, mask_id=MASK, steps=2)
    optimized = maskkv_compile.optimize(model, budget=budget, backend="eager")
    got = sdar_generate(optimized, prompt, **kwargs)
    stats = optimized.cache_stats()
    assert stats["transitions"]["extend"] == 4 and stats["reselects"] == reselects
    for layer in stats["layers"]:
        assert layer["kept_per_kv_head"] == [min(budget, 20)] * len(layer["kept_per_kv_head"])
    if reselects == 0:
        assert torch.equal(got, sdar_generate(model, prompt, **kwargs))
    # revote's whole-prefix re-selection at every growth bounds a short prompt's heads alike
    tiered = maskkv_compile.optimize(model, budget=budget, backend="eager", revote=1000)
    tiered_tokens = sdar_generate(tiered, prompt, **kwargs)
    if reselects == 0:  # nothing evicted: both exact
        assert torch.equal(tiered_tokens, got)
    stats = tiered.cache_stats()
    assert stats["revotes"] == 4 and stats["reselects"] == 0
    assert stats["second_tier"]["prompt_len"] == 20
    for layer in stats["layers"]:
        assert layer["kept_per_kv_head"] == [min(budget, 20)] * len(layer["kept_per_kv_head"])


@pytest.mark.parametrize("policy", ["maskkv", "mask_voting_uniform", "snapkv"])
def test_a_prompt_inside_the_first_block_with_recent_runs_and_keeps_the_nearest(policy):
    """Prompt 3, blocks of 4: the first window has no prefix before its block, so its vote
    selects over nothing (``recent`` lifted the last columns of an empty row: an IndexError,
    found by a randomized run). The later windows keep ``recent`` nearest entries of every
    head first; at a budget above the window the tokens are the uncached loop's."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt, kwargs = _prompt(1, 3), dict(gen_length=8, block_length=4, mask_id=MASK, steps=4)
    for budget in (3, 64):
        optimized = maskkv_compile.optimize(
            model, budget=budget, policy=policy, recent=2, backend="eager"
        )
        got = sdar_generate(optimized, prompt, **kwargs)
        stats = optimized.cache_stats()
        assert stats["transitions"]["new"] == 1 and stats["transitions"]["extend"] == 1
        if budget == 64:
            assert torch.equal(got, sdar_generate(model, prompt, **kwargs))
        for layer in stats["layers"]:  # the prefix at the last growth: 8 entries
            assert layer["kept_per_kv_head"] == [min(budget, 8)] * len(layer["kept_per_kv_head"])


def test_under_eviction_every_step_gives_real_logits_and_the_cache_stays_bounded():
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
    seen = []

    def call(x, **kwargs):
        out = optimized(x, **kwargs)
        block = out.logits[:, -4:]
        seen.append(bool(torch.isfinite(block).all() and (block.abs().sum(-1) > 0).all()))
        return out

    sdar_generate(model, _prompt(1, 30), gen_length=12, block_length=4, mask_id=MASK, call=call)
    # prompt 30, blocks of 4 from 0: windows end at 32, 36, 40, 44
    stats = optimized.cache_stats()
    assert all(seen) and stats["transitions"]["extend"] == 3 and stats["reselects"] == 3
    kept = [layer["kept_per_kv_head"] for layer in stats["layers"]]
    # each grown window's first step re-selected [kept prefix ; finished block] to the budget
    assert max(max(k) for k in kept) <= 6


@pytest.mark.parametrize("steps, prompt_len", [(2, 30), (1, 30), (1, 22)])
def test_a_block_loop_run_twice_on_one_prompt_extends_at_its_last_window_as_the_first_run(
    steps, prompt_len
):
    """The second run's last window is also the first run's finished window (same prefix, its
    block masked again). It must grow from the second run's own session, as the first run did:
    no whole-window prefill, and under eviction the same kept entries and tokens. With one step
    a block the earlier run's session of a window gets the very same call as the later run's
    grown session: the third run stepped on the first run's session there (the second run's
    window sessions outlived it), and its tokens were not the first run's (found by a
    randomized run)."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
    prompt = _prompt(1, prompt_len)
    kwargs = dict(gen_length=12, block_length=4, mask_id=MASK, steps=steps)
    runs = []
    for _ in range(3):
        before = dict(optimized.cache_stats()["transitions"])
        tokens = sdar_generate(optimized, prompt, **kwargs)
        after = optimized.cache_stats()["transitions"]
        runs.append((tokens, {k: after[k] - before.get(k, 0) for k in ("new", "extend")}))
        assert after.get("restart", 0) == 0
    windows = -(-(prompt_len + 12) // 4) - prompt_len // 4  # the loop's windows
    assert all(counts == {"new": 1, "extend": windows - 1} for _, counts in runs)
    assert all(torch.equal(tokens, runs[0][0]) for tokens, _ in runs)


def test_a_one_call_generation_run_again_is_prefilled_again():
    """Prompt 16, gen 8, blocks of 8, one step a block: the generation is one call. Run again,
    that call is the very same as the session's only one; a block loop commits a token at every
    call, so it is a new generation (a restart: its window attends to the whole prefix again),
    and every run gives the first run's tokens under eviction. Found by a randomized run."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
    prompt = _prompt(1, 16)
    kwargs = dict(gen_length=8, block_length=8, mask_id=MASK, steps=1)
    first = sdar_generate(optimized, prompt, **kwargs)
    for _ in range(2):
        assert torch.equal(sdar_generate(optimized, prompt, **kwargs), first)
    assert optimized.cache_stats()["transitions"] == {"new": 1, "restart": 2}


@pytest.mark.parametrize(
    "first, second",
    [(8, 4), (4, 8), (None, 4), (4, None)],
    ids=["blocks 8 then 4", "blocks 4 then 8", "no mask then blocks", "blocks then no mask"],
)
def test_a_call_with_the_same_tokens_and_another_mask_is_a_new_prompt(first, second):
    """The same 16-token window (a prompt of 12, 4 masks) called again with another attention
    mask: blocks of another length, or a mask where there was none. The tokens alone said it
    continued the session, whose cached prefix was computed under the other mask; it is a new
    prompt, and its block's logits are the plain model's. Found by a randomized hunt."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    x = _prompt(1, 16)
    x[:, 12:] = MASK

    def kwargs(block):
        mask = None if block is None else block_causal_mask(16, block, dtype=torch.float64)
        return {} if mask is None else {"attention_mask": mask}

    with torch.no_grad():
        optimized(x, **kwargs(first))
        x[:, 13] = 5  # the loop committed a token
        got = optimized(x, **kwargs(second)).logits
        want = model(x, **kwargs(second)).logits
    rows = [12, 14, 15]  # the masks: their logits are what a loop reads
    assert (got - want)[:, rows].abs().max() < 1e-10
    assert optimized.cache_stats()["transitions"] == {"new": 2}


def _greedy_blocks(call, prompt, gen_length, block, per_call=1):
    """A block loop as a generator (it yields after every model call, so that tests can run
    generations interleaved): greedy, ``per_call`` tokens a call, blocks of ``block``, float64
    masks. Returns the (B, P + gen_length) tokens."""
    batch, p = prompt.shape
    total = -(-(p + gen_length) // block) * block
    mask = block_causal_mask(total, block, dtype=torch.float64)
    x = torch.full((batch, total), MASK)
    x[:, :p] = prompt
    rows = torch.arange(batch)
    for end in range((p // block + 1) * block, total + 1, block):
        while (x[:, end - block : end] == MASK).any():
            with torch.no_grad():
                out = call(x[:, :end], attention_mask=mask[:, :, :end, :end])
            yield
            confidence, token = out.logits[:, end - block : end].softmax(-1).max(-1)
            masked = x[:, end - block : end] == MASK
            for _ in range(per_call):
                pick = confidence.masked_fill(~masked, -1).argmax(-1)  # (B,)
                x[rows, end - block + pick] = torch.where(
                    masked[rows, pick], token[rows, pick], x[rows, end - block + pick]
                )
                masked[rows, pick] = False
    return x[:, : p + gen_length]


@pytest.mark.parametrize("batches", [(3, 2), (1, 2), (2, 1, 3)])
def test_generations_of_other_batch_sizes_interleaved_keep_their_sessions(batches):
    """Generations of different batch sizes served a call each in turn (a server's requests).
    A batch size that made dynamo recompile got a new runtime, and the sessions of the sizes
    before it were lost: their next call ran the prefill again, silently, and under eviction
    re-voted mid-block, so the tokens depended on what the process had compiled before. Each
    generation now gets what it gets alone on a fresh model, with one prefill per generation.
    Found by a randomized hunt."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompts = [_prompt(b, 10 + 3 * i, seed=i) for i, b in enumerate(batches)]
    optimized = maskkv_compile.optimize(model, budget=5, backend="eager")
    got = interleaved([_greedy_blocks(optimized, p, 8, 4) for p in prompts])
    for prompt, tokens in zip(prompts, got):
        fresh = maskkv_compile.optimize(model, budget=5, backend="eager")
        assert torch.equal(tokens, interleaved([_greedy_blocks(fresh, prompt, 8, 4)])[0])
    transitions = optimized.cache_stats()["transitions"]
    assert transitions["new"] == len(batches) and set(transitions) == {"new", "step", "extend"}


def test_generations_of_one_prompt_served_in_turn_each_keep_their_own_session():
    """Two generations of one prompt, one committing a token a call and the other two, served
    a call each in turn (a server's requests; sampling n answers to one prompt). Their first
    calls are the very same call: the second restarted the first's session in place, so the
    first then extended it and the second, left without a session, ran its prefill again in
    the middle of its block, and re-voted there. A restarted session now stays live, and a call
    continues a session it steps on before one it would restart: each generation gets what it
    gets alone. Found by a randomized hunt."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt = _prompt(1, 12)
    optimized = maskkv_compile.optimize(model, budget=5, backend="eager")
    got = interleaved([_greedy_blocks(optimized, prompt, 12, 4, n) for n in (1, 2)])
    for per_call, tokens in zip((1, 2), got):
        fresh = maskkv_compile.optimize(model, budget=5, backend="eager")
        alone = interleaved([_greedy_blocks(fresh, prompt, 12, 4, per_call)])[0]
        assert torch.equal(tokens, alone)
    transitions = optimized.cache_stats()["transitions"]
    assert (transitions["new"], transitions.get("restart", 0)) == (1, 1)  # two prefills


class ReleasedEraRotary(torch.nn.Module):
    """Rotary cos/sin spelled as transformers 4.x (and LLaDA2's released file) spell them:
    ``inv_freq[None, :, None] @ position_ids[:, None, :]``, which ties the position ids' strides
    into dynamo's guards."""

    def __init__(self, rotary):
        super().__init__()
        self.inv_freq = rotary.inv_freq

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def test_windows_passed_as_views_of_one_buffer_stay_on_one_graph():
    """LLaDA2's released ``generate`` passes ``position_ids[:, :end]`` of one (1, T) buffer
    (strides (T, 1)), and its rotary reads ``position_ids[:, None, :]``: dynamo's
    stride guard failed at the window that fills the buffer, the recompiled graph got a new
    runtime without the sessions, and the last block ran as a new prompt. Found by running the
    released file; the optimized model now hands dynamo fresh strides."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    model.model.rotary_emb = ReleasedEraRotary(model.model.rotary_emb)
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    prompt, kwargs = _prompt(1, 11), dict(gen_length=21, block_length=8, mask_id=MASK, steps=2)
    buffer = torch.arange(32)[None]  # (1, T), T the loop's total: its position ids

    def as_views(net):
        def call(x, position_ids, **rest):  # the loop's window, as views of the buffers
            return net(x, position_ids=buffer[:, : x.shape[1]], **rest)

        return call

    expected = sdar_generate(model, prompt, call=as_views(model), **kwargs)
    tokens = sdar_generate(optimized, prompt, call=as_views(optimized), **kwargs)
    assert torch.equal(tokens, expected)
    assert len(maskkv_compile.runtimes(optimized)) == 1
    transitions = optimized.cache_stats()["transitions"]
    assert (transitions["new"], transitions["extend"]) == (1, 2)


@pytest.mark.parametrize("seed, shift", [(0, 0), (1, 0), (2, 1)])
def test_random_call_sequences_under_eviction_leak_nothing_and_stay_within_the_budget(seed, shift):
    """One optimized model drives a seeded random sequence of block generations (prompts of
    5-40 tokens, batch 1-2, left padding, 1-3 blocks generated, 1-2 steps a block) mixed with
    full-attention calls, reset() and weights changed in place. Every call gives the current
    block's masked rows real logits, every head's kept prefix stays within the budget, and each
    generation equals the same one on a second optimized model reset just before it. ``shift``:
    a Qwen2 with Fast-dLLM v2's token shift (family "dream"; logits one row earlier)."""
    rng = random.Random(seed)
    model = _zero_mask_row((tiny_qwen2 if shift else tiny_qwen3)(dtype=torch.float64))
    budget = 6
    options = dict(
        budget=budget,
        policy="mask_voting_uniform",
        backend="eager",
        family="dream" if shift else "llada",
    )
    shared = maskkv_compile.optimize(model, **options)
    reference = maskkv_compile.optimize(model, **options)
    reselects, last = 0, None
    for _ in range(8):
        action = rng.choice(["generate", "generate", "again", "full", "reset", "weights"])
        if action == "reset":
            shared.reset()
            continue
        if action == "weights":  # the loop's model and both optimized ones see the change
            with torch.no_grad():
                model.model.layers[0].self_attn.k_proj.weight.mul_(1.25)
            continue
        if action == "full":  # a full-attention call (no block mask) on the same runtime
            x = _prompt(1, 20, rng.randint(0, 999))
            x[:, 14:] = MASK
            logits = shared(x).logits[:, 14 - shift : 20 - shift]
            assert torch.isfinite(logits).all() and (logits.abs().sum(-1) > 0).all()
            continue
        if action == "generate" or last is None:
            batch = rng.choice([1, 2])
            prompt = _prompt(batch, rng.randint(5, 40), rng.randint(0, 999))
            pad = None
            if batch == 2 and rng.random() < 0.5:
                pad = torch.ones_like(prompt)
                pad[1, : rng.randint(1, 3)] = 0
                prompt = prompt.masked_fill(pad == 0, 0)
            kwargs = dict(
                gen_length=4 * rng.randint(1, 3),
                block_length=4,
                mask_id=MASK,
                steps=rng.choice([1, 2]),
                attention_mask=pad,
                shift=shift,
            )
            last = prompt, kwargs
        else:  # "again": the last generation once more (its finished session is still live)
            prompt, kwargs = last

        def call(x, **kw):
            out = shared(x, **kw)
            block = out.logits[:, x.shape[1] - 4 - shift : x.shape[1] - shift]
            masked = x[:, -4:] == MASK
            assert torch.isfinite(block).all() and bool((block.abs().sum(-1) > 0)[masked].all())
            session = shared.runtime.last_session  # None after an uncached call
            if session is not None:
                assert max(int(cache.kept_len.max()) for cache in session.layers) <= budget
            return out

        before = shared.cache_stats()["reselects"]
        got = sdar_generate(model, prompt, call=call, **kwargs)
        reselects += shared.cache_stats()["reselects"] - before
        reference.reset()
        assert torch.equal(got, sdar_generate(reference, prompt, **kwargs))
    assert reselects > 0  # the sequences did grow windows under eviction


def test_a_step_callback_that_replaces_the_block_stays_exact():
    """diffusers' ``callback_on_step_end`` may hand back another ``block_x``: here one that
    masks the block again at the second step of every block (a restart of the window)."""
    diffusers = pytest.importorskip("diffusers")
    model = _zero_mask_row(tiny_llada2(dtype=torch.float64, block_length=4))

    def remask(pipe, step, timestep, kwargs):
        block_x = kwargs["block_x"]
        if timestep == 1:
            block_x = block_x.clone()
            block_x[:, -4:] = MASK
        return {"block_x": block_x}

    def run(net):
        pipe = diffusers.LLaDA2Pipeline(model=net, scheduler=diffusers.BlockRefinementScheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            input_ids=_prompt(1, 9),
            use_chat_template=False,
            gen_length=8,
            block_length=4,
            num_inference_steps=4,
            temperature=0.0,
            mask_token_id=MASK,
            output_type="seq",
            callback_on_step_end=remask,
            callback_on_step_end_tensor_inputs=["block_x"],
        ).sequences

    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")
    assert torch.equal(run(optimized), run(model))
    assert optimized.cache_stats()["transitions"].get("restart", 0) > 0


def test_each_row_of_a_padded_batch_under_eviction_is_the_row_alone():
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt = _prompt(2, 30, seed=4)
    pad = torch.ones_like(prompt)
    pad[1, :7] = 0
    prompt = prompt.masked_fill(pad == 0, 0)
    kwargs = dict(gen_length=8, block_length=4, mask_id=MASK, steps=2)
    batched = maskkv_compile.optimize(model, budget=5, backend="eager")
    together = sdar_generate(batched, prompt, attention_mask=pad, **kwargs)
    assert batched.cache_stats()["transitions"]["extend"] == 2  # windows end at 32, 36, 40
    for row in range(2):
        alone = maskkv_compile.optimize(model, budget=5, backend="eager")
        one = sdar_generate(
            alone, prompt[row : row + 1], attention_mask=pad[row : row + 1], **kwargs
        )
        assert torch.equal(together[row : row + 1], one), row


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("sliced", [True, False], ids=["sliced", "fresh"])
def test_a_padded_first_window_of_one_block_runs_whole_and_the_next_are_cached(kind, sliced):
    """Prompts shorter than the block in a left-padded batch: the first window is one block,
    with padding. Its mask, a slice of the whole-length mask or built fresh for the window
    (each padding row keeping its own key, as these loops make it), reads as one block: it runs
    whole (no prefix to cache, so no fallback), and the later windows are a new prompt and its
    extends, with the plain loop's tokens."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt = _prompt(2, 5, seed=3)
    pad = torch.ones_like(prompt)
    pad[1, :2] = 0
    prompt = prompt.masked_fill(pad == 0, 0)
    # windows end at 8 (the prompt's tail and 3 masks: one call), 16 and 24 (two calls each)
    kwargs = dict(gen_length=19, block_length=8, mask_id=MASK, steps=2, mask_kind=kind)
    optimized = maskkv_compile.optimize(model, budget=10**6, backend="eager")

    def call(x, attention_mask, **rest):  # a loop that builds each window's mask anew
        return optimized(x, attention_mask=attention_mask.clone(), **rest)

    reference = sdar_generate(model, prompt, attention_mask=pad, **kwargs)
    got = sdar_generate(
        optimized, prompt, attention_mask=pad, call=None if sliced else call, **kwargs
    )
    assert torch.equal(got, reference)
    stats = optimized.cache_stats()
    assert dict(stats["transitions"]) == {"uncached": 1, "new": 1, "step": 2, "extend": 1}
    assert stats["fallbacks"] == {}


@pytest.mark.parametrize("where", ["device", "host"])
def test_revote_reselects_over_the_whole_prefix_at_every_extend(where):
    """With ``revote`` the finished block joins the second tier and the new block's votes
    re-select over the whole prefix; without it, over each head's [kept ; finished block].
    Either way the hot cache stays at the budget; at a budget above the prefix it is exact."""
    model = _zero_mask_row(tiny_qwen3(dtype=torch.float64))
    prompt = _prompt(2, 30)
    pad = torch.ones_like(prompt)
    pad[1, :3] = 0
    kwargs = dict(gen_length=12, block_length=4, mask_id=MASK, steps=2, attention_mask=pad)
    reference = sdar_generate(model, prompt, **kwargs)
    exact = maskkv_compile.optimize(
        model, budget=10**6, backend="eager", revote=1000, second_tier=where
    )
    with Checked(exact, model, 4) as checked:
        assert torch.equal(sdar_generate(exact, prompt, **kwargs), reference)
    assert checked.worst == 0.0
    stats = exact.cache_stats()
    assert stats["transitions"]["extend"] == 3 and stats["revotes"] == 3
    assert stats["reselects"] == 0
    assert stats["second_tier"]["prompt_len"] == 40  # 28 + 3 finished blocks of 4
    assert stats["layers"][0]["kept_per_row"] == [[40, 40], [37, 37]]

    bounded = maskkv_compile.optimize(model, budget=5, backend="eager", revote=1000)
    sdar_generate(bounded, prompt, **kwargs)
    tierless = maskkv_compile.optimize(model, budget=5, backend="eager")
    sdar_generate(tierless, prompt, **kwargs)
    assert tierless.cache_stats()["reselects"] == 3 and tierless.cache_stats()["revotes"] == 0
    for a, b in zip(bounded.cache_stats()["layers"], tierless.cache_stats()["layers"]):
        assert a["kept_per_row"] == [[5, 5], [5, 5]] and a["padded_to"] == 5
        assert b["kept_per_row"] == [[5, 5], [5, 5]] and b["padded_to"] == 5


def test_a_mask_is_read_once_per_tensor_and_again_after_an_in_place_write(monkeypatch):
    from maskkv_compile import masks

    reads = []
    original = masks.read_mask
    monkeypatch.setattr(masks, "read_mask", lambda *a: reads.append(a[2:]) or original(*a))
    reader = masks.MaskReader()
    ids = _prompt(1, 8)
    own = llada2_block_mask(2, 4)  # a mask of its own: read once for every call with it
    for _ in range(3):
        kwargs = {"attention_mask": own}
        _, end = reader(ids, kwargs)
        assert kwargs == {} and end.tolist() == [4] * 4 + [8] * 4
    assert len(reads) == 1
    # slices of one whole-length mask (LLaDA2's loop): the whole is read once, every window cut
    full = llada2_block_mask(4, 4)
    for window in (8, 12, 16, 12):
        _, end = reader(_prompt(1, window), {"attention_mask": full[:, :, :window, :window]})
        assert end.tolist() == [min((i // 4 + 1) * 4, window) for i in range(window)]
    assert len(reads) == 2 and reads[-1] == (1, 16)
    full[:, :, 4:8, 0:4] = float("-inf")  # written in place: read again, and refused
    with pytest.raises(ValueError, match="does not see exactly"):
        reader(ids, {"attention_mask": full[:, :, :8, :8]})
