"""A block loop that keeps its own KV cache, side by side in one process: on the plain model, where
the loop's ``DynamicCache`` is already an exact prefix cache, and on MaskKV models.

``--loop sdar``: SDAR's released ``block_diffusion_generate`` (``store_kv=``; 8 refinement
steps a block, ``--steps``). ``--loop fastdllm``: Fast-dLLM v2's released ``batch_sample``
without its block cache (``update_past_key_values=``; small blocks of 8, threshold 0.95, which
on a random-weight model commits about one token a call), MaskKV optimized with
``family="dream"`` (its token shift). The plain model runs eager and under
``torch.compile(dynamic=True)`` (the loop's cache and flag as they are). ``--block-cache``: every
run with Fast-dLLM v2's block cache on (``use_block_cache=True``: a small-block call computes
its rows against the block's K/V of the last refresh, on the plain model and on MaskKV models
alike). ``bench-block``'s
shapes (head_dim 128, four query heads per KV head, hidden 512, 2 layers, vocab 1024, the LM
head's mask row zeroed: a Qwen3 with SDAR's cache protocol, or a Qwen2 with Fast-dLLM v2's);
gen 256, blocks of 32. Each run is warmed on one generation, then timed ``--repeats`` times,
the runs taking turns in each round; the median is reported with every timing, and the ratios
against both plain runs. Usage: ``python scripts/bench_cached_loop.py [--loop sdar|fastdllm]
[--block-cache] [--prompt-lens 1024 4096 8192] [--repeats 3] [--json PATH]``.
"""

import argparse
import json
import statistics
import time
import warnings

import torch

import maskkv_compile
from maskkv_compile.bench_block import MASK_ID, build_model
from maskkv_compile.fastdllm_standin import fastdllm_cached_generate, tiny_fastdllm
from maskkv_compile.sdar_standin import sdar_cached_generate, tiny_sdar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["sdar", "fastdllm"], default="sdar")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--block-cache", action="store_true", help="fastdllm: use_block_cache")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")  # the uniform layer budgets' notice; transformers' renames
    gen, block = 256, 32
    length = max(args.prompt_lens) + gen + 2 * block
    if args.loop == "sdar":
        model = build_model(2, 512, 1024, length, factory=tiny_sdar)
        kwargs = dict(gen_length=gen, block_length=block, steps=args.steps, mask_id=MASK_ID)
        generate, options = sdar_cached_generate, {}
    else:
        model = build_model(2, 512, 1024, length, factory=tiny_fastdllm)
        kwargs = dict(block_size=block, max_new_tokens=gen, small_block_size=8, mask_id=MASK_ID)
        kwargs["use_block_cache"] = args.block_cache
        generate, options = fastdllm_cached_generate, {"family": "dream"}
    compiled = torch.compile(model, dynamic=True)  # the strongest baseline: warmed like the rest
    rows = []
    for prompt_len in args.prompt_lens:
        prompt = torch.randint(0, 1023, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        prompt[prompt == MASK_ID] = 0
        plain = "its own cache and block cache" if args.block_cache else "its own cache (exact)"
        runs = [
            (f"plain model, {plain}", model),
            ("the same, torch.compile", compiled),
        ]
        runs += [
            (f"MaskKV {name}", maskkv_compile.optimize(model, budget=budget, **options))
            for name, budget in (("prefix cache (exact)", 10**9), ("256", 256), ("64", 64))
        ]
        outputs, seconds = {}, {name: [] for name, _ in runs}
        for _, runner in runs:
            generate(runner, prompt, **kwargs)  # warm-up: compiles what it times
        for _ in range(args.repeats):
            for name, runner in runs:
                if hasattr(runner, "reset"):
                    runner.reset()
                start = time.perf_counter()
                outputs[name] = generate(runner, prompt, **kwargs)
                seconds[name].append(time.perf_counter() - start)
        base = statistics.median_high(seconds[runs[0][0]])
        best = statistics.median_high(seconds[runs[1][0]])
        for name, runner in runs:
            median = statistics.median_high(seconds[name])
            row = {
                "prompt_len": prompt_len,
                "run": name,
                "seconds": median,
                "seconds_all": seconds[name],
                "vs_plain": base / median,
                "vs_compiled": best / median,
                "same_tokens": bool(torch.equal(outputs[name], outputs[runs[0][0]])),
                "transitions": (
                    dict(runner.cache_stats()["transitions"]) if hasattr(runner, "reset") else None
                ),
            }
            rows.append(row)
            times = " / ".join(f"{t:.2f}" for t in seconds[name])
            print(
                f"{prompt_len:>6}  {name:<36} {times} s  {row['vs_plain']:.2f}x "
                f"({row['vs_compiled']:.2f}x)  "
                f"same tokens: {row['same_tokens']}  {row['transitions'] or ''}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
