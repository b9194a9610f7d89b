"""The retrieval dLLM's side of the quality suite: the needle task generator, the shipped
checkpoint (it must really retrieve), the training script (a few steps, then resumed), the suite
and the depth x length heatmap on a checkpoint it writes."""

import json
from pathlib import Path

import pytest
import torch
from helpers import check_invariants

from maskkv_compile.cli import main as cli_main
from maskkv_compile.evaluation import ModelUnavailable, load_bundle
from maskkv_compile.evaluation import needles as nt
from maskkv_compile.evaluation.heatmap import heatmap, needle_samples, plot_heatmap
from maskkv_compile.evaluation.suite import infill
from maskkv_compile.tiny_models import tiny_llada

ROOT = Path(__file__).resolve().parent.parent


def test_needle_task_layout():
    gen = torch.Generator().manual_seed(0)
    for haystack, needles, queries in [(32, 1, 1), (64, 4, 4), (256, 6, 2)]:
        seq = nt.needle_task(gen, haystack, needles, queries)
        sep = seq.ids.index(nt.SEP)
        assert seq.ids[0] == nt.BOS and sep == haystack + 1
        body = seq.ids[1:sep]
        assert sum(t in nt.KEYS for t in body) == needles  # one distinct key per needle
        assert len(seq.answers) == queries and seq.ids[seq.answers[-1][0] - 2] == nt.QUERY
        for (
            start,
            stop,
        ) in seq.answers:  # every answer is the value that follows its key in the haystack
            key, value = seq.ids[start - 1], seq.ids[start:stop]
            where = body.index(key)
            assert body[where + 1 : where + 1 + nt.VALUE_LEN] == value and all(
                v in nt.VALUES for v in value
            )
        assert (
            seq.ids[seq.depth] == seq.ids[seq.answers[-1][0] - 1]
        )  # needle 0 is the one asked last


def test_needle_task_depth_seed_and_errors():
    for depth in (0.0, 0.5, 1.0):
        seq = nt.needle_task(torch.Generator().manual_seed(3), 100, 2, depth=depth)
        filler_before = sum(t in nt.FILLER for t in seq.ids[1 : seq.depth])
        assert filler_before == round(depth * (100 - 2 * (1 + nt.VALUE_LEN)))
    assert nt.needle_task(torch.Generator().manual_seed(5), 64, 3) == nt.needle_task(
        torch.Generator().manual_seed(5), 64, 3
    )
    with pytest.raises(ValueError, match="cannot hold 4 needles"):
        nt.needle_task(torch.Generator(), 10, 4)
    with pytest.raises(ValueError, match="queries"):
        nt.needle_task(torch.Generator(), 64, 2, queries=3)
    with pytest.raises(ValueError, match="depth"):
        nt.needle_task(torch.Generator(), 64, 2, depth=1.5)
    with pytest.raises(ValueError, match="keys"):
        nt.needle_task(torch.Generator(), 64, 4, keys=3)
    gen = torch.Generator().manual_seed(0)  # a small key set: keys come from its first ids only
    assert {
        t for _ in range(50) for t in nt.needle_task(gen, 32, 3, keys=4).ids if t in nt.KEYS
    } == set(range(4))


def test_filler_is_a_walk_on_the_chain():
    walk = nt.filler_walk(torch.Generator().manual_seed(0), 2000)
    successors = nt.filler_successors()
    assert all(b in successors[a - nt.FILLER[0]] for a, b in zip(walk, walk[1:]))
    first = sum(b == successors[a - nt.FILLER[0]][0] for a, b in zip(walk, walk[1:])) / (
        len(walk) - 1
    )
    assert abs(first - nt.SUCCESSOR_P[0]) < 0.05
    assert nt.filler_walk(torch.Generator(), 0) == []


def test_copy_task():
    x, answer = nt.copy_task(torch.Generator().manual_seed(0), 8, 48)
    assert x.shape == answer.shape == (8, 49) and bool((x[:, 0] == nt.BOS).all())
    n = int(answer[0].sum())
    assert 4 <= n <= 12 and bool((answer.sum(1) == n).all())
    for row, ans in zip(x, answer):
        cols = ans.nonzero().flatten()
        assert bool((cols.diff() == 1).all())  # one contiguous second copy
        copy, before = row[cols], row[: int(cols[0])]
        assert any(torch.equal(before[i : i + n], copy) for i in range(len(before) - n + 1))


