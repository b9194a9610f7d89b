"""Prefill peak memory: evicting each layer as it is computed vs holding every layer's K/V.

With an offline LayerProfile every layer's budget is known before the prefill, so the
prefill graph selects a layer's kept entries right after its attention and the full K/V
of that layer die there (what maskkv_compile does, with or without a profile: without one
the layer budgets fall back to uniform, which is equally known in advance). An online layer
allocation (budgets from all layers' statistics, known only at the end of the forward)
must keep every layer's full K/V until then.

Eviction is measured against the same graph holding every layer's K/V, so that nothing else
differs (the attention, the LM head on the response rows only):

  * ``evict per layer``: one MaskKV prefill at ``--budget`` (64) with a profile;
  * ``keep every layer``: the same optimize() call with a budget above the prompt, so the
    same prefill graph keeps every layer's whole prompt K/V (and returns them to the
    runtime, which holds them).

Both MaskKV calls run inside ``response_logits_only()``, so their output is the (B, R, V)
logits of the response rows (the drop-in (B, S, V) tensor would add S x V x 4 bytes to
both: ``benchmarks/bench_dropin_logits.py``).

What the LM head on the response rows alone saves is a separate table, on the original
transformers forward with its KV cache returned (``use_cache=True``, which holds every
layer's full K/V): its logits for all S rows (the default) vs for the R response rows only
(``logits_to_keep=R``, as the MaskKV prefill head does).

    python benchmarks/bench_prefill_memory.py [--prompt-lens 2048 4096 8192] [--vocab 512]

Peak memory is the kernel's resident-set high-water mark (``VmHWM``) during the call, above
the resident size at its start (``maskkv_compile.measure``: freed heap is trimmed and the
high-water mark reset before each call). Every runner is called once at each prompt length
before it is measured, so no measured call traces or allocates for the first time, and every
cached prompt is dropped before each measured call. Each cell is the median of ``--repeats``
measured calls (3), with their min-max; all in one process, side by side.
"""

import argparse
import statistics

import torch

import maskkv_compile
from maskkv_compile.measure import human_bytes, measure, table
from maskkv_compile.profile import LayerProfile, model_fingerprint
from maskkv_compile.tiny_models import tiny_llada

parser = argparse.ArgumentParser()
parser.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 4096, 8192])
parser.add_argument("--layers", type=int, default=8)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument("--vocab", type=int, default=512)
parser.add_argument("--gen-length", type=int, default=64)
parser.add_argument("--budget", type=int, default=64)
parser.add_argument(
    "--repeats", type=int, default=3, help="measured calls per cell (after one warm-up call)"
)
args = parser.parse_args()

R = args.gen_length
model = tiny_llada(
    layers=args.layers,
    hidden=args.hidden,
    heads=4,
    vocab=args.vocab,
    max_positions=max(args.prompt_lens) + R,
)
model.eval()
profile = LayerProfile(
    tuple(0.1 + 0.01 * i for i in range(args.layers)),
    model_fingerprint(model.config, type(model).__name__),
)
evict = maskkv_compile.optimize(model, budget=args.budget, backend="eager", profile=profile)
keep_all = maskkv_compile.optimize(
    model, budget=max(args.prompt_lens) + R, backend="eager", profile=profile
)
mask_id = model.config.mask_token_id


def reset_all():
    """Drop every cached prompt (before a measurement: what an earlier call holds is freed
    first)."""
    evict.reset()
    keep_all.reset()


def maskkv_prefill(optimized, x):
    # reset_all() ran before: the call below is a prefill of a new prompt, not a step of
    # the last one
    with torch.no_grad(), maskkv_compile.response_logits_only():
        logits = optimized(x).logits
    assert logits.shape == (1, R, args.vocab)
    stats = optimized.cache_stats()
    assert (stats["prefills"], stats["steps"]) == (1, 0), stats
    return stats["bytes"]


def hf_forward(x, logits_to_keep, use_cache=True):
    with torch.no_grad():
        out = model(x, use_cache=use_cache, logits_to_keep=logits_to_keep)
    assert out.logits.shape[1] == (x.shape[1] if logits_to_keep == 0 else logits_to_keep)
    held = (
        sum(layer.keys.nbytes + layer.values.nbytes for layer in out.cache.layers)
        if use_cache
        else 0
    )
    del out
    return held


runners = {
    "evict": lambda x: maskkv_prefill(evict, x),
    "keep_all": lambda x: maskkv_prefill(keep_all, x),
    "hf_head_all": lambda x: hf_forward(x, 0),
    "hf_head_resp": lambda x: hf_forward(x, R),
    "hf_no_cache": lambda x: hf_forward(x, R, use_cache=False),
}
evict_rows, head_rows = [], []
for prompt_len in args.prompt_lens:
    x = torch.randint(
        0, mask_id, (1, prompt_len + R), generator=torch.Generator().manual_seed(prompt_len)
    )
    x[:, prompt_len:] = mask_id
    peak, held, spread = {}, {}, {}
    for name, run in runners.items():
        reset_all()
        run(x)  # warm-up: traces (MaskKV runners, first length) and first-time allocations
        peaks = []
        for _ in range(args.repeats):
            reset_all()
            with measure() as m:
                held[name] = run(x)
            peaks.append(m.peak_rss_delta)
        peak[name] = statistics.median(peaks)
        spread[name] = (min(peaks), max(peaks))
    prompt_kv = 2 * args.layers * prompt_len * args.hidden * 4  # every layer's prompt K and V, fp32
    full_kv = 2 * args.layers * (prompt_len + R) * args.hidden * 4
    assert (
        held["keep_all"] == prompt_kv and held["hf_head_all"] == held["hf_head_resp"] == full_kv
    ), held
    reset_all()

    def cell(name):
        lo, hi = spread[name]
        return f"{human_bytes(peak[name])} ({lo / 2**20:.0f}-{hi / 2**20:.0f})"

    evict_rows.append(
        [
            prompt_len,
            cell("evict"),
            cell("keep_all"),
            f"{peak['keep_all'] / max(peak['evict'], 1):.2f}x",
            human_bytes(held["evict"]),
            human_bytes(prompt_kv),
        ]
    )
    all_logits = (prompt_len + R) * args.vocab * 4
    head_rows.append(
        [
            prompt_len,
            cell("hf_head_all"),
            cell("hf_head_resp"),
            human_bytes(peak["hf_head_all"] - peak["hf_head_resp"]),
            f"{peak['hf_head_all'] / max(peak['hf_head_resp'], 1):.2f}x",
            human_bytes(all_logits),
            cell("hf_no_cache"),
        ]
    )
print(
    f"tiny LLaDA-style model, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
    f"fp32, {R} masks, budget {args.budget}, {torch.get_num_threads()} threads; each cell: the "
    f"median peak of {args.repeats} calls (min-max in MiB); ratios of the medians"
)
print(
    "\nMaskKV prefill, same graph and head (LM head on the response rows): peak RSS above the start"
)
print(
    table(
        evict_rows,
        headers=[
            "prompt",
            "evict per layer",
            "keep every layer's K/V",
            "ratio",
            "kept after (evict)",
            "all layers' prompt K/V",
        ],
    )
)
print(
    "\nOriginal transformers forward, use_cache=True (holds every layer's K/V): the LM head on "
    f"all rows vs on the {R} response rows (logits_to_keep={R}); last column: use_cache=False, "
    "head on the response rows"
)
print(
    table(
        head_rows,
        headers=[
            "prompt",
            "head on all rows",
            "head on response rows",
            "saved",
            "ratio",
            "all rows' logits",
            "no cache",
        ],
    )
)
