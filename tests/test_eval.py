"""The quality suite (maskkv_compile.evaluation, `maskkv-compile eval`, examples/eval_suite.py)
on small slices: it runs end to end and checks its own invariants."""

import json
import runpy
from pathlib import Path

import pytest
import torch
from helpers import check_invariants

from maskkv_compile.cli import main as cli_main
from maskkv_compile.evaluation import (
    FULL,
    Suite,
    aggregate,
    load_bundle,
    markdown,
    plot,
    run_suite,
    table,
)
from maskkv_compile.evaluation.models import kabat_cdr_h3, read_table, smiles_tokens

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_llama_suite_invariants_and_resume(tmp_path):
    policies, budgets = ["maskkv", "snapkv", "random"], [4, FULL]
    suite = run_suite("tiny-llama", policies, budgets, samples=1, out=tmp_path, progress=False)
    path = tmp_path / "quality_tiny_llama.json"
    saved = json.loads(path.read_text())
    ids = list(saved["samples"])
    assert len(ids) == 2 and suite.optimize_calls == 2 + len(policies) * len(budgets)
    check_invariants(saved, policies, budgets, ids)
    assert saved["profile"][
        "importance"
    ]  # maskkv got a layer profile (from the calibration prompts)
    for cell in saved["cells"]["maskkv@4"].values():
        assert cell["kept"] == 4 and cell["kl"] > 0  # an evicted cache is not the uncached model
    tables = {m: table(saved, m) for m in ("retention", "agree_uncached", "agree_full", "kl")}
    assert "maskkv" in tables["kl"] and "full cache (no eviction)" in tables["kl"]

    # resuming from a complete JSON recomputes nothing and gives the same tables
    again = Suite(
        load_bundle("tiny-llama", samples=1),
        policies,
        budgets,
        json_path=path,
        resume=True,
        progress=False,
    )
    again.run()
    assert again.optimize_calls == 0 and again.model_calls == 0
    assert {m: table(again.results, m) for m in tables} == tables
    assert json.loads(path.read_text())["cells"] == saved["cells"]

    # a missing configuration is recomputed alone, deterministically
    partial = json.loads(path.read_text())
    del partial["cells"]["snapkv@4"]
    path.write_text(json.dumps(partial))
    third = run_suite(
        "tiny-llama", policies, budgets, samples=1, out=tmp_path, resume=True, progress=False
    )
    assert third.optimize_calls == 1
    redone = third.results["cells"]["snapkv@4"]
    assert {k: c["tokens"] for k, c in redone.items()} == {
        k: c["tokens"] for k, c in saved["cells"]["snapkv@4"].items()
    }
    assert third.results["cells"]["snapkv@4"].keys() == saved["cells"]["snapkv@4"].keys()

    assert "### task span" in markdown(saved)
    assert all(p.stat().st_size > 1000 for p in plot(saved, tmp_path / "q"))


def test_cli_eval_and_resume(tmp_path, capsys):
    args = [
        "eval",
        "--model",
        "tiny-llama",
        "--policies",
        "mask_voting_uniform",
        "--budgets",
        "2",
        "full",
        "--samples",
        "1",
        "--tasks",
        "suffix",
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-plots",
        "--threads",
        str(torch.get_num_threads()),
    ]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert "4 optimize() calls" in first and "agree_uncached" in first
    assert cli_main(args + ["--resume"]) == 0
    second = capsys.readouterr().out
    assert "0 optimize() calls, 0 model calls" in second
    assert (
        first.split("optimize() calls")[0].rsplit("\n", 1)[0]
        == second.split("optimize() calls")[0].rsplit("\n", 1)[0]
    )
    assert (tmp_path / "quality_tiny_llama.md").read_text().startswith("model: tiny LLaDA-style")

    # a resumed run that adds a smaller budget keeps the budgets in order (tables and plots)
    budget = args.index("--budgets") + 1
    assert cli_main(args[:budget] + ["1"] + args[budget + 2 :] + ["--resume"]) == 0
    assert "1 optimize() calls" in capsys.readouterr().out
    saved = json.loads((tmp_path / "quality_tiny_llama.json").read_text())
    assert saved["budgets"] == [1, 2, "full"]
    header = (tmp_path / "quality_tiny_llama.md").read_text().split("| policy", 1)[1]
    assert header.index("B=1 ") < header.index("B=2 ")


