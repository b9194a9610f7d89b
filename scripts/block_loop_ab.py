"""``bench-block``'s loop timed under two code paths side by side, in one process: what the A/B
scripts of this folder (``cached_attention_ab.py``, ``block_prefill_ab.py``) share.

The model and loop of ``bench-block`` (LLaDA2's loop, gen 256, blocks of 32, 8 steps a block)
at each prompt length: the exact prefix cache and MaskKV 256, each path timed ``repeats``
times, the paths and runs taking turns (medians), and whether the two paths give the same
tokens.
"""

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch

import maskkv_compile
from maskkv_compile.bench_block import block_generate, build_model


def arguments(description: str, **more) -> argparse.Namespace:
    """The A/B scripts' command line (``--prompt-lens``, ``--repeats``, ``--backend``, and
    ``more``: option name -> its default, a string); also sets two threads and silences the
    uniform layer budgets' notice."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    for name, default in more.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default)
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    return parser.parse_args()


def loop_table(prompt_lens, repeats, backend, paths: list[tuple[str, Callable[[], None]]]):
    """``paths``: (name, switch) for the old path, then the new one; ``switch()`` puts that path
    in place. The new one stays in place afterwards."""
    (old_name, _), (new_name, _) = paths
    for prompt_len in prompt_lens:
        model = build_model(2, 512, 1024, prompt_len + 512)
        prompt = torch.randint(0, 255, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        kwargs = dict(gen_length=256, block_length=32, steps=8)
        runs = {
            "exact prefix cache": maskkv_compile.optimize(model, budget=10**9, backend=backend),
            "MaskKV 256": maskkv_compile.optimize(model, budget=256, backend=backend),
        }
        for runner in runs.values():
            block_generate(runner, prompt, **kwargs)  # warm-up: compiles what it times
        seconds, tokens = {}, {}
        for _ in range(repeats):
            for path, switch in paths:
                switch()
                for name, runner in runs.items():
                    runner.reset()
                    start = time.perf_counter()
                    tokens[name, path] = block_generate(runner, prompt, **kwargs)
                    seconds.setdefault((name, path), []).append(time.perf_counter() - start)
        medians = {key: statistics.median(times) for key, times in seconds.items()}
        for name in runs:
            old, new = medians[name, old_name], medians[name, new_name]
            same = torch.equal(tokens[name, old_name], tokens[name, new_name])
            print(
                f"  {prompt_len:>5} {backend} {name:<19} {old_name} {old:.3f} s, {new_name} "
                f"{new:.3f} s: {old / new:.2f}x, same tokens {same}"
            )
        vs = [
            medians["exact prefix cache", p] / medians["MaskKV 256", p]
            for p in (old_name, new_name)
        ]
        print(f"  {prompt_len:>5} MaskKV 256 vs the exact prefix cache: {vs[0]:.2f}x, {vs[1]:.2f}x")
