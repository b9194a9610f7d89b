"""Side-by-side speed benchmark: uncached loops vs prompt cache vs dual cache vs MaskKV (one process).

For each prompt length, on a Llama-style bidirectional model with random weights, the
same semi-autoregressive LLaDA loop (``generate(..., block_length=block_length)``) runs
these ways; every ratio is measured in this run:
  * uncached: the original model recomputes the whole sequence every step (eager);
  * uncached, torch.compile: the same model under ``torch.compile(dynamic=True)`` (Inductor
    with ``backend="inductor"``; with ``backend="eager"``, torch.compile's eager backend, a
    functional smoke run only), warmed up on the timed shape before timing;
  * prompt cache: MaskKV with a budget >= the prompt (no eviction, the dLLM-Cache idea);
  * dual cache: the same with ``block_length`` (only the current block's rows per step,
    Fast-dLLM's dual cache; see ``maskkv_compile/blocks.py``);
  * MaskKV at each budget, and MaskKV at each budget + dual cache;
  * with ``cfg_scale``: classifier-free guidance (two calls per step, the unconditional one
    with the prompt masked), uncached vs MaskKV at the smallest budget, both halves cached.
The model's LM head never predicts the mask id (its row is zeroed), as a trained dLLM's.
Peak RSS is the resident-memory peak above the level before the run. "vs uncached" is
against the eager uncached loop, "vs compiled" against the compiled one (same run).
"""

from __future__ import annotations

import torch

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.measure import human_bytes, measure
from maskkv_compile.models import tiny_llada


COMPILED = "uncached, torch.compile"
DUAL = " + dual cache"


def run_benchmark(*, prompt_lens, gen_length, steps, budgets, layers, hidden, backend, cfg_scale=0.0,
                  block_length=32, print_fn=print) -> list[dict]:
    from maskkv_compile.cli import _tabulate

    torch.manual_seed(0)
    model = tiny_llada(layers=layers, hidden=hidden, heads=max(1, hidden // 64), vocab=1024,
                       max_positions=max(prompt_lens) + gen_length)
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        model.lm_head.weight[mask_id] = 0
    block_length = min(block_length, gen_length)
    kwargs = dict(gen_length=gen_length, steps=steps, block_length=block_length)
    rows, results = [], []
    full = max(prompt_lens) + gen_length
    runners = {"prompt cache (no eviction)": (full, None), "dual cache (no eviction)": (full, block_length)}
    for b in budgets:
        runners.update({f"MaskKV budget {b}": (b, None), f"MaskKV budget {b}{DUAL}": (b, block_length)})
    optimized = {name: maskkv_compile.optimize(model, budget=b, backend=backend, block_length=blocks)
                 for name, (b, blocks) in runners.items()}
    compiled = torch.compile(model, dynamic=True, backend="inductor" if backend == "inductor" else "eager")
    for prompt_len in prompt_lens:
        prompt = torch.randint(0, mask_id, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        with measure() as base:
            reference = generate(model, prompt, mask_token_id=mask_id, **kwargs)
        with torch.no_grad():  # warm-up: compile on the timed shape, outside the timing
            compiled(torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1))
        with measure() as compiled_base:
            out = generate(compiled, prompt, mask_token_id=mask_id, **kwargs)
        entries = [("uncached", base, reference, None), (COMPILED, compiled_base, out, None)]
        for name, opt in optimized.items():
            opt.generate(prompt[:, : min(64, prompt_len)], **kwargs)  # warm-up (compiles once, any length)
            with measure() as m:
                out = opt.generate(prompt, **kwargs)
            stats = opt.cache_stats()
            if (name.endswith(DUAL) or name.startswith("dual")) and steps > gen_length // block_length:
                assert stats["transitions"].get("block_step", 0) > 0, f"{name} ran no block step"
            entries.append((name, m, out, stats["bytes"] + ((stats.get("block_cache") or {}).get("bytes") or 0)))
        groups = [(base, reference, entries)]
        if cfg_scale > 0:
            guided = dict(kwargs, cfg_scale=cfg_scale)
            with measure() as cfg_base:
                cfg_reference = generate(model, prompt, mask_token_id=mask_id, **guided)
            cfg_entries = [("uncached CFG", cfg_base, cfg_reference, None)]
            name = f"MaskKV budget {budgets[0]}"
            opt = optimized[name]
            with measure() as m:
                out = opt.generate(prompt, **guided)
            stats = opt.cache_stats()
            assert stats["transitions"] == {"new": 2, "step": 2 * (steps - 1)}, "CFG did not run cached on both halves"
            cfg_entries.append((f"{name}, CFG", m, out, stats["bytes"]))
            groups.append((cfg_base, cfg_reference, cfg_entries))
        for group_base, group_reference, group in groups:
            for name, m, out, kept in group:
                agree = (out[:, prompt_len:] == group_reference[:, prompt_len:]).float().mean().item()
                versus_compiled = compiled_base.seconds / m.seconds if group_base is base else None
                row = dict(prompt=prompt_len, run=name, tokens_per_s=gen_length / m.seconds,
                           speedup=group_base.seconds / m.seconds, speedup_vs_compiled=versus_compiled,
                           peak_rss=m.peak_rss_delta, kept_bytes=kept, agreement=agree)
                results.append(row)
                rows.append([prompt_len, name, f"{row['tokens_per_s']:.2f}", f"{row['speedup']:.1f}x",
                             "-" if versus_compiled is None else f"{versus_compiled:.1f}x",
                             human_bytes(m.peak_rss_delta), "-" if kept is None else human_bytes(kept), f"{agree:.2f}"])
        print_fn(f"prompt {prompt_len} done")
    print_fn(f"Llama-style, {layers} layers, hidden {hidden}, gen {gen_length}, {steps} steps, block {block_length}, "
             f"backend {backend}, {torch.get_num_threads()} threads")
    print_fn(_tabulate(rows, headers=["prompt", "run", "tokens/s", "vs uncached", "vs compiled", "peak RSS", "kept KV",
                                      "agreement"]))
    print_fn(f"'{COMPILED}': torch.compile(dynamic=True, backend={'inductor' if backend == 'inductor' else 'eager'!r}), "
             "warmed up on the timed shape; kept KV of dual-cache rows includes the merged block caches")
    if cfg_scale > 0:
        print_fn("CFG rows: 'vs uncached' is against the uncached CFG loop (two model calls per step)")
    return results
