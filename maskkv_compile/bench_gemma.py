"""Side-by-side benchmark for DiffusionGemma (``maskkv-compile bench-gemma``), one process.

The model is a random-weight transformers DiffusionGemma scaled to a CPU. It keeps the
released layout: five sliding-window layers (window 512) per full-attention layer, and the
full layers have a larger head dim, one KV head and no v_proj. It has 8 experts, top 2. The
run is transformers' own ``generate``, one canvas of ``--canvas`` tokens with
``--steps`` denoising steps, on each of:

- plain: the unmodified model (dynamic cache);
- plain, static cache: ``generate(..., cache_implementation="static")``, the route on which
  transformers compiles the encoder and the decoder. It is timed on its second call, so the
  compile is not timed;
- MaskKV with no eviction (a budget above the cache length): what the prefill in chunks of
  ``prefill_chunk`` tokens, with each chunk's sliding-window attention over its band of keys,
  does alone; exact;
- MaskKV at each budget: the canvas votes at its first decoder call, and the full-attention
  layers keep ``budget`` entries per KV head.

Reported per run:
- seconds for the whole ``generate`` and for its decoder calls alone (summed by hooks on the
  decoder), and the number of decoder calls (not separable under the compiled route: "-");
- the bytes of the full-attention layers' K/V in the cache that ``generate`` returns;
- whether the tokens equal the plain run's.

Every ratio is measured in this run. The encoder's prefill of the prompt is the same work in
every run, and it dominates at long prompts; the decoder-only column is where MaskKV acts.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

import maskkv_compile
from maskkv_compile.measure import human_bytes, table
from maskkv_compile.tiny_models import tiny_diffusion_gemma


def build_model(layers: int, hidden: int, vocab: int, canvas: int, max_positions: int):
    """The released layout scaled down: a full-attention layer every sixth and last, the rest
    sliding (window 512); heads of 64 (full layers 128, one KV head); 8 experts, top 2."""
    return tiny_diffusion_gemma(
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        canvas=canvas,
        sliding_window=512,
        max_positions=max_positions,
        layer_types=[
            "full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
            for i in range(layers)
        ],
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(hidden // 256, 1),
        head_dim=64,
        global_head_dim=128,
        num_experts=8,
    )


def full_layer_bytes(model, cache) -> int:
    kinds = model.config.get_text_config().layer_types
    total = 0
    for layer, kind in enumerate(kinds):
        if kind == "full_attention":
            entry = cache.layers[layer]
            total += entry.keys.numel() * entry.keys.element_size()
            total += entry.values.numel() * entry.values.element_size()
    return total


class _DecoderClock:
    """Sums the wall time and the number of the decoder's calls (hooks on model.model.decoder)."""

    def __init__(self, model):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        decoder = model.model.decoder
        self._handles = [
            decoder.register_forward_pre_hook(self._pre),
            decoder.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def close(self):
        for handle in self._handles:
            handle.remove()


def run_gemma_benchmark(
    *,
    prompt_lens: list[int],
    budgets: tuple[int, ...] = (64, 256),
    canvas: int = 64,
    steps: int = 48,
    layers: int = 6,
    hidden: int = 512,
    vocab: int = 4096,
    static: bool = True,
    print_fn: Optional[Callable] = print,
) -> list[dict]:
    model = build_model(layers, hidden, vocab, canvas, max(prompt_lens) + 2 * canvas)
    rows = []
    for prompt_len in prompt_lens:
        prompt = torch.randint(
            3, vocab - 3, (1, prompt_len), generator=torch.Generator().manual_seed(0)
        )
        runs = [("plain", model, {})]
        if static:
            runs.append(
                ("plain, static cache (compiled)", model, {"cache_implementation": "static"})
            )
        exact = maskkv_compile.optimize(model, budget=prompt_len + 2 * canvas)
        runs += [("MaskKV, no eviction", exact, {})]
        runs += [
            (f"MaskKV budget {b}", maskkv_compile.optimize(model, budget=b), {}) for b in budgets
        ]
        reference = None
        for name, runner, extra in runs:
            kwargs = dict(
                max_new_tokens=canvas,
                max_denoising_steps=steps,
                return_dict_in_generate=True,
                **extra,
            )
            if extra:  # the compiled route: compile on a first call, time the second
                torch.manual_seed(0)
                runner.generate(prompt, **kwargs)
            clock = _DecoderClock(model)
            torch.manual_seed(0)
            start = time.perf_counter()
            out = runner.generate(prompt, **kwargs)
            seconds = time.perf_counter() - start
            clock.close()
            if reference is None:
                reference = out.sequences
            row = {
                "prompt_len": prompt_len,
                "run": name,
                "seconds": seconds,
                "decoder_seconds": clock.seconds,
                "decoder_calls": clock.calls,
                "full_kv_bytes": full_layer_bytes(model, out.cache),
                "same_tokens": bool(torch.equal(out.sequences, reference)),
            }
            rows.append(row)
            if print_fn is not None:
                print_fn(
                    f"  {prompt_len:>6} {name:<32} {seconds:7.2f} s "
                    f"(decoder {clock.seconds:.2f} s, {clock.calls} calls)",
                    flush=True,
                )
    base = {r["prompt_len"]: r for r in rows if r["run"] == "plain"}
    for r in rows:
        b = base[r["prompt_len"]]
        r["vs_plain"] = b["seconds"] / r["seconds"]
        # a compiled decoder runs no Python hook: its time is not separable (None)
        r["decoder_vs_plain"] = (
            (b["decoder_seconds"] / b["decoder_calls"])
            / (r["decoder_seconds"] / r["decoder_calls"])
            if r["decoder_calls"] and b["decoder_calls"]
            else None
        )
        r["full_kv_vs_plain"] = r["full_kv_bytes"] / max(b["full_kv_bytes"], 1)
    if print_fn is not None:
        print_fn(format_rows(rows))
    return rows


def _per_decoder_call(row: dict) -> Optional[float]:
    """Seconds per decoder call; None where the hooks saw none (a compiled decoder)."""
    return row["decoder_seconds"] / row["decoder_calls"] if row["decoder_calls"] else None


def format_rows(rows: list[dict]) -> str:
    return table(
        [
            [
                r["prompt_len"],
                r["run"],
                f"{r['seconds']:.2f}",
                f"{r['vs_plain']:.2f}x",
                f"{r['decoder_seconds']:.2f} / {r['decoder_calls']}" if r["decoder_calls"] else "-",
                "-" if r["decoder_vs_plain"] is None else f"{r['decoder_vs_plain']:.2f}x",
                human_bytes(r["full_kv_bytes"]),
                f"{r['full_kv_vs_plain']:.1%}",
                "yes" if r["same_tokens"] else "no",
            ]
            for r in rows
        ],
        [
            "prompt",
            "run",
            "generate s",
            "vs plain",
            "decoder s / calls",
            "per decoder call vs plain",
            "full-layer KV",
            "KV vs plain",
            "same tokens",
        ],
    )