def test_cli_eval_trade_off_with_revote_and_refresh(tmp_path, capsys):
    """`eval --revote/--refresh` runs the re-vote and refresh cells next to one-shot and writes the
    trade-off table and Pareto plot; `--revote-voters masked --resume` adds its own cells beside
    the first run's, which are not recomputed."""
    from maskkv_compile.evaluation import tradeoff

    args = [
        "eval",
        "--model",
        "tiny-llama",
        "--policies",
        "maskkv",
        "--budgets",
        "3",
        "full",
        "--samples",
        "1",
        "--tasks",
        "suffix",
        "--out",
        str(tmp_path),
        "--quiet",
        "--threads",
        str(torch.get_num_threads()),
        "--revote",
        "1",
        "--refresh",
        "2",
    ]
    assert cli_main(args) == 0
    assert "retention vs step cost" in capsys.readouterr().out
    saved = json.loads((tmp_path / "quality_tiny_llama.json").read_text())
    revoted = saved["cells"]["maskkv@3+revote1"]
    assert all(cell["revotes"] >= 1 for cell in revoted.values())
    assert all(cell["revotes"] == 0 for cell in saved["cells"]["maskkv@3+refresh2"].values())
    settings = [row["setting"] for row in tradeoff.rows(saved) if row["setting"] != "reference"]
    assert settings == ["one-shot", "revote 1", "refresh 2"], settings
    assert (tmp_path / "quality_tiny_llama_tradeoff.md").exists()
    assert (tmp_path / "quality_tiny_llama_pareto.png").stat().st_size > 1000

    assert cli_main(args + ["--revote-voters", "masked", "--resume"]) == 0
    assert "1 optimize() calls" in capsys.readouterr().out  # only the masked-voters cell is new
    both = json.loads((tmp_path / "quality_tiny_llama.json").read_text())
    assert both["revote_voters"] == ["response", "masked"]
    assert both["cells"]["maskkv@3+revote1"] == revoted
    assert all(cell["revotes"] >= 1 for cell in both["cells"]["maskkv@3+revote1+masked"].values())
    settings = [row["setting"] for row in tradeoff.rows(both) if row["setting"] != "reference"]
    assert settings == ["one-shot", "revote 1", "revote 1 masked", "refresh 2"], settings


def test_antiberty_bundle():
    pytest.importorskip("antiberty")
    bundle = load_bundle("antiberty", samples=2)
    assert [s.id for s in bundle.samples] == [
        "trastuzumab/cdr3",
        "adalimumab/cdr3",
        "trastuzumab/suffix",
        "adalimumab/suffix",
    ]
    cdr3 = bundle.samples[0]
    assert bundle.decode(cdr3.truth()) == "WGGDGFYAMDY" and cdr3.prompt_len == 111
    x = cdr3.masked(bundle.mask_id)
    assert (
        bool((x[0, cdr3.start : cdr3.stop] == bundle.mask_id).all())
        and int((x == bundle.mask_id).sum()) == 11
    )
    # calibration chains are never evaluated
    calibration = {tuple(c[0].tolist()) for c in bundle.calibration}
    assert len(calibration) == 4 and not calibration & {
        s.ids for s in load_bundle("antiberty").samples
    }


def test_data_files():
    rows = read_table("antibody_heavy_chains.tsv")
    evaluated = [r for r in rows if r["split"] == "eval"]
    assert len(evaluated) >= 8 and {r["name"] for r in rows[:4]} == {
        "trastuzumab",
        "adalimumab",
        "pertuzumab",
        "rituximab",
    }
    cdr3 = {r["name"]: r["vh"][slice(*kabat_cdr_h3(r["vh"]))] for r in rows}
    assert cdr3["trastuzumab"] == "WGGDGFYAMDY" and cdr3["adalimumab"] == "VSYLSTASSLDY"
    assert cdr3["rituximab"] == "STYYGGDWYFNV"
    reactions = read_table("uspto_reactions.tsv")
    assert len([r for r in reactions if r["split"] == "eval"]) >= 8
    for row in reactions:
        tokens = smiles_tokens(row["rxn"])
        assert tokens.count(">>") == 1 and tokens.count("(") == tokens.count(")")
    assert smiles_tokens("CC(=O)[O-].[Na+]>>Clc1ccccc1Br") == [
        "C",
        "C",
        "(",
        "=",
        "O",
        ")",
        "[O-]",
        ".",
        "[Na+]",
        ">>",
        "Cl",
        "c",
        "1",
        "c",
        "c",
        "c",
        "c",
        "c",
        "1",
        "Br",
    ]


