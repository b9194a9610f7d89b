"""The RULER-style long-context suite: what each task asks, that the answer is determined by
the context, the block-diffusion loop of the quality suite through the optimized model, and the
semi-autoregressive loop with its dual-cache cells."""

from __future__ import annotations

import collections
import json

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
        "ruler-block-test" if block else "ruler-test",
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


class _Recorder(torch.nn.Module):
    """Predicts token 0 everywhere, most confidently at the last position; records each call's
    masked positions."""

    def __init__(self):
        super().__init__()
        self.masked = []

    def forward(self, x, attention_mask=None):
        self.masked.append(set((x[0] == ruler.MASK).nonzero().flatten().tolist()))
        logits = torch.zeros(1, x.shape[1], ruler.VOCAB)
        logits[0, :, 0] = torch.arange(x.shape[1]) * 0.1
        return type("Out", (), {"logits": logits})()


def _fill_order(recorder) -> list[int]:
    seen = recorder.masked + [set()]
    return [next(iter(a - b)) for a, b in zip(seen, seen[1:])]


def test_semi_ar_infill_finishes_each_block_before_the_next():
    gen = torch.Generator().manual_seed(3)
    sample = ruler_sample("0/multivalue", ruler.ruler_task(gen, "multivalue", 80))  # span 12
    start = sample.start
    free = _Recorder()
    infill(free, sample, ruler.MASK)
    assert _fill_order(free) == list(range(79, start - 1, -1))  # most confident first: the end
    semi = _Recorder()
    tokens, _, calls = infill(semi, sample, ruler.MASK, semi_ar=4)
    assert calls == 12 and tokens == [0] * 12
    blocks = [list(range(start + b + 3, start + b - 1, -1)) for b in (0, 4, 8)]
    assert _fill_order(semi) == blocks[0] + blocks[1] + blocks[2]
    with pytest.raises(ValueError, match="runs its own block loop"):
        infill(semi, sample, ruler.MASK, block_length=16, semi_ar=4)


def test_dual_cache_cells_run_block_steps_where_the_span_is_on_the_grid(tmp_path):
    """``semi_ar=4, dual=True``: every configuration runs the semi-autoregressive loop; the
    full prompt cache reproduces the uncached loop; the dual cells run one block refresh per
    block and block steps inside it when the span is a multiple of 4, plain steps otherwise;
    the trade-off table gets a dual-cache row per policy x budget."""
    from maskkv_compile.evaluation import tradeoff

    gen = torch.Generator().manual_seed(4)
    samples = [
        ruler_sample(f"{i}/{task}", ruler.ruler_task(gen, task, 100))
        for i, task in enumerate(["multiquery", "multivalue", "freqword"])  # spans 8, 12, 3
    ]
    bundle = _block_bundle(samples, block=None)
    path = tmp_path / "q.json"
    suite = Suite(
        bundle,
        ["maskkv", "snapkv"],
        [8, "full"],
        progress=False,
        semi_ar=4,
        dual=True,
        json_path=path,
    )
    cells = suite.run()["cells"]
    for sample in samples:
        sid, span = sample.id, sample.span_len
        assert cells["full_cache"][sid]["tokens"] == cells["uncached"][sid]["tokens"]
        for key in ("full_cache+dual", "maskkv@8+dual", "snapkv@full+dual"):
            moves = cells[key][sid]["transitions"]
            assert moves["new"] == 1, (key, moves)
            if span % 4 == 0:
                blocks = span // 4
                assert moves.get("block_refresh") == blocks, (key, moves)
                assert moves.get("block_step") == span - 1 - blocks, (key, moves)
            else:
                assert "block_step" not in moves and moves.get("step") == span - 1, (key, moves)
        for key in ("maskkv@8", "full_cache"):  # the same loop without the dual cache
            assert "block_step" not in cells[key][sid]["transitions"]
    assert cells["snapkv@8+dual"][samples[0].id]["kept"] == 8
    rows = [r for r in tradeoff.rows(suite.results) if r["setting"] == "dual cache"]
    assert [(r["policy"], r["budget"]) for r in rows] == [("maskkv", 8), ("snapkv", 8)]
    assert all(r["vs_one_shot"] is not None for r in rows)

    with pytest.raises(ValueError, match="was run with semi_ar=4"):
        Suite(bundle, ["maskkv"], [8], json_path=path, resume=True, progress=False)
    with pytest.raises(ValueError, match="needs semi_ar"):
        Suite(bundle, ["maskkv"], [8], dual=True, progress=False)
    with pytest.raises(ValueError, match="runs its own block loop"):
        Suite(_block_bundle(samples), ["maskkv"], [8], semi_ar=4, progress=False)


def test_cli_eval_semi_ar_dual_writes_the_dual_rows(tmp_path, capsys):
    from maskkv_compile.cli import main as cli_main
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=1, hidden=32, vocab=ruler.VOCAB, seed=0)
    model.config.ruler = {"attention": "full", "block": None}
    model.save_pretrained(tmp_path / "ckpt")
    args = ["eval", "--suite", "ruler", "--model", "ruler", "--checkpoint", str(tmp_path / "ckpt")]
    args += ["--context", "100", "--tasks", "multiquery", "--samples", "1", "--policies", "maskkv"]
    args += ["--budgets", "8", "--semi-ar", "4", "--dual", "--out", str(tmp_path), "--quiet"]
    assert cli_main(args + ["--no-plots"]) == 0
    assert "dual cache" in capsys.readouterr().out
    saved = json.loads((tmp_path / "quality_ruler.json").read_text())
    assert saved["semi_ar"] == 4 and saved["dual"] is True
    assert saved["cells"]["maskkv@8+dual"]["0/multiquery"]["transitions"]["block_step"] > 0
    assert "full cache + dual cache" in (tmp_path / "quality_ruler_tradeoff.md").read_text()


def test_recent_runs_every_cached_configuration_with_its_window(tmp_path, monkeypatch):
    """``recent=R``: every cached configuration is optimized with ``recent=min(R, budget)``, the
    full cache still reproduces the uncached block loop, the JSON records R, and a resume with
    another R is refused."""
    import maskkv_compile

    seen = []
    real = maskkv_compile.optimize

    def spy(model, *args, **kwargs):
        net = real(model, *args, **kwargs)
        seen.append((net.maskkv_config.budget, net.maskkv_config.recent))
        return net

    monkeypatch.setattr(maskkv_compile, "optimize", spy)
    gen = torch.Generator().manual_seed(5)
    samples = [ruler_sample("0/copy", ruler.ruler_task(gen, "copy", 120))]
    path = tmp_path / "q.json"
    suite = Suite(
        _block_bundle(samples), ["snapkv"], [2, 8], recent=4, json_path=path, progress=False
    )
    cells = suite.run()["cells"]
    assert sorted(seen) == [(2, 2), (8, 4)] + [(1 << 16, 4)] * 2, seen  # full_cache (+refresh)
    assert cells["full_cache"]["0/copy"]["tokens"] == cells["uncached"]["0/copy"]["tokens"]
    assert json.loads(path.read_text())["recent"] == 4
    with pytest.raises(ValueError, match="was run with recent=4"):
        Suite(_block_bundle(samples), ["snapkv"], [8], json_path=path, resume=True, progress=False)
