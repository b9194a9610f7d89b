"""The README's quality summary, computed from the quality JSONs in ``docs/`` (never typed).

``python scripts/update_readme_quality.py`` rewrites the block between the two markers of
README.md; ``--check`` fails when the block differs from what the JSONs give (a test runs it).
Each row: one model and budget, MaskKV's retention, its uniform-budget ablation's, and the best
other policy's, each with its 95% bootstrap interval (:mod:`maskkv_compile.evaluation.report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from maskkv_compile.evaluation.outputs import load_results
from maskkv_compile.evaluation.report import (
    MASKKV_POLICIES,
    aggregate,
    interval,
    mean_prompt,
    sample_ids,
)
from maskkv_compile.evaluation.suite import config_key

START = "<!-- quality-summary:start (scripts/update_readme_quality.py writes this block) -->"
END = "<!-- quality-summary:end -->"

# (JSON under docs/, name in the table, budgets shown)
ROWS = (
    ("quality_antiberty.json", "AntiBERTy", (4, 8)),
    ("quality_rxnfp.json", "rxnfp", (4, 8)),
    ("quality_tiny_dllm.json", "tiny-dllm", (4, 8, 26)),
    ("quality_ruler.json", "ruler (full attention)", (16, 32, 64, 128, 256)),
    ("quality_ruler_block.json", "ruler-block (blocks of 32)", (16, 32, 64, 128, 256)),
    # training checkpoints that do not pass the ship bar (docs/ruler_models.md)
    ("ruler_full_256/quality_ruler.json", "ruler checkpoint, 256 tokens", (8, 16, 32, 64)),
    ("ruler_full_1024_s14500/quality_ruler.json", "ruler checkpoint, 1024", (16, 32, 64, 128)),
    ("ruler_full_2048/quality_ruler.json", "ruler checkpoint, 2048", (16, 32, 64, 128, 256, 512)),
    ("ruler_full_4096/quality_ruler.json", "ruler checkpoint, 4096", (64, 128)),
    ("ruler_block_256/quality_ruler_block.json", "ruler-block checkpoint, 256", (8, 16, 32, 64)),
    (
        "ruler_block_1024/quality_ruler_block.json",
        "ruler-block checkpoint, 1024",
        (16, 32, 64, 128),
    ),
    (
        "ruler_block_2048/quality_ruler_block.json",
        "ruler-block checkpoint, 2048",
        (16, 32, 64, 128),
    ),
)


def _cell(results: dict, key: str, ids: list[str]) -> Optional[tuple[float, str]]:
    agg = aggregate(results, key, ids)
    if agg is None or agg["retention"] is None:
        return None
    ci = interval(results, key, ids, "retention")
    bounds = "" if ci is None else " [{:.0f}, {:.0f}]".format(*ci)
    return agg["retention"], f"{agg['retention']:.1f}{bounds}"


def _show(cell, top, suffix: str = "") -> str:
    """A cell's text, in bold when its value is the row's best."""
    if cell is None:
        return ""
    text = cell[1] + suffix
    return f"**{text}**" if cell[0] == top else text


def rows(results: dict, name: str, budgets: tuple[int, ...]) -> list[list[str]]:
    ids = sample_ids(results)
    prompt = mean_prompt(results, ids)
    out = []
    for i, budget in enumerate(b for b in budgets if b in results["budgets"]):
        cells = {p: _cell(results, config_key(p, budget), ids) for p in results["policies"]}
        ours = [cells.get(p) for p in MASKKV_POLICIES]
        others = [(c[0], c[1], p) for p, c in cells.items() if c and p not in MASKKV_POLICIES]
        best = max(others, default=None)
        values = [c[0] for c in ours if c] + ([best[0]] if best else [])
        top = max(values, default=None)

        label = f"{name} ({prompt:.0f})" if i == 0 else name
        out.append(
            [label, f"{budget} ({100 * budget / prompt:.0f}%)"]
            + [_show(c, top) for c in ours]
            + [_show(best, top, f" ({best[2]})") if best else ""]
        )
    return out


def block(docs: Path) -> str:
    """The markdown table for every JSON of ``ROWS`` present in ``docs``."""
    lines = [
        "| model (mean prompt) | budget | " + " | ".join(MASKKV_POLICIES) + " | best baseline |",
        "|---|---|" + "---|" * (len(MASKKV_POLICIES) + 1),
    ]
    for file, name, budgets in ROWS:
        results = load_results(docs / file)
        if results is not None:
            for row in rows(results, name, budgets):
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def rewrite(readme: str, docs: Path) -> str:
    """``readme`` with its summary block replaced by :func:`block`."""
    if START not in readme or END not in readme:
        raise ValueError(f"README has no quality summary markers ({START!r} ... {END!r})")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block(docs)}\n{END}{tail}"
