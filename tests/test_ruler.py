"""The RULER-style long-context suite: what each task asks, that the answer is determined by
the context, and the block-diffusion loop of the quality suite through the optimized model."""

from __future__ import annotations

import collections

import pytest
import torch

from maskkv_compile.evaluation import ruler
from maskkv_compile.evaluation.models import Bundle, ruler_sample
from maskkv_compile.evaluation.suite import Suite, infill


def _context(seq: ruler.RulerSequence) -> list[int]:
    ids = list(seq.ids)
    return ids[1 : ids.index(ruler.SEP)]


def _query(seq: ruler.RulerSequence) -> list[int]:
    ids = list(seq.ids)
    return ids[ids.index(ruler.SEP) + 1 : seq.start - 1]


def _after(context: list[int], head: list[int], n: int) -> list[list[int]]:
    """The ``n`` tokens after every occurrence of ``head`` in ``context``."""
    k = len(head)
    return [
        context[i + k : i + k + n]
        for i in range(len(context) - k + 1)
        if context[i : i + k] == head
    ]


def _expected(seq: ruler.RulerSequence) -> list[int]:
    """The answer as a reader of the context finds it (independent of the generator)."""
    ctx, query = _context(seq), _query(seq)
    if seq.task in ("single", "multikey", "multiquery"):
        assert query[0] == ruler.Q_KEY
        out = []
        for key in query[1:]:
            (value,) = _after(ctx, [key], ruler.VALUE_LEN)  # exactly one needle per key
            out += value
        return out
    if seq.task == "multivalue":
        values = _after(ctx, [query[1]], ruler.VALUE_LEN)
        assert len(values) == 3
        return [t for v in values for t in v]
    if seq.task == "vartrack":
        chain, holder = [], query[1]
        while True:
            names = [
                ctx[i + 1]
                for i in range(len(ctx) - 2)
                if ctx[i] == ruler.LET and ctx[i + 2] == holder
            ]
            if not names:
                return chain
            (holder,) = names
            chain.append(holder)
    if seq.task == "freqword":
        counts = collections.Counter(t for t in ctx if t in ruler.WORDS)
        ranked = counts.most_common()
        assert ranked[2][1] > ranked[3][1], ranked[:4]  # the top three are never tied
        return [w for w, _ in ranked[:3]]
    assert seq.task == "copy"
    at = [i for i in range(len(ctx) - 1) if ctx[i] == ruler.PASSAGE and ctx[i + 1] == query[1]]
    (i,) = at
    return ctx[i + 2 : i + 2 + len(seq.answer)]


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [96, 256, 2048])
def test_every_answer_is_determined_by_its_context(task, length):
    gen = torch.Generator().manual_seed(3)
    for _ in range(12):
        seq = ruler.ruler_task(gen, task, length)
        assert len(seq.ids) == length and seq.ids[0] == ruler.BOS
        assert seq.ids[seq.start - 1] == ruler.ANSWER
        assert list(seq.answer) == _expected(seq)
        assert ruler.MASK not in seq.ids
        span = {
            "single": (4, 4),
            "multikey": (4, 4),
            "multivalue": (12, 12),
            "multiquery": (8, 8),
            "vartrack": (2, 4),
            "freqword": (3, 3),
            "copy": (8, 32),
        }[task]
        assert span[0] <= len(seq.answer) <= span[1]


def test_same_seed_same_sequences_and_tasks_vary():
    a = [ruler.ruler_task(torch.Generator().manual_seed(5), t, 512).ids for t in ruler.TASKS]
    b = [ruler.ruler_task(torch.Generator().manual_seed(5), t, 512).ids for t in ruler.TASKS]
    assert a == b
    gen = torch.Generator().manual_seed(5)
    assert len({ruler.ruler_task(gen, "copy", 512).ids for _ in range(8)}) == 8
    x, answer = ruler.batch(torch.Generator().manual_seed(0), ruler.TASKS, 6, 300)
    assert x.shape == answer.shape == (6, 300)
    assert all(bool(answer[i, -1]) and not bool(answer[i, 0]) for i in range(6))


