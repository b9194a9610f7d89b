"""Peak memory and time of the chunked CPU ``maskkv::mask_votes`` vs a materialized softmax.

    python benchmarks/bench_votes_memory.py            # P = 4k, 8k, 16k x L = 64, 256
    python benchmarks/bench_votes_memory.py --quick    # P = 1k, 2k x L = 64 (a smoke run)

Workload: one attention layer of an 8B-class model, B=1, H=32 query heads, Hkv=8 KV heads,
D=128, float32, S = P + L positions; the L response positions vote on the P prompt keys.
"materialized" is ``mask_votes_reference`` (softmax over the full (B, H, L, S) matrix);
"chunked" is the op's CPU path with its default chunk (64 rows x 1024 keys).

How peak memory is measured: each (method, P, L) runs in a fresh Python process, with its
inputs already built. The process resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), notes its current RSS, runs the method once and reads
the high-water mark back (``VmHWM`` in /proc/self/status); peak = VmHWM - RSS before. That
counts every page torch's CPU allocator touched during the call (large blocks are mmap-ed
and returned on free, so a fresh process per measurement keeps earlier runs out). Linux
only. Time: the best of ``--repeat`` calls in the same process, after the memory run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

B, H, HKV, D = 1, 32, 8, 128


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure_one(method: str, prompt: int, resp: int, repeat: int) -> dict:
    """Runs in the child process: peak extra RSS (MiB) of one call, best time (s)."""
    import torch
    from maskkv_compile.kernels.mask_votes import mask_votes_reference

    gen = torch.Generator().manual_seed(0)
    seq = prompt + resp
    q = torch.randn(B, H, seq, D, generator=gen)
    k = torch.randn(B, HKV, seq, D, generator=gen)
    voter_idx, prompt_idx = torch.arange(prompt, seq), torch.arange(prompt)
    scale = D**-0.5
    if method == "materialized":
        fn = lambda: mask_votes_reference(q, k, voter_idx, prompt_idx, scale)  # noqa: E731
    else:
        fn = lambda: torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, scale)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    times = [time.perf_counter() - start]
    peak = _status_kib("VmHWM") - before
    del out
    for _ in range(repeat - 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak / 1024, "seconds": min(times)}


def run_child(method: str, prompt: int, resp: int, repeat: int) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            method,
            str(prompt),
            str(resp),
            "--repeat",
            str(repeat),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--repeat", type=int, default=2, help="timed calls per measurement (best kept)"
    )
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "P", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, prompt, resp = args.child
        print(json.dumps(measure_one(method, int(prompt), int(resp), args.repeat)))
        return

    sizes = (
        [(1024, 64), (2048, 64)]
        if args.quick
        else [(p, l) for l in (64, 256) for p in (4096, 8192, 16384)]
    )
    print(f"mask_votes, CPU float32, B={B} H={H} Hkv={HKV} D={D}; peak = extra RSS during one call")
    head = (
        f"{'P':>6} {'L':>4} | {'peak MiB mat':>12} {'chunked':>8} {'ratio':>6} | "
        f"{'time s mat':>10} {'chunked':>8} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for prompt, resp in sizes:
        mat = run_child("materialized", prompt, resp, args.repeat)
        chk = run_child("chunked", prompt, resp, args.repeat)
        print(
            f"{prompt:>6} {resp:>4} | {mat['peak_mib']:>12.1f} {chk['peak_mib']:>8.1f} "
            f"{mat['peak_mib'] / max(chk['peak_mib'], 1e-3):>5.1f}x | {mat['seconds']:>10.3f} "
            f"{chk['seconds']:>8.3f} {chk['seconds'] / mat['seconds']:>5.2f}x",
            flush=True,
        )
    print(
        "ratio: peak = materialized / chunked (higher: chunked saves more); "
        "time = chunked / materialized"
    )


if __name__ == "__main__":
    main()
