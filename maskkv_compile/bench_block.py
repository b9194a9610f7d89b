"""Side-by-side speed benchmark for block diffusion (``maskkv-compile bench-block``), one process.

The model: a random-weight Qwen3 (SDAR's base; bidirectional, QK norms) with LLaDA2-mini-like
attention shapes scaled to a CPU: head_dim 128, four query heads per KV head, hidden
``--hidden``, ``--layers`` layers, its LM head's mask row zeroed (a trained dLLM never predicts
the mask). The loop: :func:`block_generate`, LLaDA2's block-wise refinement spelled as a
function (the window [prompt ; finished blocks ; current block] on the grid from position 0,
the 4-D additive block mask, greedy, ``block_length / steps`` tokens committed per step by
confidence), run unmodified on each of:

  * uncached: the plain model (what ``LLaDA2Pipeline`` and the model's own ``generate`` do
    today: the whole window at every step);
  * uncached, torch.compile: the same under ``torch.compile(dynamic=True)``, warmed up on the
    first two windows of the same prompt;
  * prefix cache: MaskKV with a budget above the prompt (no eviction: the exact prefix
    cache, block-sized steps);
  * MaskKV at each budget (each window's growth re-selects [kept prefix ; finished block] into
    the budget with the new block's votes);
  * MaskKV at the last budget with ``revote`` (each window's growth re-selects over the whole
    prefix, kept in a second tier).

Each MaskKV run is timed from its second whole generation on (the first compiles its graphs),
``repeats`` times, the cached runs taking turns (the median is reported: this CPU is shared,
and single timings of one run drifted by up to 30% between invocations). Every ratio is
measured in this run. Peak RSS is the resident-memory peak above the level before each run
(``measure``); KV bytes is what the cache holds at the end of the generation
(``cache_stats()["bytes"]``: the kept prefix of every layer, padded per layer).
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional

import torch

import maskkv_compile
from maskkv_compile.measure import human_bytes, measure, table
from maskkv_compile.tiny_models import tiny_qwen3

MASK_ID = 255


def block_mask(length: int, block_length: int, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, L, L) additive block-causal mask on the grid from 0 (LLaDA2's ``tril`` over
    blocks, expanded, ``log``)."""
    blocks = torch.arange(length) // block_length
    allowed = blocks[None, :] <= blocks[:, None]
    return torch.zeros((), dtype=dtype).masked_fill(~allowed, float("-inf"))[None, None]


