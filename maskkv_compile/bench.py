"""Side-by-side speed benchmark: uncached loops vs prompt cache vs dual cache vs MaskKV (one
process).

For each prompt length, on a Llama-style bidirectional model with random weights, the
same semi-autoregressive LLaDA loop (``generate(..., block_length=block_length)``) runs
these ways; every ratio is measured in this run:
  * uncached: the original model recomputes the whole sequence every step (eager);
  * uncached, torch.compile: the same model under ``torch.compile(dynamic=True)`` (Inductor
    with ``backend="inductor"``; with ``backend="eager"``, torch.compile's eager backend, a
    functional smoke run only), warmed up on the timed shape before timing;
  * prompt cache: MaskKV with a budget >= the prompt (no eviction, the dLLM-Cache idea);
  * dual cache: the same with ``block_length`` (only the current block's rows per step,
    Fast-dLLM's dual cache; see ``maskkv_compile/dual_cache.py``);
  * MaskKV at each budget, and MaskKV at each budget + dual cache;
  * with ``cfg_scale``: classifier-free guidance (one batch [x ; x with the prompt masked] per
    step, as LLaDA's loop), uncached vs MaskKV at the smallest budget, both halves cached.
The model's LM head never predicts the mask id (its row is zeroed), as a trained dLLM's.
Peak RSS is the resident-memory peak above the level before the run. "vs uncached" is
against the eager uncached loop, "vs compiled" against the compiled one (same run).

The floor (``floor=True``): every MaskKV call of the timed loop goes through ``TimedModel``,
which records its duration and what the runtime ran (a prefill: ``new``/``restart``/
``refresh``; a step: ``step``/``block_refresh``/``block_step``, from the runtime's
``counts.transitions``) and the positions the step computed. Reported per MaskKV row:
median step ms, prefill ms, step / floor (floor: one forward of the model itself, same
backend as the uncached compiled row, over the computed positions alone, with their
position ids and no other K/V; the positions of the most common computed length of the
run's steps) and prefill / forward (one uncached forward over the whole sequence). Floor
and forward are medians of ``FLOOR_REPEATS`` calls, timed in the same run, after warm-up.

``compile_sweep``: Inductor compile time of a MaskKV model, cold (first call, a fresh
``TORCHINDUCTOR_CACHE_DIR``) and warm (a second, new optimized model on the same cache dir),
then the Inductor compiles (``runtime.compiled("prefill").compiles +
runtime.compiled("step").compiles``) and the dynamo graphs (MaskKV runtimes) added over a sweep of 5
other prompt lengths (target 0).

Presets: ``tiny`` (vocab 1024, heads = hidden / 64, MLP 2 x hidden) and ``llada-shape``
(LLaDA-8B's per-layer shapes: hidden 4096, 32 heads and KV heads, MLP 12288, vocab 126464,
mask id 126336; random weights).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections import Counter

import torch

import maskkv_compile
from maskkv_compile import _torch_private
from maskkv_compile.api import RECOMPILE_LIMIT
from maskkv_compile.generate import generate
from maskkv_compile.measure import human_bytes, measure, table
from maskkv_compile.tiny_models import set_causal, tiny_llada

RUNS = ("compiled", "prompt-cache", "dual-cache", "maskkv", "maskkv-dual")  # besides eager uncached


COMPILED = "uncached, torch.compile"
DUAL = " + dual cache"


PREFILLS = ("new", "restart", "refresh")
STEPS = ("step", "block_refresh", "block_step")
FLOOR_REPEATS = 5
PRESETS = {
    "tiny": dict(layers=4, hidden=256, vocab=1024, prompt_lens=[1024, 2048, 4096]),
    "llada-shape": dict(layers=1, hidden=4096, vocab=126464, prompt_lens=[1024, 2048]),
}
LLADA_MASK_ID = 126336


def build_model(preset: str, *, layers: int, hidden: int, vocab: int, max_positions: int):
    """The bench's random-weight Llama-style bidirectional model (LM head's mask row zeroed)."""
    if preset == "tiny":
        model = tiny_llada(
            layers=layers,
            hidden=hidden,
            heads=max(1, hidden // 64),
            vocab=vocab,
            max_positions=max_positions,
        )
    elif preset == "llada-shape":  # LLaDA-8B: head dim 128, MHA, MLP 3 x hidden
        from transformers import LlamaConfig, LlamaForCausalLM

        heads = max(1, hidden // 128)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            mask_token_id=LLADA_MASK_ID if vocab > LLADA_MASK_ID else vocab - 1,
            attn_implementation="sdpa",
            rope_theta=500000.0,
        )
        config.is_causal = False
        torch.manual_seed(0)
        model = set_causal(LlamaForCausalLM(config), False).eval()
    else:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    with torch.no_grad():
        model.lm_head.weight[model.config.mask_token_id] = 0
    return model


def _transitions(opt) -> Counter:
    total = Counter()
    for runtime in opt.backend.runtimes:
        total.update(runtime.counts.transitions)
    return total


class TimedModel:
    """Wraps an optimized model: each call's duration, transition and computed positions."""

    def __init__(self, opt):
        self.opt = opt
        self.calls: list[tuple[str, float, torch.Tensor]] = []

    def __call__(self, *args, **kwargs):
        before = _transitions(self.opt)
        start = time.perf_counter()
        out = self.opt(*args, **kwargs)
        seconds = time.perf_counter() - start
        (transition,) = list((_transitions(self.opt) - before).elements())
        session = self.opt.runtime.last_session
        if transition in PREFILLS:
            rows = torch.arange(args[0].shape[1] if args else kwargs["input_ids"].shape[1])
        else:
            layout = session.block.layout if transition == "block_step" else session.layout
            rows = layout.rows.clone()
        self.calls.append((transition, seconds, rows))
        return out

    def summary(self) -> dict:
        steps = [(s, rows) for t, s, rows in self.calls if t in STEPS]
        prefills = [s for t, s, _ in self.calls if t in PREFILLS]
        lengths = Counter(rows.numel() for _, rows in steps)
        common = max(lengths, key=lambda n: (lengths[n], -n)) if lengths else None
        rows = next((r for _, r in steps if r.numel() == common), None)
        return dict(
            step_s=statistics.median(s for s, _ in steps) if steps else None,
            prefill_s=statistics.median(prefills) if prefills else None,
            floor_rows=rows,
            transitions=dict(Counter(t for t, _, _ in self.calls)),
        )


