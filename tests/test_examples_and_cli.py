"""Every example script and CLI subcommand runs (small sizes, eager backend where it matters).

Examples and subcommands run in this process (``runpy`` / ``cli.main``): a fresh interpreter
proves nothing more there and costs seconds each. Subprocesses remain where the process is
the point: the installed console script, the torchrun launches (two ranks) and the
torch.compile backend example that must work without the package imported.
"""

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from maskkv_compile.bench_plots import main as plots_main
from maskkv_compile.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    """A fresh interpreter, for what needs one."""
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_optimize_generate_example(script):
    out = script("examples/optimize_generate.py")
    assert "full budget == uncached: True" in out
    assert "kept per layer and KV head: [[8, 8, 8, 8], [8, 8, 8, 8]]" in out


def test_drop_in_loop_example(script):
    out = script("examples/drop_in_loop.py")
    assert "calls: 1 prefill, 7 steps" in out


def test_block_diffusion_example(script):
    out = script("examples/block_diffusion.py")
    assert "1. own generate == plain model: True | {'new': 1, 'step': 10, 'extend': 3}" in out
    if "skipped" not in out:
        assert "2. LLaDA2Pipeline == plain model: True | {'new': 1, 'step': 11, 'extend': 3}" in out
    assert "{'new': 1, 'step': 7, 'extend': 2} | masks left: 0" in out
    assert "layer 0 keeps [32] per KV head of 224 prefix entries" in out
    assert "(2 re-selections)" in out
    assert "4. token-shift loop == plain model: True | {'new': 1, 'step': 10, 'extend': 3}" in out
    # 3 windows after a 192-token prefill: the first block holds the prompt's last 8 tokens and 8
    # masks (2 refinement calls), the others 16 masks (4 each); each window's first call is the
    # new / an extend, every other call a step, the three commits too: 2 + 4 + 4
    assert "5. SDAR's cached loop == plain model: True | {'new': 1, 'step': 10, 'extend': 2}" in out
    assert out.count("at budget 32: layer 0 keeps [32, 32] per KV head | masks left: 0") == 2
    # the prefill (192 tokens) is the new: its window [prompt ; 16 masks] is continued by the
    # first block's calls (the prompt's last 8 tokens and 8 masks; then its commit), the next
    # block extends it; greedy above 0.95 commits about one token a call
    assert (
        "6. Fast-dLLM v2's cached loop == plain model: True | {'new': 1, 'step': 24, 'extend': 1}"
        in out
    )
    # its block cache: refreshes keep the block's K/V, small-block calls compute their 8 rows;
    # the two commits are steps, the second block's first call (a refresh) extends
    assert (
        "with its block cache == plain model: True | {'new': 1, 'block_refresh': 7, "
        "'block_step': 15, 'step': 2, 'extend': 1}" in out
    )


def test_diffusion_gemma_example(script):
    out = script("examples/diffusion_gemma.py")
    assert (  # 48 tokens; the prompt's and the first canvas's encoder calls
        "1. full budget, prefill in 3 chunks, 2 of 2 encoder calls stopped once the cache was "
        "written == plain model: True" in out
    )
    assert (
        "2. budget 8: 2 votes, 2 encoder calls, 8 decoder calls; full layer 1 keeps 8 of 64" in out
    )
    (kept,) = re.findall(r"full layers 1-3 keep \[(\d+), (\d+), (\d+)\] of 40 x 3 entries", out)
    kept = [int(k) for k in kept]
    assert sum(kept) == 120 and len(set(kept)) > 1  # the whole budget, split by the profile
    # diffusers 0.42.1's pipeline calls the decoder's mask builder with transformers' old
    # keyword; when that is fixed upstream the example says the pipeline ran
    assert (
        "got an unexpected keyword argument 'past_key_values'" in out
        or "3. DiffusionGemmaPipeline ran" in out
        or "3. diffusers not installed" in out
    )


def test_cli_bench_gemma_quick_prints_every_run_side_by_side(cli):
    out = cli("bench-gemma", "--quick")
    for run in ("plain", "MaskKV, no eviction", "MaskKV budget 16"):
        assert f"  {run} " in out or f"{run}  " in out, run
    line = next(s for s in out.splitlines() if "MaskKV budget 16" in s and "%" in s)
    assert "2.7%" in line  # the full layer keeps 16 of 600 entries: what generate's cache holds


