"""Per-call host overhead of the MaskKV runtime: routing, evidence and bookkeeping, \
without the graphs.

LLaDA's semi-autoregressive loop (drop-in ``model(x).logits``) at a 512-token prompt, gen 256,
block 32, one token per step, on the tiny bench model with the eager backend. Each runtime
call is timed whole and its graph call apart; the difference is what the runtime adds to a
step. Runs on any checkout (it reads the runtime's graphs through whichever attributes that
version has), so the same script measures before and after a change:

    python benchmarks/bench_routing_overhead.py [--prompt 512 --gen 256 --block 32 --steps 96]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import maskkv_compile
from maskkv_compile.runtime import MaskKVRuntime

try:
    from maskkv_compile.tiny_models import tiny_llada
except ImportError:  # older layouts
    from maskkv_compile.models import tiny_llada  # noqa: F401


def wrap_graphs(runtime, timings):
    """Time every graph call of ``runtime`` into ``timings["graph"]``."""

    def timed(fn):
        def run(*args):
            start = time.perf_counter()
            out = fn(*args)
            timings["graph"] += time.perf_counter() - start
            return out

        return run

    if hasattr(runtime, "_graphs"):  # the state-machine runtime: name -> (fn, inputs, groups)
        for name, (fn, inputs, groups) in runtime._graphs.items():
            runtime._graphs[name] = (timed(fn), inputs, groups)
    else:
        for name in ("_prefill", "_step", "_revote"):
            if hasattr(runtime, name):
                setattr(runtime, name, timed(getattr(runtime, name)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=96, help="step calls timed (after 4 warm-up calls)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_llada(layers=2, hidden=64, heads=4)
    with torch.no_grad():
        model.lm_head.weight[model.config.mask_token_id] = (
            0  # a trained dLLM never predicts the mask
        )
    mask_id = model.config.mask_token_id
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager", block_length=args.block)
    x = torch.cat(
        [torch.randint(0, mask_id, (1, args.prompt)), torch.full((1, args.gen), mask_id)], 1
    )
    call = MaskKVRuntime.__call__
    per_call = []

    def timed_call(self, *a):
        timings = {"graph": 0.0}
        if not getattr(self, "_bench_wrapped", False):
            wrap_graphs(self, self.__dict__.setdefault("_bench_timings", timings))
            self._bench_wrapped = True
        self._bench_timings["graph"] = 0.0
        start = time.perf_counter()
        out = call(self, *a)
        total = time.perf_counter() - start
        per_call.append((total, self._bench_timings["graph"]))
        return out

    MaskKVRuntime.__call__ = timed_call
    try:
        with torch.no_grad():
            for step in range(4 + args.steps):
                logits = optimized(x).logits
                block_start = args.prompt + (step // args.block) * args.block
                block = slice(block_start, block_start + args.block)
                masked = (x[0, block] == mask_id).nonzero().flatten() + block_start
                pick = masked[logits[0, masked].amax(-1).argmax()]
                x[0, pick] = logits[0, pick].argmax()
    finally:
        MaskKVRuntime.__call__ = call
    steps = per_call[4:]
    overhead = [(total - graph) * 1e3 for total, graph in steps]
    graph = [g * 1e3 for _, g in steps]
    print(f"transitions: {optimized.cache_stats()['transitions']}")
    print(
        f"step calls timed: {len(steps)}; prompt {args.prompt}, gen {args.gen}, block {args.block}"
    )
    print(
        f"runtime host overhead per step: median {statistics.median(overhead):.3f} ms, "
        f"mean {statistics.mean(overhead):.3f} ms; graph median {statistics.median(graph):.3f} ms"
    )


if __name__ == "__main__":
    main()
