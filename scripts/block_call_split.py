"""Where a cached block generation spends its time, per kind of call, side by side in one process.

``bench-block``'s model, prompt and loop (8 steps a block of 32, gen 256, Inductor); for the exact
prefix cache and MaskKV at budgets 256 and 64, the seconds of the ``new`` call (the prefill of
the first window), of the 56 ``step`` calls and of the 7 ``extend`` calls of one generation, timed
after two warm-up rounds of every configuration, and the loop's own time between calls (building
its mask, sampling over the block).
Each call is classed by the transition ``cache_stats()`` counted for it; those reads are left
out of every figure. Usage: ``python scripts/block_call_split.py [prompt_len]`` (default 8192).
"""

import collections
import sys
import time
import warnings

import torch

import maskkv_compile
from maskkv_compile.bench_block import MASK_ID, block_generate, build_model


def main(prompt_len: int) -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # the uniform layer budgets' notice, once per run
    gen, block = 256, 32
    model = build_model(2, 512, 1024, prompt_len + gen + block)
    prompt = torch.randint(0, 1023, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt[prompt == MASK_ID] = 0
    kwargs = dict(gen_length=gen, block_length=block, steps=8)
    runners = [
        (name, maskkv_compile.optimize(model, budget=budget))
        for name, budget in [("prefix cache", 10**9), ("MaskKV 256", 256), ("MaskKV 64", 64)]
    ]
    # two warm-up rounds, the runs taking turns: the first compiles every graph, and the
    # process's first generations run slower (0.3-0.6 s more at 8k, whatever the configuration)
    for _ in range(2):
        for _, runner in runners:
            block_generate(runner, prompt, **kwargs)
    for name, runner in runners:
        runner.reset()
        seconds, calls = collections.defaultdict(float), collections.Counter()

        def timed(*args, **kw):
            start = time.perf_counter()
            before = dict(runner.cache_stats()["transitions"])
            called = time.perf_counter()
            out = runner(*args, **kw)
            returned = time.perf_counter()
            after = runner.cache_stats()["transitions"]
            (kind,) = [k for k in after if after[k] != before.get(k, 0)]
            seconds[kind] += returned - called
            calls[kind] += 1
            seconds["probe"] += (called - start) + (time.perf_counter() - returned)
            return out

        start = time.perf_counter()
        block_generate(timed, prompt, **kwargs)
        total = time.perf_counter() - start - seconds["probe"]  # this probe's own reads left out
        loop = total - sum(seconds[k] for k in ("new", "step", "extend"))
        split = ", ".join(f"{k} {calls[k]}x {seconds[k]:.2f} s" for k in ("new", "step", "extend"))
        print(f"{prompt_len:>6} {name:<13} total {total:.2f} s: {split}, loop {loop:.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8192)