class CompiledUncached:
    """The uncached model under ``torch.compile(dynamic=True)``. Every MaskKV model of the run
    compiles the same forward code, so dynamo's per-code recompile limit (8) would soon be hit
    and this model silently run eagerly: its calls get the limit ``optimize`` uses."""

    def __init__(self, model, backend: str):
        self.compiled = torch.compile(
            model, dynamic=True, backend="inductor" if backend == "inductor" else "eager"
        )

    def __call__(self, *args, **kwargs):
        with _torch_private.dynamo_config.patch(
            recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=RECOMPILE_LIMIT
        ):
            return self.compiled(*args, **kwargs)


def _median_seconds(fn, repeats: int = FLOOR_REPEATS) -> float:
    fn()  # warm-up (compiles the floor's shape outside the timing)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_seconds(model, x: torch.Tensor, rows: torch.Tensor) -> float:
    """One forward of ``model`` over ``x``'s positions ``rows`` alone (their position ids, no other
    K/V)."""
    ids, positions = x[:, rows], rows[None].expand(x.shape[0], -1)
    with torch.no_grad():
        return _median_seconds(lambda: model(input_ids=ids, position_ids=positions))


def forward_seconds(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return _median_seconds(lambda: model(input_ids=x))


def _inductor_compiles(opt) -> int:
    return sum(
        getattr(graph, "compiles", 0)
        for runtime in opt.backend.runtimes
        for graph in (runtime.compiled("prefill"), runtime.compiled("step"))
    )


def compile_sweep(
    model,
    *,
    budget,
    block_length,
    backend,
    first_len,
    sweep_lens,
    gen_length,
    steps,
    print_fn=print,
) -> list[dict]:
    """Cold/warm compile time of MaskKV (and + dual cache), and compiles over ``sweep_lens``."""
    mask_id = model.config.mask_token_id
    kwargs = dict(gen_length=gen_length, steps=steps, block_length=block_length)

    def prompt(n):
        return torch.randint(0, mask_id, (1, n), generator=torch.Generator().manual_seed(n))

    results, rows = [], []
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        for name, blocks in (
            (f"MaskKV budget {budget}", None),
            (f"MaskKV budget {budget}{DUAL}", block_length),
        ):
            with tempfile.TemporaryDirectory(prefix="maskkv_inductor_cache_") as cache_dir:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
                torch._dynamo.reset()
                timings = []
                for kind in (
                    "cold",
                    "warm",
                ):  # a new optimized model each time; warm reuses the cache dir
                    if kind == "warm":
                        torch._dynamo.reset()
                    opt = maskkv_compile.optimize(
                        model, budget=budget, backend=backend, block_length=blocks
                    )
                    start = time.perf_counter()
                    opt.generate(prompt(first_len), **kwargs)
                    timings.append(time.perf_counter() - start)
                start_compiles, start_graphs = _inductor_compiles(opt), len(opt.backend.runtimes)
                for n in sweep_lens:
                    opt.generate(prompt(n), **kwargs)
                added = _inductor_compiles(opt) - start_compiles
                graphs = len(opt.backend.runtimes) - start_graphs
            row = dict(
                run=name,
                cold_s=timings[0],
                warm_s=timings[1],
                inductor_compiles=start_compiles,
                recompiles=added,
                new_dynamo_graphs=graphs,
                sweep=list(sweep_lens),
            )
            results.append(row)
            rows.append(
                [
                    name,
                    f"{row['cold_s']:.2f}",
                    f"{row['warm_s']:.2f}",
                    row["inductor_compiles"],
                    row["recompiles"],
                    row["new_dynamo_graphs"],
                ]
            )
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    print_fn(
        f"compile: first generate at prompt {first_len} (cold: fresh TORCHINDUCTOR_CACHE_DIR; "
        f"warm: new model, same cache dir), then prompts {list(sweep_lens)}; backend {backend}"
    )
    print_fn(
        table(
            rows,
            headers=[
                "run",
                "cold s",
                "warm s",
                "Inductor compiles",
                "recompiles in sweep",
                "new dynamo graphs in sweep",
            ],
        )
    )
    return results


def run_benchmark(
    *,
    prompt_lens,
    gen_length,
    steps,
    budgets,
    layers,
    hidden,
    backend,
    cfg_scale=0.0,
    block_length=32,
    preset="tiny",
    vocab=None,
    floor=True,
    sweep=False,
    sweep_lens=None,
    runs=RUNS,
    print_fn=print,
) -> list[dict]:
    """Time every run of ``runs`` (plus the eager uncached loop, always: the reference) at each
    prompt length; print the table and return one dict per row."""
    torch.manual_seed(0)
    vocab = PRESETS[preset]["vocab"] if vocab is None else vocab
    if (
        sweep and not sweep_lens
    ):  # 5 lengths other than the first, none of them a multiple of another
        first = prompt_lens[0]
        sweep_lens = [first // 2 + 3, first - 5, first + 7, first + first // 3 + 1, 2 * first - 9]
    model = build_model(
        preset,
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        max_positions=max(list(prompt_lens) + list(sweep_lens or [])) + gen_length,
    )
    mask_id = model.config.mask_token_id
    block_length = min(block_length, gen_length)
    kwargs = dict(gen_length=gen_length, steps=steps, block_length=block_length)
    rows, results = [], []
    full = max(prompt_lens) + gen_length
    unknown = set(runs) - set(RUNS)
    if unknown:
        raise ValueError(f"unknown bench runs {sorted(unknown)}; choose from {list(RUNS)}")
    runners = {}
    if "prompt-cache" in runs:
        runners["prompt cache (no eviction)"] = (full, None)
    if "dual-cache" in runs:
        runners["dual cache (no eviction)"] = (full, block_length)
    for b in budgets:
        if "maskkv" in runs:
            runners[f"MaskKV budget {b}"] = (b, None)
        if "maskkv-dual" in runs:
            runners[f"MaskKV budget {b}{DUAL}"] = (b, block_length)
    optimized = {
        name: maskkv_compile.optimize(model, budget=b, backend=backend, block_length=blocks)
        for name, (b, blocks) in runners.items()
    }
    compiled = CompiledUncached(model, backend)
    for prompt_len in prompt_lens:
        prompt = torch.randint(
            0, mask_id, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len)
        )
        with measure() as base:
            reference = generate(model, prompt, mask_token_id=mask_id, **kwargs)
        entries = [("uncached", base, reference, None)]
        compiled_base = None
        if "compiled" in runs:
            with torch.no_grad():  # warm-up: compile on the timed shape, outside the timing
                compiled(torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1))
            with measure() as compiled_base:
                out = generate(compiled, prompt, mask_token_id=mask_id, **kwargs)
            entries.append((COMPILED, compiled_base, out, None))
        floors, timed = {}, {}
        for name, opt in optimized.items():
            opt.generate(
                prompt[:, : min(64, prompt_len)], **kwargs
            )  # warm-up (compiles once, any length)
            opt.reset()
            timed[name] = proxy = TimedModel(opt)
            compiles_before = _inductor_compiles(opt), len(opt.backend.runtimes)
            with measure() as m:
                out = generate(proxy, prompt, mask_token_id=mask_id, **kwargs)
            compiles_after = _inductor_compiles(opt), len(opt.backend.runtimes)
            if (
                compiles_after != compiles_before
            ):  # the warm-up should have compiled everything the loop runs
                print_fn(
                    f"warning: {name} compiled inside the timed loop (Inductor "
                    f"compiles, MaskKV runtimes: {compiles_before} -> "
                    f"{compiles_after}); its times include compilation"
                )
            stats = opt.cache_stats()
            if (
                name.endswith(DUAL) or name.startswith("dual")
            ) and steps > gen_length // block_length:
                assert stats["transitions"].get("block_step", 0) > 0, f"{name} ran no block step"
            entries.append(
                (
                    name,
                    m,
                    out,
                    stats["bytes"] + ((stats.get("block_cache") or {}).get("bytes") or 0),
                )
            )
        if floor:  # the floor and one uncached forward, same backend as the compiled row, this run
            sequence = torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1)
            forward = forward_seconds(compiled, sequence)
            for name, proxy in timed.items():
                summary = proxy.summary()
                rows_at = summary["floor_rows"]
                if rows_at is not None and rows_at.numel() not in floors:
                    floors[rows_at.numel()] = floor_seconds(compiled, sequence, rows_at)
                summary["floor_s"] = None if rows_at is None else floors[rows_at.numel()]
                summary["forward_s"] = forward
                timed[name] = summary
        groups = [(base, reference, entries)]
        if cfg_scale > 0:
            guided = dict(kwargs, cfg_scale=cfg_scale)
            with measure() as cfg_base:
                cfg_reference = generate(model, prompt, mask_token_id=mask_id, **guided)
            cfg_entries = [("uncached CFG", cfg_base, cfg_reference, None)]
            name = f"MaskKV budget {budgets[0]}"
            if name not in optimized:
                raise ValueError(
                    "the CFG rows time MaskKV at the first budget: keep 'maskkv' in "
                    "runs, or cfg_scale=0"
                )
            opt = optimized[name]
            opt.generate(prompt, **guided)  # warm-up: CFG's batch of 2 is a graph of its own
            with measure() as m:
                out = opt.generate(prompt, **guided)
            stats = opt.cache_stats()
            assert stats["transitions"] == {"new": 1, "step": steps - 1}, (
                "CFG did not run cached on both halves"
            )
            cfg_entries.append((f"{name}, CFG", m, out, stats["bytes"]))
            groups.append((cfg_base, cfg_reference, cfg_entries))
        for group_base, group_reference, group in groups:
            for name, m, out, kept in group:
                agree = (
                    (out[:, prompt_len:] == group_reference[:, prompt_len:]).float().mean().item()
                )
                versus_compiled = (
                    compiled_base.seconds / m.seconds
                    if group_base is base and compiled_base
                    else None
                )
                row = dict(
                    prompt=prompt_len,
                    run=name,
                    seconds=m.seconds,
                    tokens_per_s=gen_length / m.seconds,
                    speedup=group_base.seconds / m.seconds,
                    speedup_vs_compiled=versus_compiled,
                    peak_rss=m.peak_rss_delta,
                    kept_bytes=kept,
                    agreement=agree,
                )
                cells = [
                    prompt_len,
                    name,
                    f"{row['tokens_per_s']:.2f}",
                    f"{row['speedup']:.1f}x",
                    "-" if versus_compiled is None else f"{versus_compiled:.1f}x",
                    human_bytes(m.peak_rss_delta),
                    "-" if kept is None else human_bytes(kept),
                    f"{agree:.2f}",
                ]
                if floor:
                    summary = timed.get(name) if group_base is base else None
                    if summary is not None:
                        row.update(
                            step_ms=_ms(summary["step_s"]),
                            prefill_ms=_ms(summary["prefill_s"]),
                            floor_ms=_ms(summary["floor_s"]),
                            forward_ms=_ms(summary["forward_s"]),
                            floor_rows=None
                            if summary["floor_rows"] is None
                            else summary["floor_rows"].numel(),
                            step_over_floor=_ratio(summary["step_s"], summary["floor_s"]),
                            prefill_over_forward=_ratio(summary["prefill_s"], summary["forward_s"]),
                            calls=summary["transitions"],
                        )
                    cells += [
                        _fmt(row.get("step_ms")),
                        _fmt(row.get("prefill_ms")),
                        _fmt(row.get("step_over_floor"), "x"),
                        _fmt(row.get("prefill_over_forward"), "x"),
                    ]
                results.append(row)
                rows.append(cells)
        print_fn(f"prompt {prompt_len} done")
    config = model.config
    setup = (
        f"Llama-style ({preset}), {layers} layers, hidden {hidden}, {config.num_attention_heads} "
        f"heads, MLP {config.intermediate_size}, vocab {config.vocab_size}, gen {gen_length}, "
        f"{steps} steps, block {block_length}, backend {backend}, {torch.get_num_threads()} threads"
    )
    for row in results:
        row["setup"] = setup
    print_fn(setup)
    headers = [
        "prompt",
        "run",
        "tokens/s",
        "vs uncached",
        "vs compiled",
        "peak RSS",
        "kept KV",
        "agreement",
    ]
    if floor:
        headers += ["step ms", "prefill ms", "step/floor", "prefill/forward"]
    print_fn(table(rows, headers=headers))
    if floor:
        print_fn(
            "step ms / prefill ms: medians of the timed loop's MaskKV calls by transition; floor: "
            "one forward of the model (same backend as the compiled row) over the computed "
            "positions alone (the steps' most common count); forward: one uncached forward over "
            f"the whole sequence; medians of {FLOOR_REPEATS}, this run"
        )
    print_fn(
        f"'{COMPILED}': torch.compile(dynamic=True, "
        f"backend={'inductor' if backend == 'inductor' else 'eager'!r}), warmed up on the timed "
        "shape; kept KV of dual-cache rows includes the merged block caches"
    )
    if cfg_scale > 0:
        print_fn(
            "CFG rows: 'vs uncached' is against the uncached CFG loop "
            "(one batch of 2 rows per step)"
        )
    if sweep:
        results += compile_sweep(
            model,
            budget=budgets[0],
            block_length=block_length,
            backend=backend,
            first_len=prompt_lens[0],
            sweep_lens=sweep_lens,
            gen_length=gen_length,
            steps=steps,
            print_fn=print_fn,
        )
    return results


def _ms(seconds):
    return None if seconds is None else 1000 * seconds


def _ratio(a, b):
    return None if a is None or not b else a / b


def _fmt(value, suffix=""):
    if value is None:
        return "-"
    return f"{value:.2f}{suffix}" if suffix else f"{value:.3g}"