def test_cli_bench_block_quick_prints_every_run_side_by_side(cli):
    out = cli("bench-block", "--quick")
    for run in ("uncached", "uncached, torch.compile", "prefix cache (exact)", "MaskKV budget 8"):
        assert f"  {run} " in out or f"{run}  " in out, run
    # the exact prefix cache reproduces the uncached loop; every ratio was measured in the run
    lines = out.splitlines()
    prefix = next(s for s in lines if "prefix cache (exact)" in s and "1.00x" in s)
    assert prefix.rstrip().endswith("yes")
    # without the uncached runs the prefix cache is the baseline every ratio is measured against
    out = cli("bench-block", "--quick", "--no-uncached")
    assert "uncached" not in out.replace("--no-uncached", "")
    table = [s for s in out.splitlines() if "KiB" in s]  # the table's rows, not the progress
    prefix = next(s for s in table if "prefix cache (exact)" in s)
    assert "1.00x" in prefix and any("MaskKV budget 8" in s and "x " in s for s in table)


def test_the_block_benchmark_runs_maskkv_on_the_loops_mask_token_and_its_cached_path():
    """The loop writes ``MASK_ID``; the model's config must say so (optimize reads it), and every
    cached run is one prefill, then extends and steps: nothing uncached, restarted or fallen
    back, which would time another path than the one the table names."""
    from maskkv_compile.bench_block import MASK_ID, build_model, run_block_benchmark
    from maskkv_compile.cli import QUICK_BLOCK_BENCH

    assert build_model(1, 128, 256, 64).config.mask_token_id == MASK_ID
    rows = run_block_benchmark(
        **{**QUICK_BLOCK_BENCH, "backend": "eager"}, uncached=False, print_fn=None
    )
    assert [r["run"] for r in rows][0] == "prefix cache (exact)" and len(rows) == 3
    for row in rows:
        # counts of the last timed generation alone: reset before each of the repeats
        assert set(row["transitions"]) == {"new", "step", "extend"}, row
        assert row["transitions"]["new"] == 1 and row["transitions"]["extend"] >= 1, row
        times = sorted(row["seconds_all"])
        assert len(times) == QUICK_BLOCK_BENCH["repeats"] == 2 and row["seconds"] == times[1]
    with pytest.raises(ValueError, match="repeats=0: each run is timed at least once"):
        run_block_benchmark(prompt_lens=[8], repeats=0, print_fn=None)


def test_dream_padded_batch_example(script):
    out = script("examples/dream_padded_batch.py")
    assert "prompt lengths: [5, 12, 9] | transitions: {'new': 1, 'step': 5}" in out
    assert "each row as alone: True" in out
    assert "CFG in one batch: {'new': 1, 'step': 5} | unconditional row's prompt: 12 masks" in out