def test_bad_task_and_too_short_context_are_named():
    with pytest.raises(ValueError, match="unknown task 'needle'"):
        ruler.ruler_task(torch.Generator(), "needle", 512)
    with pytest.raises(ValueError, match="cannot hold"):
        ruler.ruler_task(torch.Generator().manual_seed(0), "copy", 20)
    with pytest.raises(ValueError, match="cannot hold"):
        ruler.ruler_task(torch.Generator().manual_seed(0), "multivalue", 30)


def _block_bundle(samples, block=16):
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=2, hidden=64, vocab=ruler.VOCAB, seed=0)
    model.config.mask_token_id = ruler.MASK
    return Bundle(
        "ruler-block-test",
        model,
        ruler.MASK,
        samples,
        [torch.tensor([samples[0].ids[: samples[0].start]])],
        calibration_gen_length=4,
        decode=lambda ids: " ".join(ruler.token_name(int(i)) for i in ids),
        tasks=tuple(s.task for s in samples),
        exact=True,
        block_length=block,
    )


def test_block_loop_grows_the_window_and_matches_uncached_at_full_budget():
    """The block loop through optimize(): windows extend (never re-prefilled), the full budget
    reproduces the uncached loop token for token, and a small budget stays within it."""
    gen = torch.Generator().manual_seed(1)
    samples = [ruler_sample(f"{i}/copy", ruler.ruler_task(gen, "copy", 150)) for i in range(2)]
    bundle = _block_bundle(samples)
    results = Suite(bundle, ["maskkv", "snapkv"], [8, "full"], progress=False).run()
    cells = results["cells"]
    for sample in samples:
        blocks_touched = (len(sample.ids) - 1) // 16 - sample.start // 16 + 1
        for key in ("full_cache", "maskkv@full", "snapkv@8", "maskkv@8"):
            cell = cells[key][sample.id]
            assert cell["transitions"]["new"] == 1, cell["transitions"]
            assert cell["transitions"].get("extend", 0) == blocks_touched - 1, cell["transitions"]
        for key in ("full_cache", "maskkv@full", "snapkv@full"):
            assert cells[key][sample.id]["tokens"] == cells["uncached"][sample.id]["tokens"]
        # the budget, every finished block re-selected into it (block_diffusion.BlockReselect)
        assert cells["snapkv@8"][sample.id]["kept"] == 8


def test_block_infill_calls_the_growing_window_with_its_mask():
    gen = torch.Generator().manual_seed(2)
    sample = ruler_sample("0/single", ruler.ruler_task(gen, "multiquery", 70))  # answer 62..70
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, attention_mask=None):
            seen.append((x.shape[1], attention_mask.shape[-2:]))
            logits = torch.zeros(1, x.shape[1], ruler.VOCAB)
            logits[..., 0] = 1.0
            return type("Out", (), {"logits": logits})()

    tokens, _, calls = infill(Recorder(), sample, ruler.MASK, block_length=32)
    assert calls == 8 and tokens == [0] * 8
    # answer tokens 62-63 finish the block ending at 64; the window then grows to the end (70)
    assert [s for s, _ in seen] == [64, 64, 70, 70, 70, 70, 70, 70]
    assert all(tuple(m) == (s, s) for s, m in seen)


def test_context_sets_the_tasks_length_of_a_ruler_checkpoint(tmp_path):
    from maskkv_compile.evaluation.models import load_bundle
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=1, hidden=32, vocab=ruler.VOCAB, seed=0)
    model.config.ruler = {"attention": "full", "block": None}
    model.save_pretrained(tmp_path)
    for context in (300, 512):
        bundle = load_bundle(
            "ruler", 2, ["single", "copy"], checkpoint=str(tmp_path), context=context
        )
        assert [len(s.ids) for s in bundle.samples] == [context] * 4
        assert f"at {context} tokens" in bundle.note
    with pytest.raises(ValueError, match="context= is for the RULER-style models only"):
        load_bundle("tiny-dllm", 1, context=300)
