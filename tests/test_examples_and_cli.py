"""Every example script and CLI subcommand runs (small sizes, eager backend where it matters)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_optimize_generate_example():
    out = run("examples/optimize_generate.py")
    assert "full budget == uncached: True" in out
    assert "kept per layer and KV head: [[8, 8, 8, 8], [8, 8, 8, 8]]" in out


def test_drop_in_loop_example():
    out = run("examples/drop_in_loop.py")
    assert "calls: 1 prefill, 7 steps" in out


def test_dream_padded_batch_example():
    out = run("examples/dream_padded_batch.py")
    assert "prompt lengths: [5, 12, 9] | transitions: {'new': 1, 'step': 5}" in out
    assert "each row as alone: True" in out
    assert "CFG in one batch: {'new': 1, 'step': 5} | unconditional row's prompt: 12 masks" in out


@pytest.mark.inductor
def test_torch_compile_backend_example_without_importing_the_package():
    source = (ROOT / "examples/torch_compile_backend.py").read_text()
    # the package itself is imported only after the loop ran (to list the runtimes)
    assert source.index("\nimport maskkv_compile") > source.index("print(\"after 4 steps:\"")
    out = run("examples/torch_compile_backend.py")
    assert "after 4 steps:" in out
    assert "MaskKV runtimes (prefills, steps): [(1, 3)]" in out


@pytest.mark.parametrize("model", ["tiny-llama", "antiberty"])
def test_cli_demo(model):
    if model == "antiberty":
        pytest.importorskip("antiberty")
    out = run("-m", "maskkv_compile.cli", "demo", "--model", model, "--backend", "eager")
    lines = out.splitlines()
    sample = re.search(r"^sample: \S+, prompt (\d+) tokens, (\d+) masked positions filled one per step$", out, re.M)
    assert sample, out
    prompt_len, span = map(int, sample.groups())
    assert span > 1 and prompt_len > 8  # a fill of several steps, on a prompt longer than the budget (8)

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
    assert f"MaskKV calls in the timed fill: 1 prefill, {span - 1} steps (transitions {{'new': 1, 'step': {span - 1}}})" in out
    fills = {name: re.search(rf"^{name}\s*: (.+)$", out, re.M).group(1) for name in ("true", "uncached", "MaskKV")}
    if model == "antiberty":
        assert fills["true"] == "WGGDGFYAMDY"  # trastuzumab's CDR-H3, filled by the real model
        assert all(len(fill) == span for fill in fills.values())  # one residue per position
        assert sum(a == b for a, b in zip(fills["MaskKV"], fills["uncached"])) == agree  # the table says what it filled


def test_cli_bench():
    out = run("-m", "maskkv_compile.cli", "bench", "--quick")
    rows = {re.split(r"\s{2,}", line.strip())[1]: line for line in out.splitlines() if line.strip().startswith("48 ")}
    plain = {"uncached", "uncached, torch.compile", "prompt cache (no eviction)", "dual cache (no eviction)",
             "MaskKV budget 4", "MaskKV budget 4 + dual cache"}
    assert plain | {"uncached CFG", "MaskKV budget 4, CFG"} <= set(rows)
    for name in plain - {"uncached"} | {"MaskKV budget 4, CFG"}:
        ratios = [cell for cell in re.split(r"\s{2,}", rows[name].strip()) if cell.endswith("x") or cell == "-"]
        assert float(ratios[0][:-1]) > 0, name  # vs uncached (the run asserts CFG ran cached on both halves)
        if name != "MaskKV budget 4, CFG":
            assert float(ratios[1][:-1]) > 0, name  # vs compiled (the dual rows: the run asserts block steps ran)


def test_cli_help():
    for sub in ([], ["demo"], ["bench"]):
        assert "usage" in run("-m", "maskkv_compile.cli", *sub, "--help")
