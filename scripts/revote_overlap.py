"""How much the first re-vote changes: the fraction of the prefill's kept entries (over every layer,
KV head and sample) that a `revote=1` step keeps, for `maskkv` on the quality suite's samples
(8 per task) with the layer profile stored in `docs/revote/quality_<model>.json`.

    python scripts/revote_overlap.py rxnfp 5
"""

import json
import sys
from pathlib import Path

import torch

from maskkv_compile.evaluation.models import load_bundle
from maskkv_compile.evaluation.suite import optimized
from maskkv_compile.profile import LayerProfile

name, budget = sys.argv[1], int(sys.argv[2])
bundle = load_bundle(name, 8)
profile = LayerProfile.from_dict(
    json.loads(Path(f"docs/revote/quality_{name.replace('-', '_')}.json").read_text())["profile"]
)
net = optimized(
    bundle.model, bundle.mask_id, "maskkv", budget, profile=profile, revote=1
)  # as the suite builds a cell


def kept(session) -> list[set]:
    """Per layer: the (row, KV head, absolute position) of every kept entry."""
    return [
        set(
            (b, h, int(x))
            for b, row in enumerate(c.kept_pos.tolist())
            for h, head in enumerate(row)
            for x in head
            if x >= 0
        )
        for c in session.layers
    ]


fracs = []
with torch.no_grad():
    for s in bundle.samples:
        net.reset()
        x = s.masked(bundle.mask_id)
        out = net(x).logits
        before = kept(net.runtime.last_session)
        pos = int((x[0] == bundle.mask_id).nonzero()[0, 0])
        x[0, pos] = int(out[0, pos].argmax())
        net(x)
        assert net.cache_stats()["revotes"] == 1
        after = kept(net.runtime.last_session)
        fracs.append(sum(len(a & b) for a, b in zip(before, after)) / sum(len(a) for a in before))
print(
    name,
    budget,
    "fraction of the prefill's kept entries the first re-vote keeps: "
    "mean %.3f min %.3f over %d samples" % (sum(fracs) / len(fracs), min(fracs), len(fracs)),
)
