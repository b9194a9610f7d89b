"""Which of the asked chain's items a block model's vote keeps, on the RULER vartrack task.

For each vartrack sequence of a block-diffusion sweep JSON (``maskkv-compile eval --suite ruler
--model ruler-block``), run the block loop's first call (the window whose last block holds the
answer's masks; its mask rows vote) under ``maskkv`` at ``--budget`` with the sweep's layer
profile, and count, per layer, the share of the asked chain's ``LET a b`` items whose three
tokens are all kept in some KV head. Rows are grouped by whether the full cache and the
``maskkv@<budget>`` cell of the JSON got the answer right (docs/ruler_models.md).

    python scripts/ruler_vartrack_kept.py --checkpoint DIR \\
        --json docs/ruler_block_2048/quality_ruler_block.json --context 2048 --budget 64
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from maskkv_compile.evaluation.models import load_bundle
from maskkv_compile.evaluation.outputs import load_results
from maskkv_compile.evaluation.ruler import LET, block_mask
from maskkv_compile.evaluation.suite import optimized
from maskkv_compile.profile import LayerProfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--json", required=True, help="the sweep's JSON (or its .gz beside it)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    results = load_results(Path(args.json))
    if results is None:
        raise SystemExit(f"{args.json}: no such JSON (nor a .gz beside it)")
    bundle = load_bundle(
        "ruler-block",
        samples=args.samples,
        tasks=["vartrack"],
        checkpoint=args.checkpoint,
        context=args.context,
    )
    profile = LayerProfile.from_dict(results["profile"])
    cell = results["cells"][f"maskkv@{args.budget}"]
    model = optimized(bundle.model, bundle.mask_id, "maskkv", args.budget, profile=profile)
    groups = collections.defaultdict(list)
    for sample in bundle.samples:
        model.reset()  # each sequence a new prompt: its own vote
        x = sample.masked(bundle.mask_id)
        n, block = x.shape[1], bundle.block_length
        end = min(n, (sample.start // block + 1) * block)
        model(x[:, :end], attention_mask=block_mask(n, block)[:, :, :end, :end])
        ids = sample.masked(-1)[0].tolist()
        answer = set(sample.truth())
        items = [i for i in range(sample.start - 2) if ids[i] == LET and ids[i + 1] in answer]
        shares = []
        for layer in model.runtimes[-1].last_session.layers:
            heads = [set(h.tolist()) for h in layer.kept_pos[0]]  # (Hkv, K) kept positions
            whole = sum(any({i, i + 1, i + 2} <= kept for kept in heads) for i in items)
            shares.append(whole / max(len(items), 1))
        right = (results["cells"]["full_cache"][sample.id]["score"], cell[sample.id]["score"])
        groups[right].append(shares)
    for (full, ours), shares in sorted(groups.items()):
        mean = torch.tensor(shares).mean(0).tolist()
        print(
            f"full cache {full:.0f}, maskkv@{args.budget} {ours:.0f}: {len(shares)} sequences; "
            f"chain items kept whole, per layer: {[round(v, 2) for v in mean]}"
        )


if __name__ == "__main__":
    main()