def test_eval_suite_example(tmp_path, script):
    policies, budgets = ["maskkv", "snapkv"], [4, FULL]
    out = script(
        "examples/eval_suite.py",
        "--out",
        str(tmp_path),
        "--policies",
        *policies,
        "--budgets",
        *map(str, budgets),
    )
    assert "agree_uncached:" in out and "full cache (no eviction)" in out
    assert "0 optimize() calls, 0 model calls, same table: True" in out
    (path,) = tmp_path.glob(
        "quality_*.json"
    )  # the example runs AntiBERTy when installed, else tiny-llama
    results = json.loads(path.read_text())
    ids = list(results["samples"])
    check_invariants(results, policies, budgets, ids)
    assert len(results["tasks"]) == 2 and list(tmp_path.glob("quality_*_kl.png"))
    assert (
        results["profile"]["meta"]["n_prompts"] >= 2
    )  # maskkv's profile: calibration prompts only
    if results["model"] == "antiberty":  # the real pretrained model on a small slice
        assert ids == ["trastuzumab/cdr3", "trastuzumab/suffix"]
        assert results["samples"]["trastuzumab/cdr3"]["text"] == "WGGDGFYAMDY"
        # a pretrained model recovers real residues: the uncached fill is far from random (1/20)
        assert sum(results["cells"]["uncached"][i]["score"] for i in ids) / len(ids) > 0.3
        assert aggregate(results, "maskkv@full", ids)["retention"] == pytest.approx(100.0)
        assert "B=4 (4%)" in table(results, "retention")


def _synthetic(scores: dict, kl: dict = None) -> dict:
    """A quality JSON with the given per-sample scores (and KLs) per configuration key."""
    n = len(next(iter(scores.values())))
    ids = [f"s{i}/t" for i in range(n)]
    cells = {
        key: {
            sid: {
                "tokens": [],
                "score": float(v),
                "agree_uncached": float(v),
                "agree_full": float(v),
                "kl": (kl or {}).get(key, [0.5] * n)[i],
            }
            for i, (sid, v) in enumerate(zip(ids, values))
        }
        for key, values in scores.items()
    }
    return {
        "note": "synthetic",
        "model": "synthetic",
        "policies": ["maskkv", "snapkv"],
        "budgets": [4],
        "tasks": ["t"],
        "samples": {sid: {"task": "t", "prompt_len": 100} for sid in ids},
        "cells": cells,
    }


def test_bootstrap_intervals():
    from maskkv_compile.evaluation.report import interval, paired_interval
    from maskkv_compile.evaluation.suite import FULL_CACHE

    coin = [1, 0] * 8  # 16 samples, mean 0.5: the normal approximation gives 0.5 +- 1.96 * 0.125
    results = _synthetic(
        {FULL_CACHE: [1] * 16, "maskkv@4": coin, "snapkv@4": [0, 1] * 8},
        kl={"maskkv@4": [0.1, 0.3] * 8, "snapkv@4": [0.2, 0.6] * 8},
    )
    ids = list(results["samples"])
    lo, hi = interval(results, "maskkv@4", ids, "score")
    assert 0.2 < lo < 0.3 and 0.7 < hi < 0.8
    spread = _synthetic(
        {FULL_CACHE: [1] * 16, "maskkv@4": [i / 15 for i in range(16)], "snapkv@4": [0] * 16}
    )
    seeded = interval(spread, "maskkv@4", ids, "score")
    assert (
        seeded
        == interval(spread, "maskkv@4", ids, "score")
        != interval(spread, "maskkv@4", ids, "score", seed=1)
    )
    assert interval(results, FULL_CACHE, ids, "score") == (1.0, 1.0)  # no spread, no interval
    lo, hi = interval(results, "maskkv@4", ids, "retention")
    assert lo < 50.0 < hi
    # retention resamples the full cache's scores with the config's (a ratio of paired sums):
    # a configuration that scores what the full cache scores is 100 [100, 100] whatever the spread
    same = _synthetic({FULL_CACHE: coin, "maskkv@4": coin, "snapkv@4": coin})
    assert interval(same, "maskkv@4", ids, "retention") == (100.0, 100.0)
    # paired: the same resample for both configurations
    diff, (lo, hi) = paired_interval(same, "maskkv@4", "snapkv@4", ids, "score")
    assert diff == lo == hi == 0.0
    ratio, (lo, hi) = paired_interval(
        results, "maskkv@4", "snapkv@4", ids, "kl"
    )  # snapkv's KL is exactly 2x
    assert ratio == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    diff, (lo, hi) = paired_interval(results, "maskkv@4", "snapkv@4", ids, "score")
    assert (
        diff == 0.0 and lo < -0.2 and hi > 0.2
    )  # anti-correlated samples: a wide interval around a tie
    text = table(results, "score", budgets=[4])
    assert "**0.500** [0.25, 0.75]" in text  # the value in bold (the best), then its interval
    assert "bootstrap interval" in markdown(results)


def test_readme_quality_summary_is_computed_from_the_jsons():
    """The README's quality table is what the docs/ JSONs give, not typed: regenerate it with
    scripts/update_readme_quality.py after an eval run."""
    from maskkv_compile.evaluation.readme_summary import END, START, block, rewrite

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert rewrite(readme, root / "docs") == readme, "run scripts/update_readme_quality.py"
    table = block(root / "docs")
    assert "| rxnfp (91) | 4 (4%) |" in table  # a row from docs/quality_rxnfp.json
    with pytest.raises(ValueError, match="markers"):
        rewrite(readme.replace(START, ""), root / "docs")
    assert END in readme


