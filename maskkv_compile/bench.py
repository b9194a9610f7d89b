"""Side-by-side speed benchmark: uncached loop vs prompt cache vs MaskKV (one process).

For each prompt length, on a Llama-style bidirectional model with random weights, the
same LLaDA loop (``generate``) runs four ways; every ratio is measured in this run:
  * uncached: the original model recomputes the whole sequence every step;
  * prompt cache: MaskKV with a budget >= the prompt (no eviction, the dLLM-Cache idea);
  * MaskKV at each budget.
Peak RSS is the resident-memory peak above the level before the run (sampled).
"""

from __future__ import annotations

import torch

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.measure import human_bytes, measure
from maskkv_compile.models import tiny_llada


def run_benchmark(*, prompt_lens, gen_length, steps, budgets, layers, hidden, backend, print_fn=print) -> list[dict]:
    from maskkv_compile.cli import _tabulate

    torch.manual_seed(0)
    model = tiny_llada(layers=layers, hidden=hidden, heads=max(1, hidden // 64), vocab=1024,
                       max_positions=max(prompt_lens) + gen_length)
    mask_id = model.config.mask_token_id
    kwargs = dict(gen_length=gen_length, steps=steps, block_length=gen_length)
    rows, results = [], []
    runners = {"prompt cache (no eviction)": max(prompt_lens) + gen_length, **{f"MaskKV budget {b}": b for b in budgets}}
    optimized = {name: maskkv_compile.optimize(model, budget=b, backend=backend) for name, b in runners.items()}
    for prompt_len in prompt_lens:
        prompt = torch.randint(0, mask_id, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        with measure() as base:
            reference = generate(model, prompt, mask_token_id=mask_id, **kwargs)
        entries = [("uncached", base, reference, None)]
        for name, opt in optimized.items():
            opt.generate(prompt[:, : min(64, prompt_len)], **kwargs)  # warm-up (compiles once, any length)
            with measure() as m:
                out = opt.generate(prompt, **kwargs)
            entries.append((name, m, out, opt.cache_stats()["bytes"]))
        for name, m, out, kept in entries:
            agree = (out[:, prompt_len:] == reference[:, prompt_len:]).float().mean().item()
            row = dict(prompt=prompt_len, run=name, tokens_per_s=gen_length / m.seconds,
                       speedup=base.seconds / m.seconds, peak_rss=m.peak_rss_delta, kept_bytes=kept, agreement=agree)
            results.append(row)
            rows.append([prompt_len, name, f"{row['tokens_per_s']:.2f}", f"{row['speedup']:.1f}x",
                         human_bytes(m.peak_rss_delta), "-" if kept is None else human_bytes(kept), f"{agree:.2f}"])
        print_fn(f"prompt {prompt_len} done")
    print_fn(f"Llama-style, {layers} layers, hidden {hidden}, gen {gen_length}, {steps} steps, backend {backend}, "
             f"{torch.get_num_threads()} threads")
    print_fn(_tabulate(rows, headers=["prompt", "run", "tokens/s", "vs uncached", "peak RSS", "kept KV", "agreement"]))
    return results
