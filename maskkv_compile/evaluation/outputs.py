"""A quality JSON's files: reading the JSON (plain, or gzipped as the larger sweeps in ``docs/``
are), and what ``maskkv-compile eval`` writes beside it from the JSON alone (a fresh run, a
resumed one, or ``scripts/merge_quality_json.py``): ``<stem>.md`` with every table, the metric
plots, and, when the JSON holds re-vote, refresh or dual-cache cells, the trade-off table
``<stem>_tradeoff.md`` and its Pareto plot ``<stem>_pareto.png``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Optional

from maskkv_compile.evaluation import tradeoff
from maskkv_compile.evaluation.report import markdown, plot


def write_reports(results: dict, stem: str | Path, plots: bool = True) -> list[Path]:
    """Writes the files for ``<stem>.json``'s results; returns the PNGs written."""
    Path(f"{stem}.md").write_text(markdown(results) + "\n")
    pngs = plot(results, stem) if plots else []
    if tradeoff.has_tradeoff(results):
        Path(f"{stem}_tradeoff.md").write_text(tradeoff.markdown(results) + "\n")
        if plots:
            pngs.append(tradeoff.plot(results, f"{stem}_pareto.png"))
    return pngs


def load_results(path: Path) -> Optional[dict]:
    """A quality JSON, or the gzipped copy beside it (the larger sweeps); None if neither."""
    packed = path.with_name(f"{path.name}.gz")
    if path.exists():
        return json.loads(path.read_text())
    if packed.exists():
        return json.loads(gzip.decompress(packed.read_bytes()))
    return None
