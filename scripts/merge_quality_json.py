"""Merge quality JSONs of one model run as separate processes (``maskkv-compile eval`` over
disjoint ``--tasks`` or ``--policies``, one core each) into one, then write its tables and plots.

    python scripts/merge_quality_json.py part_a.json part_b.json --out docs/ruler_full_4096

Refused: JSONs of another model, loop (``semi_ar``), ``recent`` window or layer profile, and a
sample or a cell that two parts both hold with different contents (the same seeded sample
evaluated twice must give the same cell, except for its timings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskkv_compile.evaluation import write_reports
from maskkv_compile.evaluation.outputs import load_results
from maskkv_compile.evaluation.suite import budgets_in_order

SAME = ("format", "version", "model", "semi_ar", "recent")
LISTS = ("policies", "budgets", "tasks", "revotes", "refreshes", "revote_voters")
TIMINGS = ("seconds", "net_seconds", "step_ms")


def _untimed(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in TIMINGS}


def merge(parts: list[dict]) -> dict:
    out = {k: v for k, v in parts[0].items() if k not in ("samples", "cells")}
    out["samples"], out["cells"] = {}, {}
    for i, part in enumerate(parts):
        for key in SAME:
            if part.get(key) != out.get(key):
                raise ValueError(f"part {i} differs in {key!r}: it is another run; merge none")
        profile = part.get("profile")  # None in a part none of whose policies needed one
        if profile is not None and out.get("profile") not in (None, profile):
            raise ValueError(f"part {i} was run with another layer profile; merge none")
        out["profile"] = out.get("profile") or profile
        for key in LISTS:
            out[key] = out.get(key, []) + [v for v in part.get(key, []) if v not in out[key]]
        out["dual"] = bool(out.get("dual")) or bool(part.get("dual"))
        for sid, sample in part["samples"].items():
            if out["samples"].setdefault(sid, sample) != sample:
                raise ValueError(f"sample {sid} differs between parts: another seed or context")
        for key, cells in part["cells"].items():
            merged = out["cells"].setdefault(key, {})
            for sid, cell in cells.items():
                held = merged.setdefault(sid, cell)
                if _untimed(held) != _untimed(cell):
                    raise ValueError(f"cell {key} / {sid} differs between parts")
    out["budgets"] = budgets_in_order(out["budgets"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "parts", nargs="+", type=Path, help="quality JSONs (or their .gz beside the path given)"
    )
    ap.add_argument("--out", type=Path, required=True, help="folder for the merged JSON")
    args = ap.parse_args(argv)
    parts = [load_results(p) for p in args.parts]
    missing = [str(p) for p, part in zip(args.parts, parts) if part is None]
    if missing:
        raise SystemExit(f"no such quality JSON (nor a .gz beside it): {', '.join(missing)}")
    merged = merge(parts)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quality_{merged['model'].replace('-', '_')}"
    Path(f"{stem}.json").write_text(json.dumps(merged, indent=1) + "\n")
    for png in write_reports(merged, stem):
        print(png)
    print(f"{stem}.json: {len(merged['samples'])} samples, cells {sorted(merged['cells'])}")


if __name__ == "__main__":
    main()