@torch.no_grad()
def block_generate(
    model: Callable,
    prompt: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int = MASK_ID,
    shift: int = 0,
) -> torch.Tensor:
    """Greedy block diffusion on the growing window; returns (B, P + gen_length). ``shift=1``:
    Fast-dLLM v2's token shift (a position's logits are read one row earlier)."""
    batch, p = prompt.shape
    blocks = -(-(p + gen_length) // block_length)
    total = blocks * block_length
    mask = block_mask(total, block_length)
    x = torch.full((batch, total), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    per_step = -(-block_length // steps)
    for b in range(p // block_length, blocks):
        end = (b + 1) * block_length
        while True:
            block = x[:, end - block_length : end]
            masked = block == mask_id
            if not masked.any():
                break
            logits = model(x[:, :end], attention_mask=mask[:, :, :end, :end]).logits
            read = logits[:, end - block_length - shift : end - shift]  # (B, block, V)
            probs = read.float().softmax(-1)
            confidence, token = probs.max(-1)
            confidence = confidence.masked_fill(~masked, -1.0)
            k = min(per_step, int(masked.sum(1).min()))
            pick = confidence.topk(max(k, 1), dim=-1).indices
            chosen = torch.zeros_like(masked).scatter_(1, pick, True) & masked
            block[chosen] = token[chosen]
    return x[:, : p + gen_length]


def build_model(layers: int, hidden: int, vocab: int, max_positions: int, factory=tiny_qwen3):
    """The benchmark's model: ``factory`` (``tiny_qwen3``'s keywords; ``sdar_standin.tiny_sdar``
    for SDAR's cache protocol) at LLaDA2-mini-like attention shapes, its mask row zeroed."""
    heads = hidden // 128
    model = factory(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=max(heads // 4, 1),
        vocab=vocab,
        max_positions=max_positions,
    )
    model.config.mask_token_id = MASK_ID  # the loop's mask token, which optimize() reads
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK_ID] = 0
    return model


def run_block_benchmark(
    *,
    prompt_lens: list[int],
    gen_length: int = 256,
    block_length: int = 32,
    steps: int = 8,
    budgets: tuple[int, ...] = (64, 256),
    layers: int = 2,
    hidden: int = 512,
    vocab: int = 1024,
    backend: str = "inductor",
    uncached: bool = True,
    repeats: int = 1,
    print_fn: Optional[Callable] = print,
) -> list[dict]:
    """One row per (prompt length, run); ``uncached=False`` leaves out the two uncached runs
    (their ratios are then None; the prefix cache is the baseline left). ``repeats``: each
    cached run (prefix cache, MaskKV) is timed that many times, the runs taking turns within
    each round so that a slower stretch of a shared machine falls on all of them alike; a row
    reports the median time and the highest peak. The uncached runs, 30x and more slower, are
    timed once."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: each run is timed at least once; pass 1 or more")
    model = build_model(layers, hidden, vocab, max(prompt_lens) + gen_length + block_length)
    rows = []
    for prompt_len in prompt_lens:
        prompt = torch.randint(
            0, vocab - 1, (1, prompt_len), generator=torch.Generator().manual_seed(0)
        )
        prompt[prompt == MASK_ID] = 0
        kwargs = dict(gen_length=gen_length, block_length=block_length, steps=steps)
        runs = []  # (name, the callable the loop drives, whether it is a MaskKV model)
        if uncached:
            # warm-up: the compiled model sees its timed shapes first (the first two windows)
            compiled = torch.compile(model, dynamic=True, backend=backend)
            block_generate(compiled, prompt, **{**kwargs, "gen_length": 2 * block_length})
            runs += [("uncached", model, False), ("uncached, torch.compile", compiled, False)]
        cached = [("prefix cache (exact)", 10**9, {})]
        cached += [(f"MaskKV budget {b}", b, {}) for b in budgets]
        # the other choice at a window's growth: re-select over the whole prefix (second tier)
        cached.append((f"MaskKV budget {budgets[-1]} + revote", budgets[-1], {"revote": 10**9}))
        for name, budget, options in cached:
            runner = maskkv_compile.optimize(model, budget=budget, backend=backend, **options)
            block_generate(runner, prompt, **kwargs)  # warm-up: compiles every graph it times
            runs.append((name, runner, True))
        timed = {name: [] for name, _, _ in runs}
        outputs = {}
        for round_ in range(repeats):
            for name, runner, is_maskkv in runs:
                if round_ and not is_maskkv:
                    continue
                if is_maskkv:
                    runner.reset()
                with measure() as m:
                    outputs[name] = block_generate(runner, prompt, **kwargs)
                timed[name].append(m)
        reference = outputs[runs[0][0]]
        for name, runner, is_maskkv in runs:
            seconds = statistics.median_high(m.seconds for m in timed[name])
            row = {
                "prompt_len": prompt_len,
                "run": name,
                "seconds": seconds,
                "seconds_all": [m.seconds for m in timed[name]],
                "tokens_per_s": gen_length / seconds,
                "peak_rss": max(m.peak_rss_delta for m in timed[name]),
                "kv_bytes": None,
                "same_tokens": bool(torch.equal(outputs[name], reference)),
            }
            if is_maskkv:
                stats = runner.cache_stats()  # of the last timed generation (reset before it)
                row["kv_bytes"] = stats["bytes"]
                row["transitions"] = stats["transitions"]
            rows.append(row)
            if print_fn is not None:
                times = " / ".join(f"{t:.2f}" for t in row["seconds_all"])
                print_fn(f"  {prompt_len:>6} {name:<26} {times} s", flush=True)
    base = {r["prompt_len"]: r for r in rows if r["run"] == "uncached"}
    compiled = {r["prompt_len"]: r for r in rows if r["run"] == "uncached, torch.compile"}
    prefix = {r["prompt_len"]: r for r in rows if r["run"] == "prefix cache (exact)"}
    for r in rows:
        p = r["prompt_len"]
        r["vs_uncached"] = base[p]["seconds"] / r["seconds"] if base else None
        r["vs_compiled"] = compiled[p]["seconds"] / r["seconds"] if compiled else None
        r["vs_prefix"] = prefix[p]["seconds"] / r["seconds"]
        r["peak_vs_prefix"] = r["peak_rss"] / max(prefix[p]["peak_rss"], 1)
        r["kv_vs_prefix"] = (
            None if r["kv_bytes"] is None else r["kv_bytes"] / max(prefix[p]["kv_bytes"], 1)
        )
    if print_fn is not None:
        print_fn(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    """The table; without the uncached runs, without their two ratio columns."""
    ratios = [("vs uncached", "vs_uncached"), ("vs compiled", "vs_compiled")]
    ratios = [(h, k) for h, k in ratios if rows[0][k] is not None]
    return table(
        [
            [
                r["prompt_len"],
                r["run"],
                f"{r['tokens_per_s']:.1f}",
                *(f"{r[k]:.2f}x" for _, k in ratios),
                f"{r['vs_prefix']:.2f}x",
                human_bytes(r["peak_rss"]),
                "" if r["kv_bytes"] is None else human_bytes(r["kv_bytes"]),
                "" if r["kv_vs_prefix"] is None else f"{r['kv_vs_prefix']:.1%}",
                "yes" if r["same_tokens"] else "no",
            ]
            for r in rows
        ],
        [
            "prompt",
            "run",
            "tok/s",
            *(h for h, _ in ratios),
            "vs prefix cache",
            "peak RSS",
            "KV bytes",
            "KV vs prefix",
            "same tokens",
        ],
    )


def plot_rows(rows: list[dict], out_dir: str, title: str = "", prefix: str = "block") -> list[str]:
    """<prefix>_speedup.png (vs the uncached loop per prompt length, or vs the prefix cache when
    the uncached runs were left out) and <prefix>_memory.png (peak RSS and KV bytes) in
    ``out_dir``."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    runs = sorted({r["run"] for r in rows}, key=[r["run"] for r in rows].index)
    paths = []
    for kind in ("speedup", "memory"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in runs:
            mine = [r for r in rows if r["run"] == name]
            lens = [r["prompt_len"] for r in mine]
            if kind == "speedup":
                ratio = "vs_uncached" if rows[0]["vs_uncached"] is not None else "vs_prefix"
                ax.plot(lens, [r[ratio] for r in mine], marker="o", label=name)
            else:
                ax.plot(
                    lens,
                    [r["peak_rss"] / 2**20 for r in mine],
                    marker="o",
                    label=f"{name}: peak RSS",
                )
                if mine[0]["kv_bytes"] is not None:
                    ax.plot(
                        lens,
                        [r["kv_bytes"] / 2**20 for r in mine],
                        marker="x",
                        linestyle=":",
                        label=f"{name}: KV cache",
                    )
        ax.set_xlabel("prompt length")
        if kind == "speedup":
            ax.set_ylabel(
                f"speed-up vs {'uncached loop' if ratio == 'vs_uncached' else 'prefix cache'}"
            )
        else:
            ax.set_ylabel("MiB")
        ax.set_xscale("log", base=2)
        if kind == "memory":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(title, fontsize=7)
        path = os.path.join(out_dir, f"{prefix}_{kind}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