@pytest.mark.inductor
def test_tensor_parallel_example():
    """Under Inductor (the eager backend's two ranks: ``tests/test_tensor_parallel.py``)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "examples/tensor_parallel.py",
        "--backend",
        "inductor",
        timeout=600,
    )
    assert (
        "rank 1 kept per layer and local KV head: [[8, 8], [8, 8]]" in out
    )  # 2 of the 4 KV heads per rank
    assert "same tokens on every rank: True" in out
    assert "calls: 1 prefill, 15 steps" in out
    assert "full budget + refresh every step == uncached sharded model: True" in out


@pytest.mark.inductor
def test_torch_compile_backend_example_without_importing_the_package():
    source = (ROOT / "examples/torch_compile_backend.py").read_text()
    # the package itself is imported only after the loop ran (to list the runtimes)
    assert source.index("\nimport maskkv_compile") > source.index('print("after 4 steps:"')
    out = run("examples/torch_compile_backend.py")
    assert "after 4 steps:" in out
    assert "MaskKV runtimes (prefills, steps): [(1, 3)]" in out


@pytest.mark.parametrize("model", ["tiny-llama", "antiberty"])
def test_cli_demo(model, cli):
    if model == "antiberty":
        pytest.importorskip("antiberty")
    out = cli("demo", "--model", model, "--backend", "eager")
    lines = out.splitlines()
    sample = re.search(
        r"^sample: \S+, prompt (\d+) tokens, (\d+) masked positions filled one per step$", out, re.M
    )
    assert sample, out
    prompt_len, span = map(int, sample.groups())
    assert (
        span > 1 and prompt_len > 8
    )  # a fill of several steps, on a prompt longer than the budget (8)

    def row(name):
        (line,) = [line for line in lines if line.startswith(name)]
        return re.split(r"\s{2,}", line.strip())

    header = re.split(r"\s{2,}", next(line for line in lines if line.startswith("run ")).strip())
    assert header == ["run", "tokens/s", "kept KV", "true tokens", "agreement with uncached"]
    uncached, ours = row("uncached model"), row("MaskKV budget 8 (eager)")
    for cells in (uncached, ours):
        assert len(cells) == 5 and float(cells[1]) > 0  # tokens/s parses
        hits, total = map(int, cells[3].split("/"))
        assert total == span and 0 <= hits <= span
    agree, total = map(int, ours[4].split("/"))
    assert total == span and 0 <= agree <= span
    number, unit = ours[2].split()
    assert float(number) > 0 and unit in ("B", "KiB", "MiB")  # a kept cache was held
    # the MaskKV row ran cached: one prefill, then a step per remaining position
    transitions = f"(transitions {{'new': 1, 'step': {span - 1}}})"
    assert f"MaskKV calls in the timed fill: 1 prefill, {span - 1} steps {transitions}" in out
    fills = {
        name: re.search(rf"^{name}\s*: (.+)$", out, re.M).group(1)
        for name in ("true", "uncached", "MaskKV")
    }
    if model == "antiberty":
        assert fills["true"] == "WGGDGFYAMDY"  # trastuzumab's CDR-H3, filled by the real model
        assert all(len(fill) == span for fill in fills.values())  # one residue per position
        assert (
            sum(a == b for a, b in zip(fills["MaskKV"], fills["uncached"])) == agree
        )  # the table says what it filled


def test_revote_example(script):
    out = script("examples/revote.py")
    hits = {
        name: (int(a), int(b))
        for name, a, b in re.findall(r"^(.+?) +exact match (\d+)/(\d+)", out, re.M)
    }
    assert set(hits) == {"uncached", "MaskKV, one-shot votes", "MaskKV, revote=1"}, out
    assert (
        hits["MaskKV, revote=1"] == hits["uncached"]
    )  # re-selection recovers the uncached model's retrieval
    assert hits["MaskKV, revote=1"][0] >= hits["MaskKV, one-shot votes"][0]
    steps = dict(
        re.findall(r"^(MaskKV.+?) +exact.*\((\d+ steps, \d+) of them re-votes\)", out, re.M)
    )
    one_shot, revoting = (
        steps[name].split(" steps, ") for name in ("MaskKV, one-shot votes", "MaskKV, revote=1")
    )
    assert (
        one_shot[1] == "0" and int(revoting[1]) == int(revoting[0]) > 0
    )  # every step re-voted, none without


def _bench_table(out, prompt):
    lines = out.splitlines()
    header = next(line for line in lines if line.strip().startswith("prompt ") and "run" in line)
    headers = re.split(r"\s{2,}", header.strip())
    rows = {}
    for line in lines:
        if line.strip().startswith(f"{prompt} "):
            cells = re.split(r"\s{2,}", line.strip())
            assert len(cells) == len(headers), (headers, cells)
            rows[cells[1]] = dict(zip(headers, cells))
    return headers, rows


def test_cli_bench_quick_rows_ratios_and_floor_columns(cli):
    """One ``bench --quick`` (CFG on): every run's row, its ratios, and the floor columns."""
    out = cli("bench", "--quick")
    headers, rows = _bench_table(out, 48)  # every row has every column
    plain = {
        "uncached",
        "uncached, torch.compile",
        "prompt cache (no eviction)",
        "dual cache (no eviction)",
        "MaskKV budget 4",
        "MaskKV budget 4 + dual cache",
    }
    assert plain | {"uncached CFG", "MaskKV budget 4, CFG"} <= set(rows)
    for name in plain - {"uncached"} | {"MaskKV budget 4, CFG"}:
        # vs uncached (the run asserts CFG ran cached on both halves)
        assert float(rows[name]["vs uncached"][:-1]) > 0, name
        if name != "MaskKV budget 4, CFG":
            # vs compiled (the dual rows: the run asserts block steps ran)
            assert float(rows[name]["vs compiled"][:-1]) > 0, name
    assert headers[-4:] == ["step ms", "prefill ms", "step/floor", "prefill/forward"]
    for name in (
        "prompt cache (no eviction)",
        "dual cache (no eviction)",
        "MaskKV budget 4",
        "MaskKV budget 4 + dual cache",
    ):
        row = rows[name]
        assert float(row["step ms"]) > 0 and float(row["prefill ms"]) > 0, row
        assert float(row["step/floor"][:-1]) > 0 and float(row["prefill/forward"][:-1]) > 0, row
    assert rows["uncached"]["step/floor"] == "-"  # the floor is for the cached rows


