"""What MaskKV's default layer allocation costs: the quality suite's retention of MaskKV with
uniform layer budgets (``MaskKV()``, what ``optimize(model, budget=B)`` runs without a profile)
against MaskKV with layer profiles from different sources:

* ``calibrated``: ``calibrate`` on the bundle's calibration prompts (what the quality tables use);
* ``first_prompt``: ``calibrate`` on the first evaluated sample's own prompt only (what a profile
  measured at the first prompt's prefill would give);
* ``synthetic``: ``calibrate`` on one prompt of random tokens (no data at all);

plus ``mask_voting_uniform`` (uniform layers and heads) for scale. Same greedy infill loop and
score as ``maskkv-compile eval``.
Run: ``python scripts/compare_default_allocation.py --model tiny-dllm``.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

import maskkv_compile
from maskkv_compile import MaskKV, MaskVotingUniform
from maskkv_compile.budgets import maskkv_layer_budgets
from maskkv_compile.evaluation.models import load_bundle
from maskkv_compile.evaluation.suite import infill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-dllm")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 13, 26])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    bundle = load_bundle(args.model, samples=args.samples)
    model, mask = bundle.model, bundle.mask_id
    gen = bundle.calibration_gen_length
    first = bundle.samples[0]
    first_prompt = torch.tensor([first.ids[: first.start]])
    synthetic = torch.randint(
        0,
        mask,
        (1, int(bundle.calibration[0].shape[-1])),
        generator=torch.Generator().manual_seed(0),
    )
    profiles = {
        "calibrated": maskkv_compile.calibrate(
            model, bundle.calibration, gen_length=gen, mask_token_id=mask, progress=False
        ),
        "first_prompt": maskkv_compile.calibrate(
            model, [first_prompt], gen_length=first.span_len, mask_token_id=mask, progress=False
        ),
        "synthetic": maskkv_compile.calibrate(
            model, [synthetic], gen_length=gen, mask_token_id=mask, progress=False
        ),
    }
    policies = {
        "maskkv_uniform_layers (default, no profile)": MaskKV(),
        **{f"maskkv_{name}": MaskKV(profile=p) for name, p in profiles.items()},
        "mask_voting_uniform": MaskVotingUniform(),
    }
    results = {
        "model": bundle.name,
        "samples": len(bundle.samples),
        "budgets": args.budgets,
        "importance": {name: list(p.importance) for name, p in profiles.items()},
        "layer_budgets_at_B=1": {
            name: maskkv_layer_budgets(p.importance, 1.0) for name, p in profiles.items()
        },
        "retention": {},
    }
    full = None
    for key, policy in [("full", MaskVotingUniform()), *policies.items()]:
        row = {}
        for budget in [10_000] if key == "full" else args.budgets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = maskkv_compile.optimize(
                    model, budget=budget, mask_token_id=mask, backend="eager", policy=policy
                )
                score = 0.0
                for sample in bundle.samples:
                    net.reset()
                    tokens, _, _ = infill(net, sample, mask)
                    truth = list(sample.truth())
                    score += (
                        float(tokens == truth)
                        if bundle.exact
                        else sum(a == b for a, b in zip(tokens, truth)) / len(truth)
                    )
            torch._dynamo.reset()
            row[budget] = score / len(bundle.samples)
        if key == "full":
            full = row[10_000]
            results["full_cache_score"] = full
            continue
        results["retention"][key] = {
            b: round(100 * s / full, 1) if full else None for b, s in row.items()
        }
        print(key, results["retention"][key], flush=True)
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