def test_resume_adds_the_coverage_variant_to_a_json_whose_profile_predates_it(tmp_path):
    """A quality JSON written before profiles held coverage curves: resuming with
    maskkv_coverage measures the profile again (the same importances, now with curves), and
    the cells computed before stay."""
    run_suite("tiny-llama", ["maskkv"], [4], samples=1, out=tmp_path, progress=False)
    path = tmp_path / "quality_tiny_llama.json"
    old = json.loads(path.read_text())
    for key in ("coverage", "coverage_k"):
        del old["profile"][key]
    path.write_text(json.dumps(old))
    suite = run_suite(
        "tiny-llama",
        ["maskkv", "maskkv_coverage"],
        [4],
        samples=1,
        out=tmp_path,
        resume=True,
        progress=False,
    )
    saved = json.loads(path.read_text())
    assert (
        saved["profile"]["coverage"]
        and saved["profile"]["importance"] == old["profile"]["importance"]
    )
    assert saved["cells"]["maskkv@4"] == old["cells"]["maskkv@4"]
    assert set(saved["cells"]["maskkv_coverage@4"]) == set(old["cells"]["maskkv@4"])
    assert suite.optimize_calls == 1


def test_merge_script_joins_runs_over_disjoint_tasks(tmp_path, script):
    """scripts/merge_quality_json.py: two runs over disjoint --tasks merge into the JSON of one
    run over both (every cell equal but its timings), with its tables; parts that disagree on a
    cell, or come from another loop, are refused."""
    merge_script = "scripts/merge_quality_json.py"

    def run(out, *tasks):
        args = ["eval", "--model", "tiny-llama", "--policies", "mask_voting_uniform"]
        args += ["--budgets", "2", "full", "--samples", "1", "--tasks", *tasks]
        args += ["--out", str(tmp_path / out), "--quiet", "--no-plots"]
        assert cli_main(args + ["--threads", str(torch.get_num_threads())]) == 0
        return tmp_path / out / "quality_tiny_llama.json"

    parts = [run("a", "suffix"), run("b", "span")]
    whole = json.loads(run("both", "suffix", "span").read_text())
    script(merge_script, *map(str, parts), "--out", str(tmp_path / "merged"))
    merged = json.loads((tmp_path / "merged" / "quality_tiny_llama.json").read_text())
    assert merged["tasks"] == whole["tasks"] and merged["budgets"] == whole["budgets"]
    assert merged["samples"] == whole["samples"]
    assert sorted(merged["cells"]) == sorted(whole["cells"])
    timings = ("seconds", "net_seconds", "step_ms")
    for key, cells in whole["cells"].items():
        assert sorted(cells) == sorted(merged["cells"][key])
        for sid, cell in cells.items():
            got = merged["cells"][key][sid]
            assert {k: v for k, v in got.items() if k not in timings} == {
                k: v for k, v in cell.items() if k not in timings
            }, (key, sid)
    table = (tmp_path / "merged" / "quality_tiny_llama.md").read_text()
    assert "### task span" in table and "### task suffix" in table

    merge = runpy.run_path(str(Path(__file__).parents[1] / merge_script))["merge"]
    a, b = (json.loads(p.read_text()) for p in parts)
    both = json.loads(parts[0].read_text())
    sid = next(iter(both["cells"]["uncached"]))
    both["cells"]["uncached"][sid]["tokens"] = [
        t + 1 for t in both["cells"]["uncached"][sid]["tokens"]
    ]
    with pytest.raises(ValueError, match="differs between parts"):
        merge([a, both])
    with pytest.raises(ValueError, match="semi_ar"):
        merge([a, {**b, "semi_ar": 4}])
    with pytest.raises(ValueError, match="layer profile"):
        merge([{**a, "profile": {"importance": [1.0]}}, {**b, "profile": {"importance": [2.0]}}])


def test_trade_off_step_cost_counts_every_step():
    """The trade-off's step cost is the mean over every step of the run: a long answer's
    refreshes weigh as often as they ran (a median over samples would report the short
    answers' plain steps, here 1 ms, for a configuration whose steps cost 9.1 ms on average)."""
    from maskkv_compile.evaluation import tradeoff

    def cell(steps, ms):
        return {"tokens": [0] * (steps + 1), "step_ms": ms, "net_seconds": 1.0, "revotes": 0}

    ids = ["0/a", "1/a", "2/a"]
    cells = {"k": {"0/a": cell(1, 1.0), "1/a": cell(1, 1.0), "2/a": cell(9, 10.0)}}
    cost = tradeoff._cost({"cells": cells}, "k", ids)
    assert cost["step_ms"] == pytest.approx((1.0 + 1.0 + 90.0) / 11)
    assert cost["tokens_per_s"] == pytest.approx(14 / 3.0)