def test_heatmap_invariants(tmp_path):
    import maskkv_compile

    model = tiny_llada(vocab=nt.VOCAB, seed=0)  # random weights: the mechanics, not the quality
    calibration = [torch.tensor([s.ids[: s.start]]) for s in needle_samples(64, 0.5, 2, 2, seed=1)]
    profile = maskkv_compile.calibrate(
        model, calibration, gen_length=nt.VALUE_LEN, mask_token_id=nt.MASK, progress=False
    )
    kwargs = dict(lengths=(32, 64), depths=(0.0, 1.0), samples=2, profile=profile, progress=False)
    result = heatmap(model, ["maskkv"], 4, **kwargs)
    assert list(result["exact_match"]) == ["uncached", "full cache", "maskkv@4"]
    for grid in result["exact_match"].values():
        assert len(grid) == 2 and all(
            len(row) == 2 and all(v in (0.0, 0.5, 1.0) for v in row) for row in grid
        )
    assert heatmap(model, ["maskkv"], 4, **kwargs) == result  # deterministic
    # a budget that holds every prompt is the full cache, cell for cell
    whole = heatmap(model, ["maskkv", "streaming"], 10_000, **kwargs)
    assert (
        whole["exact_match"]["maskkv@10000"]
        == whole["exact_match"]["streaming@10000"]
        == whole["exact_match"]["full cache"]
    )
    assert plot_heatmap(result, tmp_path / "h.png").stat().st_size > 1000
    sample = needle_samples(64, 1.0, 1, 2)[
        0
    ]  # the asked needle sits at the requested depth: the end
    assert (
        sample.ids[sample.start - 1] in nt.KEYS
        and sample.ids.index(sample.ids[sample.start - 1]) > 55
    )
    with pytest.raises(ValueError, match="needs a layer profile"):
        heatmap(model, ["maskkv"], 4, lengths=(32,), depths=(0.0,), samples=1)


def train(script, out: Path, *extra: str) -> list[dict]:
    """scripts/train_tiny_dllm.py, in this process; the records of its log."""
    script(
        "scripts/train_tiny_dllm.py",
        "--out",
        str(out),
        "--minutes",
        "0.05",
        "--eval-every",
        "10",
        "--stages",
        "32",
        "64",
        "--tokens",
        "256",
        "--threads",
        "1",
        *extra,
    )
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_script_then_suite_and_heatmap_on_its_checkpoint(tmp_path, capsys, script):
    log = train(script, tmp_path / "run", "--ar-steps", "5", "--filler-warmup", "5")
    assert [r["step"] for r in log] == list(range(1, len(log) + 1))
    assert [r["task"] for r in log[:10]] == ["ar"] * 5 + [
        "filler"
    ] * 5  # causal pretraining, then the filler
    assert (
        any("em" in r for r in log) and (tmp_path / "run" / "last" / "model.safetensors").is_file()
    )
    resumed = train(
        script, tmp_path / "run", "--resume"
    )  # the step count (and curriculum) carries on
    assert [r["step"] for r in resumed] == list(range(1, len(resumed) + 1)) and len(resumed) > len(
        log
    )

    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        "tiny-dllm",
        "--checkpoint",
        str(tmp_path / "run" / "last"),
        "--policies",
        "maskkv",
        "--budgets",
        "4",
        "full",
        "--samples",
        "1",
        "--out",
        str(out),
        "--quiet",
        "--threads",
        "1",
        "--heatmap",
        "--heatmap-policies",
        "maskkv",
        "--heatmap-budget",
        "4",
        "--heatmap-samples",
        "1",
        "--heatmap-lengths",
        "32",
        "64",
        "--heatmap-depths",
        "0",
        "1",
    ]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "needle retrieval exact match" in printed and "maskkv@4" in printed
    results = json.loads((out / "quality_tiny_dllm.json").read_text())
    ids = list(results["samples"])
    assert results["tasks"] == ["single", "multikey"] and len(ids) == 2
    check_invariants(results, ["maskkv"], [4, "full"], ids)
    for cells in results["cells"].values():  # retrieval is scored by exact match of the whole value
        for sid, cell in cells.items():
            s = results["samples"][sid]
            assert s["prompt_len"] > 256 and cell["score"] == float(
                cell["tokens"] == s["ids"][s["start"] : s["stop"]]
            )
    grid = json.loads((out / "needle_heatmap.json").read_text())
    assert list(grid["exact_match"]) == ["uncached", "full cache", "maskkv@4"] and grid[
        "lengths"
    ] == [32, 64]
    assert (out / "needle_heatmap.png").stat().st_size > 1000


def test_shipped_checkpoint_retrieves_uncached():
    """data/tiny_dllm ships because it retrieves: the plain model (no MaskKV, no cache: every step
    recomputes the whole sequence) in the suite's greedy loop fills >= 80 % of 32 held-out
    256-token haystacks per task exactly, far above guessing among the needles. What MaskKV and
    the full prompt cache keep of it is the quality suite's business (docs/quality.md)."""
    bundle = load_bundle("tiny-dllm", samples=32)
    model = bundle.model
    assert model.config.mask_token_id == nt.MASK and not model.model.layers[0].self_attn.is_causal
    for task in bundle.tasks:
        samples = [s for s in bundle.samples if s.task == task]
        assert len(samples) == 32 and all(s.prompt_len > 256 for s in samples)
        hits = sum(infill(model, s, nt.MASK)[0] == s.truth() for s in samples)
        assert hits / len(samples) >= 0.8, (task, hits)


def test_tiny_dllm_errors(tmp_path, capsys):
    with pytest.raises(ModelUnavailable, match="no config.json"):
        load_bundle("tiny-dllm", checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="for the project.s own models only"):
        load_bundle("tiny-llama", checkpoint=str(tmp_path))
    assert cli_main(["eval", "--model", "tiny-llama", "--heatmap", "--out", str(tmp_path)]) == 2
    assert "--model tiny-dllm" in capsys.readouterr().err
