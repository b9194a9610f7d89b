"""The Triton kernels against the pure-torch references, on CPU under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is imported (``triton.jit`` reads it when the
kernels are decorated), and other test modules must not see it, so every check runs in a
subprocess (``tests/_triton_worker.py``): one for all interpreter cases, one for the
torch.compile registration, one for the GPU-check script's smoke mode. Shapes are small
(the interpreter is slow) but include non-multiples of every block size (32 rows, 64
keys, 16 head dims), GQA groups of 1, 2 and 3, non-contiguous q/k and masks, ragged
per-row kept_len (B, Hkv) with zeros and NaN in the padding, resp_valid with False entries
(NaN in those response K/V; a whole masked key block; a row with no key at all), and
masked votes (padding keys holding NaN, including a fully padded key block; voter rows and
prompt columns that do not count; a row with no voter). Outputs are allocated NaN-poisoned
to catch unwritten elements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_triton_worker.py")

VOTES_SHAPES = {  # (B, H, Hkv, S, D, Rv, P)
    "tiny-mha": (1, 2, 2, 20, 8, 5, 13),
    "gqa2": (2, 4, 2, 77, 24, 19, 50),
    "gqa3-multiblock": (1, 6, 2, 150, 32, 40, 100),
}
MASKED_VOTES_SHAPES = {  # masks "ragged": see vote_masks in the worker
    "gqa2-leftpad-block": (2, 4, 2, 150, 24, 40, 100),  # row 1: its first 70 keys are padding
    "mha-row-without-voters": (3, 2, 2, 33, 8, 7, 20),  # row 1: no voter at all
}
ATTN_SHAPES = {  # (B, H, Hkv, R, K, D, Dv), kept_len (B, Hkv) per row and KV head
    "tiny-full": ((1, 2, 2, 5, 13, 8, 8), [[13, 13]]),
    "gqa2-ragged": ((2, 4, 2, 37, 50, 24, 16), [[50, 0], [3, 50]]),
    "gqa3-multiblock": ((1, 6, 2, 70, 90, 32, 32), [[90, 41]]),
}
RAGGED_ATTN_SHAPES = {  # resp_valid "ragged" / "row-without-keys": see response_valid in the worker
    # row 1, KV head 0: nothing kept and its first 66 response keys masked (a whole 64-key block)
    "gqa3-rows-masked-block": ((2, 6, 2, 70, 90, 32, 32), [[90, 0], [0, 41]], "ragged"),
    "gqa2-rows-ragged": ((2, 4, 2, 37, 50, 24, 16), [[17, 0], [50, 3]], "ragged"),
    # row 1, KV head 0: no key at all -> zeros (as SDPA)
    "mqa-row-without-keys": ((2, 2, 1, 5, 13, 8, 8), [[13], [0]], "row-without-keys"),
}
CASES = (
    [
        {"id": f"votes-{name}-{dt}", "kernel": "mask_votes", "shape": shape, "dtype": dt, "seed": i}
        for i, (name, shape) in enumerate(VOTES_SHAPES.items())
        for dt in ("float32", "bfloat16")
    ]
    + [
        {
            "id": f"votes-masked-{name}-{dt}",
            "kernel": "mask_votes",
            "shape": shape,
            "dtype": dt,
            "seed": 10 + i,
            "masks": "ragged",
        }
        for i, (name, shape) in enumerate(MASKED_VOTES_SHAPES.items())
        for dt in ("float32", "bfloat16")
    ]
    + [
        {
            "id": f"attn-{name}-{dt}",
            "kernel": "cached_attention",
            "shape": shape,
            "kept_len": kl,
            "dtype": dt,
            "seed": i,
        }
        for i, (name, (shape, kl)) in enumerate(ATTN_SHAPES.items())
        for dt in ("float32", "bfloat16")
    ]
    + [
        {
            "id": f"attn-{name}-{dt}",
            "kernel": "cached_attention",
            "shape": shape,
            "kept_len": kl,
            "resp_valid": rv,
            "dtype": dt,
            "seed": 20 + i,
        }
        for i, (name, (shape, kl, rv)) in enumerate(RAGGED_ATTN_SHAPES.items())
        for dt in ("float32", "bfloat16")
    ]
    + [
        {
            "id": "votes-gqa2-float16-strided",
            "kernel": "mask_votes",
            "shape": VOTES_SHAPES["gqa2"],
            "dtype": "float16",
            "strided": True,
        },
        {
            "id": "votes-masked-gqa2-float16-strided",
            "kernel": "mask_votes",
            "shape": VOTES_SHAPES["gqa2"],
            "dtype": "float16",
            "strided": True,
            "masks": "ragged",
            "seed": 30,
        },
        {
            "id": "votes-masks-all-true-tiny-float32",
            "kernel": "mask_votes",
            "shape": VOTES_SHAPES["tiny-mha"],
            "dtype": "float32",
            "masks": "all-true",
        },
        {
            "id": "attn-gqa3-float16-strided",
            "kernel": "cached_attention",
            "shape": ATTN_SHAPES["gqa3-multiblock"][0],
            "kept_len": [[3, 90]],
            "dtype": "float16",
            "strided": True,
        },
        {
            "id": "attn-rows-float16-strided",
            "kernel": "cached_attention",
            "shape": RAGGED_ATTN_SHAPES["gqa2-rows-ragged"][0],
            "kept_len": [[0, 50], [9, 1]],
            "resp_valid": "ragged",
            "dtype": "float16",
            "strided": True,
            "seed": 31,
        },
        {  # block diffusion's shifted row before the block: some rows see only some keys
            "id": "attn-row-ends-float32",
            "kernel": "cached_attention",
            "shape": RAGGED_ATTN_SHAPES["gqa3-rows-masked-block"][0],
            "kept_len": [[90, 0], [0, 41]],
            "resp_valid": "ragged",
            "row_end": "ragged",
            "dtype": "float32",
            "seed": 32,
        },
    ]
)


def _run(
    args, *, interpret: bool, stdin: str | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton not installed (pip install maskkv-compile[gpu])")
    proc = _run([str(WORKER), "interpret"], interpret=True, stdin=json.dumps(CASES))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_kernel_matches_reference(interpreter_results, case):
    result = interpreter_results[case["id"]]
    assert "error" not in result, result["error"]
    assert result["all_written"], f"unwritten (NaN) output elements: {result}"
    assert result["close"], f"mismatch vs the reference: {result}"


def test_compile_routes_to_triton_only_on_triton_devices():
    pytest.importorskip("triton", reason="triton not installed (pip install maskkv-compile[gpu])")
    proc = _run([str(WORKER), "registration"], interpret=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["cpu_ok"], "CPU inputs must keep the pure-torch path"
    assert result["kernel_nodes"] == 3, result  # row lse + prompt column sums + cached attention
    assert result["maskkv_nodes"] == [], result  # both ops decomposed into their kernels


def test_gpu_check_without_cuda_says_so():
    proc = _run(["scripts/gpu_check.py"], interpret=False)
    assert proc.returncode == 2
    assert "CUDA" in proc.stderr


def test_gpu_check_cpu_smoke():
    pytest.importorskip("triton", reason="triton not installed (pip install maskkv-compile[gpu])")
    proc = _run(["scripts/gpu_check.py", "--cpu-smoke"], interpret=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "FAIL" not in proc.stdout
    assert (
        "mask_votes" in proc.stdout
        and "cached_attention" in proc.stdout
        and "select_kv" in proc.stdout
    )
    loop = proc.stdout[proc.stdout.index("full loop") :]
    for run in (
        "uncached",
        "MaskKV 8",
        "MaskKV 8 + dual cache",
    ):  # every run timed at both prompts, none failed
        assert (
            len(re.findall(rf"^{re.escape(run)} +(64|128) +[0-9.]+ +[0-9.]+x$", loop, re.M)) == 2
        ), (run, loop)


def test_gpu_check_bounded_run_skips_what_is_past_its_deadline():
    """The flags that bound a lent GPU's run: the kernel times skipped, the loop's runs started
    only before the deadline (here none), the checks all run."""
    pytest.importorskip("triton", reason="triton not installed (pip install maskkv-compile[gpu])")
    args = ["--cpu-smoke", "--no-times", "--prompts", "96", "--deadline-s", "0"]
    proc = _run(["scripts/gpu_check.py", *args], interpret=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "kernel times skipped (--no-times)" in proc.stdout
    assert proc.stdout.count("skipped (past --deadline-s)") == 3  # uncached, MaskKV, + dual
    assert "0 of 10 checks failed" in proc.stdout
