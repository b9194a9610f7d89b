"""``maskkv-compile``: demo, benchmark and graph diff on the project's small bidirectional
models."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from maskkv_compile.bench import RUNS as BENCH_RUNS
from maskkv_compile.measure import table as _tabulate


def cmd_demo(args) -> int:
    """Fill a masked span with MaskKV and without a cache, side by side.

    The default model is AntiBERTy, a real pretrained bidirectional masked LM shipped in a
    PyPI wheel, filling the CDR-H3 loop of a public antibody heavy chain. ``tiny-llama`` is
    the project's random-weight stand-in, used when AntiBERTy is not installed.
    """
    import maskkv_compile
    from maskkv_compile.evaluation.models import ModelUnavailable, load_bundle
    from maskkv_compile.evaluation.suite import infill
    from maskkv_compile.measure import human_bytes, measure

    try:
        bundle = load_bundle(args.model, samples=1, tasks=None)
    except ModelUnavailable as missing:
        print(f"{missing}; running the random-weight tiny-llama stand-in instead")
        bundle = load_bundle("tiny-llama", samples=1)
    sample = bundle.samples[0]
    profile = bundle.calibrate()
    optimized = maskkv_compile.optimize(
        bundle.model,
        budget=args.budget,
        mask_token_id=bundle.mask_id,
        backend=args.backend,
        profile=profile,
    )
    infill(optimized, sample, bundle.mask_id)  # warm-up: compiles
    optimized.reset()  # the counts below are the timed fill's alone
    with measure() as cached:
        ours = infill(optimized, sample, bundle.mask_id)[0]
    with measure() as uncached:
        reference = infill(bundle.model, sample, bundle.mask_id)[0]
    stats = optimized.cache_stats()
    truth = list(sample.ids[sample.start : sample.stop])
    span = sample.span_len

    def matches(a, b):
        return sum(int(x == y) for x, y in zip(a, b))

    print(f"model: {bundle.note}")
    print(
        f"sample: {sample.id}, prompt {sample.prompt_len} tokens, {span} masked "
        "positions filled one per step"
    )
    print(
        _tabulate(
            [
                [
                    "uncached model",
                    f"{span / uncached.seconds:.1f}",
                    "-",
                    f"{matches(reference, truth)}/{span}",
                    "-",
                ],
                [
                    f"MaskKV budget {args.budget} ({args.backend})",
                    f"{span / cached.seconds:.1f}",
                    human_bytes(stats["bytes"]),
                    f"{matches(ours, truth)}/{span}",
                    f"{matches(ours, reference)}/{span}",
                ],
            ],
            headers=["run", "tokens/s", "kept KV", "true tokens", "agreement with uncached"],
        )
    )
    print(
        f"MaskKV calls in the timed fill: {stats['prefills']} prefill, {stats['steps']} steps "
        f"(transitions {stats['transitions']})"
    )
    print(f"true     : {bundle.decode(truth)}")
    print(f"uncached : {bundle.decode(reference)}")
    print(f"MaskKV   : {bundle.decode(ours)}")
    return 0


QUICK_BENCH = dict(
    prompt_lens=[48],
    gen_length=8,
    steps=8,
    budgets=[4],
    layers=1,
    hidden=64,
    block_length=4,
    backend="eager",
)


def _setup(args, quick: dict) -> None:
    """``--quick``: the CI-sized sizes (a functional smoke run, not a measurement); then
    ``--threads``."""
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_bench(args) -> int:
    from maskkv_compile.bench import PRESETS, run_benchmark

    _setup(args, QUICK_BENCH)
    for name, value in PRESETS[args.preset].items():  # the preset's sizes, where no flag gave one
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows = run_benchmark(
        prompt_lens=args.prompt_lens,
        gen_length=args.gen_length,
        steps=args.steps,
        budgets=args.budgets,
        layers=args.layers,
        hidden=args.hidden,
        backend=args.backend,
        cfg_scale=args.cfg_scale,
        block_length=args.block_length,
        preset=args.preset,
        vocab=args.vocab,
        floor=args.floor,
        sweep=args.compile_sweep,
        sweep_lens=args.sweep_lens,
        runs=args.runs,
        print_fn=print,
    )
    if args.json or args.plots:
        from maskkv_compile.bench_plots import plot_bench, write_results

        command = "maskkv-compile " + " ".join(sys.argv[1:])
        if args.json:
            write_results(args.json, rows, command)
        if args.plots:
            for path in plot_bench(rows, args.plots, title=command):
                print(f"wrote {path}")
    return 0


QUICK_BLOCK_BENCH = dict(
    prompt_lens=[40],
    gen_length=8,
    steps=2,
    budgets=[8],
    layers=1,
    hidden=128,
    block_length=4,
    repeats=2,
)


QUICK_GEMMA_BENCH = dict(
    prompt_lens=[600], budgets=[16], canvas=16, steps=4, layers=6, hidden=128, static=False
)


def cmd_bench_gemma(args) -> int:
    from maskkv_compile.bench_gemma import run_gemma_benchmark

    _setup(args, QUICK_GEMMA_BENCH)
    rows = run_gemma_benchmark(
        prompt_lens=args.prompt_lens,
        budgets=tuple(args.budgets),
        canvas=args.canvas,
        steps=args.steps,
        layers=args.layers,
        hidden=args.hidden,
        static=args.static,
        print_fn=print,
    )
    if args.json:
        command = "maskkv-compile " + " ".join(sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


def cmd_bench_block(args) -> int:
    from maskkv_compile.bench_block import plot_rows, run_block_benchmark

    _setup(args, {**QUICK_BLOCK_BENCH, "backend": "eager"})
    rows = run_block_benchmark(
        prompt_lens=args.prompt_lens,
        gen_length=args.gen_length,
        block_length=args.block_length,
        steps=args.steps,
        budgets=tuple(args.budgets),
        layers=args.layers,
        hidden=args.hidden,
        backend=args.backend,
        uncached=not args.no_uncached,
        repeats=args.repeats,
        print_fn=print,
    )
    command = "maskkv-compile " + " ".join(sys.argv[1:])
    if args.json:
        from maskkv_compile.bench_plots import write_results

        write_results(args.json, rows, command)
    if args.plots:
        for path in plot_rows(rows, args.plots, title=command, prefix=args.plot_prefix):
            print(f"wrote {path}")
    return 0


DIFF_MODELS = {"tiny-llama": "tiny_llada", "tiny-qwen2": "tiny_dream"}


def cmd_diff(args) -> int:
    """Show what the MaskKV passes do to a bundled model: report, then graph diffs."""
    from maskkv_compile import tiny_models as models
    from maskkv_compile.explain import explain

    model = getattr(models, DIFF_MODELS[args.model])(
        layers=args.layers, hidden=args.hidden, attn=args.attn, seed=args.seed
    )
    mask_id = model.config.mask_token_id
    prompt = torch.randint(
        0, mask_id, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed)
    )
    x = torch.cat([prompt, torch.full((1, args.gen_length), mask_id)], dim=1)
    options = (
        {"family": "dream"} if args.model == "tiny-qwen2" else {}
    )  # Dream predicts token i at i-1
    report = explain(model, x, budget=args.budget, **options)
    print(report)
    graphs = ["prefill", "step"] if args.graph == "all" else [args.graph]
    if report.rewritten:
        print("\n=== per attention site: what was matched and inserted ===")
        print(report.structural() if args.graph == "all" else report.structural(args.graph), end="")
    for graph in graphs if report.rewritten else []:
        print(f"\n=== {graph} graph: captured -> rewritten ===")
        print(report.diff(graph), end="")
    if args.html:
        report.to_html(args.html, graphs=tuple(graphs))
        print(f"\nside-by-side diff written to {args.html}")
    if args.model_explorer and report.rewritten:
        report.to_model_explorer(args.model_explorer)
        print(
            f"Model Explorer graphs written to {args.model_explorer} (view: pip install "
            f"ai-edge-model-explorer; model-explorer {args.model_explorer})"
        )
    return 0


def cmd_eval(args) -> int:
    """Quality suite (maskkv_compile.evaluation): policies x budgets on a real pretrained model."""
    from pathlib import Path

    from maskkv_compile.evaluation import (
        ModelUnavailable,
        run_suite,
        table,
        targets,
        tradeoff,
        write_reports,
    )

    if args.suite == "ruler":  # the long-context sweep: its defaults, resumed from its JSON
        if args.model not in ("ruler", "ruler-block"):
            args.model = "ruler"
        args.budgets = args.budgets or ["16", "32", "64", "128", "256", "512"] + ["full"]
        args.samples = args.samples or 64
        args.resume = True
    args.budgets = args.budgets or ["4", "6", "8", "12", "16", "32", "full"]
    args.samples = args.samples or 8
    if args.heatmap and args.model != "tiny-dllm":
        print(
            f"--heatmap is for the retrieval model: use --model tiny-dllm (got {args.model})",
            file=sys.stderr,
        )
        return 2
    if args.checkpoint and args.model not in ("tiny-dllm", "ruler", "ruler-block"):
        print(
            "--checkpoint is for the project's own models (tiny-dllm, ruler, ruler-block), "
            f"not {args.model}",
            file=sys.stderr,
        )
        return 2
    if args.context is not None and args.model not in ("ruler", "ruler-block"):
        print(f"--context is for the RULER-style models, not {args.model}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        suite = run_suite(
            args.model,
            args.policies,
            args.budgets,
            samples=args.samples,
            tasks=args.tasks,
            out=args.out,
            resume=args.resume,
            progress=not args.quiet,
            seed=args.seed,
            checkpoint=args.checkpoint,
            context=args.context,
            revotes=args.revote,
            refreshes=args.refresh,
            revote_voters=args.revote_voters,
            semi_ar=args.semi_ar,
            dual=args.dual,
            recent=args.recent,
        )
    except ModelUnavailable as error:
        print(f"{args.model}: {error}", file=sys.stderr)
        return 2
    results, stem = suite.results, Path(args.out) / f"quality_{args.model.replace('-', '_')}"
    pngs = write_reports(results, stem, plots=not args.no_plots)
    if args.heatmap:
        pngs += _needle_heatmap(args, suite, Path(args.out))
    if tradeoff.has_tradeoff(results):  # retention vs step cost: one-shot / revote / refresh / dual
        print("\nretention vs step cost (one-shot, revote, refresh, dual cache):")
        print(tradeoff.table(results, fmt="simple"))
    print(results["note"])
    for metric in ("retention", "agree_uncached", "kl"):
        print(f"\n{metric} (all {len(results['samples'])} samples):")
        print(table(results, metric, fmt="simple"))
    for line in targets(results):
        print(line)
    print(
        f"\n{suite.optimize_calls} optimize() calls, {suite.model_calls} model calls this run; "
        f"wrote {suite.json_path}, {stem}.md" + "".join(f", {p}" for p in pngs)
    )
    return 0


def _needle_heatmap(args, suite, out) -> list:
    """Depth x length exact match of the retrieval model (``eval --model tiny-dllm --heatmap``)."""
    import json

    from maskkv_compile.evaluation.heatmap import heatmap, plot_heatmap

    result = heatmap(
        suite.bundle.model,
        args.heatmap_policies,
        args.heatmap_budget,
        lengths=args.heatmap_lengths,
        depths=args.heatmap_depths,
        samples=args.heatmap_samples,
        profile=suite.layer_profile(),
        seed=args.seed,
        progress=not args.quiet,
    )
    path = out / "needle_heatmap.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\nneedle retrieval exact match by haystack length (rows) x needle depth (columns):")
    for label, grid in result["exact_match"].items():
        print(f"{label}:")
        print(
            _tabulate(
                [[length, *row] for length, row in zip(result["lengths"], grid)],
                ["length"] + [f"depth {d:g}" for d in result["depths"]],
            )
        )
    pngs = [] if args.no_plots else [plot_heatmap(result, out / "needle_heatmap.png")]
    return [path, *pngs]


def policy_name(value: str) -> str:
    """argparse type of a policy option: a policy's string spelling ("maskkv", "snapkv", ...),
    validated where every option is (MaskKVConfig), which names the valid ones."""
    from maskkv_compile.config import MaskKVConfig, MaskKVConfigError

    try:
        return MaskKVConfig(policy=value).policy
    except MaskKVConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskkv-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fill a masked span on a real model, cached vs uncached")
    demo.add_argument("--model", choices=["antiberty", "rxnfp", "tiny-llama"], default="antiberty")
    demo.add_argument("--budget", type=int, default=8)
    demo.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser(
        "bench",
        help="tokens/s and peak RSS: uncached (eager, compiled) vs prompt/dual cache vs MaskKV",
    )
    bench.add_argument(
        "--preset",
        choices=["tiny", "llada-shape"],
        default="tiny",
        help="tiny: 4 layers, hidden 256, vocab 1024, prompts 1024 2048 4096; llada-shape: "
        "LLaDA-8B's per-layer shapes (hidden 4096, 32 heads, MLP 12288, vocab 126464) at 1 "
        "layer, prompts 1024 2048 (~5 GB of fp32 weights); "
        "--layers/--hidden/--vocab/--prompt-lens override",
    )
    bench.add_argument("--prompt-lens", type=int, nargs="+", default=None)
    bench.add_argument("--gen-length", type=int, default=64)
    bench.add_argument("--steps", type=int, default=64)
    bench.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    bench.add_argument("--layers", type=int, default=None)
    bench.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="heads: hidden / 64 (tiny) or / 128 (llada-shape); MLP 2x (tiny) or 3x (llada-shape)",
    )
    bench.add_argument("--vocab", type=int, default=None)
    bench.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-step and prefill latency of the MaskKV rows, against one forward over the "
        "computed rows alone (step/floor) and one uncached forward (prefill/forward)",
    )
    bench.add_argument(
        "--compile-sweep",
        action="store_true",
        help="also: Inductor compile time cold/warm and recompiles over 5 more prompt lengths",
    )
    bench.add_argument(
        "--sweep-lens",
        type=int,
        nargs="+",
        default=None,
        help="the compile sweep's prompt lengths (default: 5 around the first --prompt-lens)",
    )
    bench.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    bench.add_argument(
        "--cfg-scale",
        type=float,
        default=1.0,
        help="also time classifier-free guidance, uncached vs MaskKV at the first budget (0: skip)",
    )
    bench.add_argument(
        "--block-length",
        type=int,
        default=32,
        help="LLaDA's block length for every run, and the dual cache's (min with --gen-length)",
    )
    bench.add_argument(
        "--runs",
        nargs="+",
        choices=BENCH_RUNS,
        default=list(BENCH_RUNS),
        help="which configurations to time besides the eager uncached loop (the "
        "reference; always run)",
    )
    bench.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    bench.add_argument(
        "--json", metavar="PATH", help="also write every row (and the command) as JSON here"
    )
    bench.add_argument(
        "--plots",
        metavar="DIR",
        help="also draw speed-up and peak memory vs prompt length here "
        "(bench_speedup.png, bench_memory.png)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="tiny CI-sized run (overrides the sizes: "
        + ", ".join(f"{k}={v}" for k, v in QUICK_BENCH.items())
        + ")",
    )
    bench.set_defaults(func=cmd_bench)

    block = sub.add_parser(
        "bench-block",
        help="block diffusion: the uncached block loop (eager, compiled) vs the exact prefix "
        "cache vs MaskKV, side by side",
    )
    block.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    block.add_argument("--gen-length", type=int, default=256)
    block.add_argument("--block-length", type=int, default=32)
    block.add_argument("--steps", type=int, default=8, help="refinement steps per block")
    block.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    block.add_argument("--layers", type=int, default=2)
    block.add_argument("--hidden", type=int, default=512, help="heads: hidden / 128, KV heads / 4")
    block.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    block.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timings of each cached run, taking turns; the median is reported (uncached: one)",
    )
    block.add_argument("--threads", type=int, default=None)
    block.add_argument("--json", metavar="PATH")
    block.add_argument("--plots", metavar="DIR")
    block.add_argument(
        "--no-uncached",
        action="store_true",
        help="leave out the uncached runs (the ratios are then against the prefix cache only)",
    )
    block.add_argument("--plot-prefix", default="block", help="plots: <DIR>/<prefix>_speedup.png")
    block.add_argument("--quick", action="store_true", help="tiny CI-sized run (eager)")
    block.set_defaults(func=cmd_bench_block)

    gemma = sub.add_parser(
        "bench-gemma",
        help="DiffusionGemma: transformers' generate on the plain model (dynamic and static "
        "cache) vs MaskKV, side by side",
    )
    gemma.add_argument("--prompt-lens", type=int, nargs="+", default=[2048, 8192])
    gemma.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    gemma.add_argument("--canvas", type=int, default=64)
    gemma.add_argument("--steps", type=int, default=48, help="max denoising steps per canvas")
    gemma.add_argument("--layers", type=int, default=6)
    gemma.add_argument("--hidden", type=int, default=512)
    gemma.add_argument(
        "--no-static", dest="static", action="store_false", help="skip the static-cache run"
    )
    gemma.add_argument("--threads", type=int, default=None)
    gemma.add_argument("--json", metavar="PATH")
    gemma.add_argument("--quick", action="store_true", help="tiny CI-sized run")
    gemma.set_defaults(func=cmd_bench_gemma)

    diff = sub.add_parser(
        "diff",
        help="what the passes do to a bundled model: sites, passes, inserted ops, graph diffs",
        description="Capture a bundled model, run the MaskKV passes (maskkv_compile.explain), "
        "print the report and the unified diff of the captured graph against each rewritten graph.",
    )
    diff.add_argument(
        "--model",
        choices=sorted(DIFF_MODELS),
        default="tiny-llama",
        help="tiny-llama: LLaDA-style Llama (MHA); tiny-qwen2: Dream-style Qwen2 (GQA)",
    )
    diff.add_argument(
        "--budget", type=int, default=64, help="prompt KV pairs kept per KV head per layer"
    )
    diff.add_argument(
        "--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation"
    )
    diff.add_argument(
        "--graph",
        choices=["prefill", "step", "all"],
        default="all",
        help="which rewritten graph to diff",
    )
    diff.add_argument(
        "--html",
        metavar="PATH",
        help="also write the HTML report here: site table, each site's "
        "before/after drawn, node lists, line diffs (one file, works offline)",
    )
    diff.add_argument(
        "--model-explorer",
        metavar="PATH",
        help="also write the captured, canonical, prefill and step "
        "graphs as Model Explorer JSON here (view with `model-explorer PATH`, package "
        "ai-edge-model-explorer)",
    )
    diff.add_argument("--prompt-len", type=int, default=48)
    diff.add_argument("--gen-length", type=int, default=16)
    diff.add_argument("--layers", type=int, default=2)
    diff.add_argument("--hidden", type=int, default=64)
    diff.add_argument("--seed", type=int, default=0)
    diff.set_defaults(func=cmd_diff)

    from maskkv_compile.evaluation.heatmap import DEPTHS, LENGTHS
    from maskkv_compile.evaluation.models import MODELS

    quality = sub.add_parser(
        "eval",
        help="quality suite: retention / agreement / KL of every policy x budget on a "
        "real pretrained model",
        description="Infill masked spans with the greedy one-token-per-step loop through "
        "optimize(model)(x).logits for every policy x budget and the references (uncached, full "
        "prompt cache, full cache + refresh); write a JSON of every cell, markdown tables and PNG "
        "plots to --out. See docs/quality.md.",
    )
    quality.add_argument(
        "--model",
        choices=MODELS,
        default="antiberty",
        help="antiberty / rxnfp: pretrained (pip install --no-deps antiberty==0.1.3 rxnfp==0.1.0); "
        "tiny-dllm: the project's own needle-retrieval dLLM (bundled); "
        "tiny-llama: random weights, for CI (its numbers mean nothing)",
    )
    quality.add_argument(
        "--policies",
        nargs="+",
        type=policy_name,
        default=None,
        help="policy names (maskkv, snapkv, ...: each policy object with its default options); "
        "default: every registered policy",
    )
    quality.add_argument(
        "--budgets",
        nargs="+",
        default=None,
        help="prompt KV pairs kept per head; 'full' keeps the whole prompt (default 4 6 8 12 16 "
        "32 full; with --suite ruler 16 32 64 128 256 512 full)",
    )
    quality.add_argument(
        "--samples", type=int, default=None, help="sequences per task (default 8; ruler suite 64)"
    )
    quality.add_argument(
        "--suite",
        choices=["ruler"],
        help="ruler: the long-context sweep on the project's RULER-style models (--model ruler "
        "or ruler-block; budgets 16-512 and full, 64 samples per task, resumed from its JSON)",
    )
    quality.add_argument(
        "--revote",
        nargs="+",
        type=int,
        default=[],
        metavar="K",
        help="also run every policy x budget with revote=K (re-select every K steps with "
        "the step's queries; maskkv_compile/revote.py); writes "
        "quality_<model>_tradeoff.md and _pareto.png",
    )
    quality.add_argument(
        "--revote-voters",
        choices=["response", "masked"],
        default="response",
        help="who votes in the --revote cells: every response row, or the rows still masked "
        "(Revote(voters=...)); masked cells are keyed <policy>@<B>+revote<K>+masked",
    )
    quality.add_argument(
        "--refresh",
        nargs="+",
        type=int,
        default=[],
        metavar="K",
        help="also run every policy x budget with prompt_refresh=K (the expensive reference)",
    )
    quality.add_argument(
        "--semi-ar",
        type=int,
        default=None,
        metavar="B",
        help="full-attention models: LLaDA's semi-autoregressive loop for every configuration "
        "(each span in blocks of B, one token a step in the lowest open block); give it its own "
        "--out",
    )
    quality.add_argument(
        "--dual",
        action="store_true",
        help="with --semi-ar B: also run every policy x budget with the dual cache "
        "(optimize(block_length=B)); cells keyed <policy>@<B>+dual and full_cache+dual",
    )
    quality.add_argument(
        "--recent",
        type=int,
        default=0,
        metavar="R",
        help="every configuration keeps the R prompt entries nearest the response (block "
        "models: just before the block) in every head (optimize(recent=R)); give it its own "
        "--out",
    )
    quality.add_argument(
        "--tasks", nargs="+", default=None, help="default: every task of the model"
    )
    quality.add_argument(
        "--out", default="quality-out", help="folder for quality_<model>.{json,md} and PNGs"
    )
    quality.add_argument(
        "--resume", action="store_true", help="keep the cells already in the JSON, run the rest"
    )
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    quality.add_argument("--no-plots", action="store_true")
    quality.add_argument("--quiet", action="store_true", help="no progress bar")
    quality.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="tiny-dllm / ruler / ruler-block: a folder written by scripts/train_tiny_dllm.py or "
        "scripts/train_ruler.py (default: the shipped one)",
    )
    quality.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="ruler / ruler-block: the tasks' length in tokens (default 2048)",
    )
    quality.add_argument(
        "--heatmap",
        action="store_true",
        help="tiny-dllm only: also a needle depth x haystack length exact-match heatmap",
    )
    quality.add_argument(
        "--heatmap-policies", nargs="+", type=policy_name, default=["maskkv", "snapkv", "streaming"]
    )
    quality.add_argument("--heatmap-budget", type=int, default=8)
    quality.add_argument(
        "--heatmap-samples", type=int, default=8, help="sequences per heatmap cell"
    )
    quality.add_argument(
        "--heatmap-lengths", type=int, nargs="+", default=list(LENGTHS), help="haystack lengths"
    )
    quality.add_argument(
        "--heatmap-depths",
        type=float,
        nargs="+",
        default=list(DEPTHS),
        help="relative depths of the asked needle",
    )
    quality.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
