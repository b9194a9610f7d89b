"""The quality suite from Python: how much quality MaskKV and its baselines keep per budget.

Runs a small slice of ``maskkv-compile eval`` (see docs/quality.md for the full run):
AntiBERTy, a pretrained antibody BERT (``pip install --no-deps antiberty==0.1.3``), fills
masked CDR-H3 loops and 20-residue suffixes of public antibody heavy chains, one residue per
step through ``optimize(model)(x).logits``, for a few policies and budgets; without
antiberty it falls back to the random-weight ``tiny-llama`` (whose numbers mean nothing).
Prints the paper-style tables (rows policies, columns budgets), writes the JSON of every cell
and the plots, then resumes from the JSON to show that nothing is recomputed.

    python examples/eval_suite.py                       # about 30 s on a 2-core CPU
    python examples/eval_suite.py --samples 8 --budgets 4 8 16 32 full --out quality-out
"""

import argparse
import importlib.util
import tempfile
import time

import torch

from maskkv_compile.evaluation import plot, run_suite, table, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    have_antiberty = importlib.util.find_spec("antiberty") is not None
    parser.add_argument(
        "--model",
        default="antiberty" if have_antiberty else "tiny-llama",
        choices=["antiberty", "rxnfp", "tiny-llama"],
    )
    parser.add_argument("--policies", nargs="+", default=["maskkv", "snapkv", "streaming"])
    parser.add_argument("--budgets", nargs="+", default=["4", "full"])
    parser.add_argument("--samples", type=int, default=1, help="sequences per task")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = args.out or tempfile.mkdtemp(prefix="maskkv-quality-")

    t0 = time.perf_counter()
    suite = run_suite(
        args.model, args.policies, args.budgets, samples=args.samples, out=out, progress=False
    )
    results = suite.results
    print(results["note"])
    print(
        f"{len(results['samples'])} samples; {suite.optimize_calls} optimize() calls, "
        f"{time.perf_counter() - t0:.0f}s"
    )
    for metric in ("retention", "agree_uncached", "agree_full", "kl"):
        print(f"\n{metric}:")
        print(table(results, metric, fmt="simple"))
    for line in targets(results):
        print(line)
    for path in plot(results, f"{out}/quality_{args.model.replace('-', '_')}"):
        print("plot:", path)

    again = run_suite(
        args.model,
        args.policies,
        args.budgets,
        samples=args.samples,
        out=out,
        resume=True,
        progress=False,
    )
    same = table(again.results, "agree_uncached") == table(results, "agree_uncached")
    print(
        f"\nresumed from {again.json_path}: {again.optimize_calls} optimize() calls, "
        f"{again.model_calls} model calls, same table: {same}"
    )


if __name__ == "__main__":
    main()