def test_cli_bench_runs_json_and_plots(tmp_path, cli, capsys):
    results, plots = tmp_path / "bench.json", tmp_path / "plots"
    out = cli(
        "bench",
        "--quick",
        "--cfg-scale",
        "0",
        "--no-floor",
        "--threads",
        "1",
        "--runs",
        "maskkv",
        "maskkv-dual",
        "--json",
        str(results),
        "--plots",
        str(plots),
    )
    assert "1 threads" in out
    data = json.loads(results.read_text())
    assert data["command"].startswith("maskkv-compile bench --quick")
    runs = {(row["prompt"], row["run"]) for row in data["rows"]}
    # no compiled, prompt or dual cache row
    names = {"uncached", "MaskKV budget 4", "MaskKV budget 4 + dual cache"}
    assert runs == {(48, name) for name in names}
    assert all(
        row["speedup"] > 0 and row["seconds"] > 0 and "1 threads" in row["setup"]
        for row in data["rows"]
    )
    for name in ("bench_speedup.png", "bench_memory.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG", name
    assert plots_main([str(results), "--out", str(tmp_path / "again")]) == 0
    again = capsys.readouterr().out
    assert "bench_speedup.png" in again and (tmp_path / "again" / "bench_memory.png").exists()


def test_cli_bench_llada_shape_preset_and_compile_sweep(cli):
    out = cli(
        "bench",
        "--preset",
        "llada-shape",
        "--layers",
        "1",
        "--prompt-lens",
        "64",
        "--gen-length",
        "4",
        "--steps",
        "4",
        "--block-length",
        "2",
        "--budgets",
        "8",
        "--hidden",
        "128",
        "--backend",
        "eager",
        "--cfg-scale",
        "0",
        "--compile-sweep",
    )
    assert "Llama-style (llada-shape), 1 layers, hidden 128, 1 heads, MLP 384, vocab 126464" in out
    headers, rows = _bench_table(out, 64)
    assert {
        "uncached",
        "uncached, torch.compile",
        "MaskKV budget 8",
        "MaskKV budget 8 + dual cache",
    } <= set(rows)
    for name in ("MaskKV budget 8", "MaskKV budget 8 + dual cache"):
        assert (
            float(rows[name]["step/floor"][:-1]) > 0
            and float(rows[name]["prefill/forward"][:-1]) > 0
        )
    sweep = {
        re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())
        for line in out.splitlines()
        if line.startswith("MaskKV budget 8")
    }
    assert set(sweep) == {"MaskKV budget 8", "MaskKV budget 8 + dual cache"}
    for cells in sweep.values():  # cold s, warm s, Inductor compiles, recompiles, new dynamo graphs
        assert float(cells[1]) > 0 and float(cells[2]) > 0
        assert cells[3:] == [
            "0",
            "0",
            "0",
        ]  # eager backend: no Inductor; the sweep adds no dynamo graph either


def test_bench_timed_model_records_transitions_and_rows():
    import torch

    import maskkv_compile
    from maskkv_compile.bench import TimedModel, build_model
    from maskkv_compile.generate import generate

    model = build_model("tiny", layers=1, hidden=64, vocab=256, max_positions=64)
    mask_id = model.config.mask_token_id
    prompt = torch.randint(0, mask_id, (1, 20), generator=torch.Generator().manual_seed(0))
    opt = maskkv_compile.optimize(model, budget=4, backend="eager", block_length=4)
    proxy = TimedModel(opt)
    generate(proxy, prompt, mask_token_id=mask_id, gen_length=8, steps=8, block_length=4)
    kinds = [t for t, _, _ in proxy.calls]
    assert kinds == [
        "new",
        "block_refresh",
        "block_step",
        "block_step",
        "block_refresh",
        "block_step",
        "block_step",
        "block_step",
    ], kinds
    rows = {t: r.numel() for t, _, r in proxy.calls}
    assert rows == {"new": 28, "block_refresh": 8, "block_step": 4}, (
        rows
    )  # a block step computes its block alone
    summary = proxy.summary()
    assert summary["floor_rows"].numel() == 4 and summary["step_s"] > 0 and summary["prefill_s"] > 0


def test_cli_help(capsys):
    # the installed console script: the one subprocess here, it checks the entry point
    dirs = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    exe = next(
        (Path(d) / "maskkv-compile" for d in dirs if (Path(d) / "maskkv-compile").exists()), None
    )
    assert exe is not None, f"no maskkv-compile console script in {dirs}"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage: maskkv-compile" in out.stdout, out.stderr[-3000:]
    for sub in ("demo", "bench"):
        with pytest.raises(SystemExit) as exit_:
            cli_main([sub, "--help"])
        assert exit_.value.code == 0 and f"usage: maskkv-compile {sub}" in capsys.readouterr().out
