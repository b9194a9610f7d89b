"""Side-by-side speed benchmark: uncached loop vs prompt cache vs MaskKV (one process).

For each prompt length, on a Llama-style bidirectional model with random weights, the
same LLaDA loop (``generate``) runs four ways; every ratio is measured in this run:
  * uncached: the original model recomputes the whole sequence every step;
  * prompt cache: MaskKV with a budget >= the prompt (no eviction, the dLLM-Cache idea);
  * MaskKV at each budget;
  * with ``cfg_scale``: classifier-free guidance (two calls per step, the unconditional one
    with the prompt masked), uncached vs MaskKV at the smallest budget, both halves cached.
The model's LM head never predicts the mask id (its row is zeroed), as a trained dLLM's.
Peak RSS is the resident-memory peak above the level before the run.
"""

from __future__ import annotations

import torch

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.measure import human_bytes, measure
from maskkv_compile.models import tiny_llada


def run_benchmark(*, prompt_lens, gen_length, steps, budgets, layers, hidden, backend, cfg_scale=0.0,
                  print_fn=print) -> list[dict]:
    from maskkv_compile.cli import _tabulate

    torch.manual_seed(0)
    model = tiny_llada(layers=layers, hidden=hidden, heads=max(1, hidden // 64), vocab=1024,
                       max_positions=max(prompt_lens) + gen_length)
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        model.lm_head.weight[mask_id] = 0
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
        groups = [(base, reference, entries)]
        if cfg_scale > 0:
            guided = dict(kwargs, cfg_scale=cfg_scale)
            with measure() as cfg_base:
                cfg_reference = generate(model, prompt, mask_token_id=mask_id, **guided)
            cfg_entries = [("uncached CFG", cfg_base, cfg_reference, None)]
            name, opt = list(optimized.items())[1]
            with measure() as m:
                out = opt.generate(prompt, **guided)
            stats = opt.cache_stats()
            assert stats["transitions"] == {"new": 2, "step": 2 * (steps - 1)}, "CFG did not run cached on both halves"
            cfg_entries.append((f"{name}, CFG", m, out, stats["bytes"]))
            groups.append((cfg_base, cfg_reference, cfg_entries))
        for group_base, group_reference, group in groups:
            for name, m, out, kept in group:
                agree = (out[:, prompt_len:] == group_reference[:, prompt_len:]).float().mean().item()
                row = dict(prompt=prompt_len, run=name, tokens_per_s=gen_length / m.seconds,
                           speedup=group_base.seconds / m.seconds, peak_rss=m.peak_rss_delta, kept_bytes=kept,
                           agreement=agree)
                results.append(row)
                rows.append([prompt_len, name, f"{row['tokens_per_s']:.2f}", f"{row['speedup']:.1f}x",
                             human_bytes(m.peak_rss_delta), "-" if kept is None else human_bytes(kept), f"{agree:.2f}"])
        print_fn(f"prompt {prompt_len} done")
    print_fn(f"Llama-style, {layers} layers, hidden {hidden}, gen {gen_length}, {steps} steps, backend {backend}, "
             f"{torch.get_num_threads()} threads")
    print_fn(_tabulate(rows, headers=["prompt", "run", "tokens/s", "vs uncached", "peak RSS", "kept KV", "agreement"]))
    if cfg_scale > 0:
        print_fn("CFG rows: 'vs uncached' is against the uncached CFG loop (two model calls per step)")
    return results
