"""The files ``maskkv-compile eval`` writes beside a quality JSON, from the JSON alone (a fresh
run, a resumed one, or ``scripts/merge_quality_json.py``): ``<stem>.md`` with every table, the
metric plots, and, when the JSON holds re-vote, refresh or dual-cache cells, the trade-off
table ``<stem>_tradeoff.md`` and its Pareto plot ``<stem>_pareto.png``."""

from __future__ import annotations

from pathlib import Path

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
