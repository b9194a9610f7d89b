"""Prefill peak memory: evicting each layer as it is computed vs holding every layer's K/V.

With an offline LayerProfile every layer's budget is known before the prefill, so the
prefill graph selects a layer's kept entries right after its attention and the full K/V
of that layer die there (what maskkv_compile does, with or without a profile: without one
the layer budgets fall back to uniform, which is equally known in advance). An online layer
allocation (budgets from all layers' statistics, known only at the end of the forward)
must keep every layer's full K/V until then; the second column emulates that by running
the same model with its KV cache returned (``use_cache=True``), which holds exactly those.

    python benchmarks/bench_prefill_memory.py [--prompt-lens 2048 4096 8192]

Peak RSS above the level before the call, sampled every 5 ms; one run per cell, in one
process, side by side.
"""

import argparse

import torch

import maskkv_compile
from maskkv_compile.cli import _tabulate
from maskkv_compile.measure import human_bytes, measure
from maskkv_compile.models import tiny_llada
from maskkv_compile.profile import LayerProfile, model_fingerprint

parser = argparse.ArgumentParser()
parser.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 4096, 8192])
parser.add_argument("--layers", type=int, default=8)
parser.add_argument("--hidden", type=int, default=256)
args = parser.parse_args()

model = tiny_llada(layers=args.layers, hidden=args.hidden, heads=4, vocab=512, max_positions=max(args.prompt_lens) + 64)
profile = LayerProfile(tuple(0.1 + 0.01 * i for i in range(args.layers)), model_fingerprint(model.config, type(model).__name__))
optimized = maskkv_compile.optimize(model, budget=64, backend="eager", profile=profile)
mask_id = model.config.mask_token_id
rows = []
for prompt_len in args.prompt_lens:
    x = torch.randint(0, mask_id, (1, prompt_len + 64))
    x[:, prompt_len:] = mask_id
    optimized.reset()
    with measure() as evict:
        optimized(x)
    with torch.no_grad(), measure() as hold:
        out = model(x, use_cache=True)
        del out
    full_kv = 2 * args.layers * (prompt_len + 64) * args.hidden * 4
    rows.append([prompt_len, human_bytes(evict.peak_rss_delta), human_bytes(hold.peak_rss_delta),
                 f"{hold.peak_rss_delta / max(evict.peak_rss_delta, 1):.2f}x", human_bytes(full_kv)])
print(f"tiny LLaDA-style model, {args.layers} layers, hidden {args.hidden}, fp32, 64 masks, budget 64")
print(_tabulate(rows, headers=["prompt", "evict per layer (profile)", "hold all layers' K/V", "ratio", "all layers' K/V"]))
