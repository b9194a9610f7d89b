"""Tables (paper Table 1 layout: rows policies, columns budgets), target checks and plots of
a quality JSON written by :mod:`maskkv_compile.evaluation.suite`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from maskkv_compile.evaluation.suite import FULL, FULL_CACHE, FULL_REFRESH, UNCACHED, config_key

METRICS = {
    # name: (title, higher is better, format)
    "retention": ("retention (%): task score / full-cache task score", True, "{:.1f}"),
    "score": ("task score: fraction of filled tokens equal to the true sequence", True, "{:.3f}"),
    "agree_uncached": ("agreement of the fill with the uncached model's fill", True, "{:.3f}"),
    "agree_full": ("agreement of the fill with the full prompt cache's fill", True, "{:.3f}"),
    "kl": ("mean KL(uncached || cached) at the masked positions, step 1", False, "{:.2e}"),
}
MASKKV_POLICIES = ("maskkv", "mask_voting_uniform")  # MaskKV and its uniform-budget ablation
AXIS = {"retention": "retention (%) vs the full prompt cache", "score": "task score",
        "agree_uncached": "agreement with the uncached fill", "agree_full": "agreement with the full-cache fill",
        "kl": "KL(uncached || cached) at step 1"}
REFERENCE_ROWS = ((FULL_CACHE, "full cache (no eviction)"), (FULL_REFRESH, "full cache + refresh=1"),
                  (UNCACHED, "uncached model"))


def sample_ids(results: dict, task: Optional[str] = None) -> list[str]:
    return [sid for sid, s in results["samples"].items() if task is None or s["task"] == task]


def aggregate(results: dict, key: str, ids: Sequence[str]) -> Optional[dict]:
    """Means over ``ids`` of one configuration; None unless every sample has a cell."""
    cells, full = results["cells"].get(key, {}), results["cells"].get(FULL_CACHE, {})
    if not ids or any(i not in cells for i in ids):
        return None
    out = {}
    for m in ("score", "agree_uncached", "agree_full", "kl"):
        vals = [cells[i].get(m) for i in ids if cells[i].get(m) is not None]
        out[m] = sum(vals) / len(vals) if vals else None
    full_score = sum(full[i]["score"] for i in ids) if all(i in full for i in ids) else None
    # ratio of sums: a sample the full cache scores 0 on still counts
    out["retention"] = 100.0 * sum(cells[i]["score"] for i in ids) / full_score if full_score else None
    out["n"] = len(ids)
    return out


def mean_prompt(results: dict, ids: Sequence[str]) -> float:
    return sum(results["samples"][i]["prompt_len"] for i in ids) / max(len(ids), 1)


def _budget_label(budget, prompt: float) -> str:
    return "full" if budget == FULL else f"B={budget} ({100 * budget / prompt:.0f}%)"


def table(results: dict, metric: str = "retention", task: Optional[str] = None, fmt: str = "github",
          policies: Optional[Sequence[str]] = None, budgets: Optional[Sequence] = None) -> str:
    """Rows policies (then the references), columns budgets; the best policy per column in bold
    (github format)."""
    title, higher, number = METRICS[metric]
    ids = sample_ids(results, task)
    policies = list(policies or results["policies"])
    budgets = list(budgets or results["budgets"])
    columns = [b for b in budgets if b != FULL] + [FULL]
    prompt = mean_prompt(results, ids)
    values = {p: [_value(results, config_key(p, b), ids, metric) for b in columns] for p in policies}
    best = []
    for j in range(len(columns)):
        col = [values[p][j] for p in policies if values[p][j] is not None]
        best.append((max(col) if higher else min(col)) if col else None)
    rows = []
    for p in policies:
        row = [p]
        for j, v in enumerate(values[p]):
            text = "n/a" if v is None and metric == "retention" and _value(results, config_key(p, columns[j]), ids, "score") is not None else ("" if v is None else number.format(v))
            if fmt == "github" and v is not None and best[j] is not None and math.isclose(v, best[j], rel_tol=1e-9, abs_tol=1e-12):
                text = f"**{text}**"
            row.append(text)
        rows.append(row)
    for key, label in REFERENCE_ROWS:
        v = _value(results, key, ids, metric)
        rows.append([label] + [""] * (len(columns) - 1) + ["" if v is None else number.format(v)])
    headers = ["policy"] + [_budget_label(b, prompt) for b in columns]
    return _tabulate(rows, headers, fmt)


def _value(results: dict, key: str, ids, metric: str):
    agg = aggregate(results, key, ids)
    return None if agg is None else agg[metric]


def _tabulate(rows, headers, fmt: str) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)
    except ImportError:  # tabulate is optional
        lines = [" | ".join(headers)] + [" | ".join(str(c) for c in row) for row in rows]
        return "\n".join(lines)


def targets(results: dict, task: Optional[str] = None) -> list[str]:
    """The issue's targets, checked per budget: MaskKV >= every baseline at budgets <= 10% of the
    prompt (retention, agreement with uncached, KL), and >= 90% retention at <= 5%."""
    ids = sample_ids(results, task)
    prompt = mean_prompt(results, ids)
    baselines = [p for p in results["policies"] if p not in MASKKV_POLICIES]
    lines = []
    if "maskkv" not in results["policies"]:
        return lines
    for b in [b for b in results["budgets"] if b != FULL and b <= 0.10 * prompt]:
        ours = aggregate(results, config_key("maskkv", b), ids)
        others = {p: aggregate(results, config_key(p, b), ids) for p in baselines}
        others = {p: a for p, a in others.items() if a is not None}
        if ours is None or not others:
            continue
        parts = []
        for metric, higher in (("retention", True), ("agree_uncached", True), ("kl", False)):
            if ours[metric] is None or any(a[metric] is None for a in others.values()):
                continue
            best_p = (max if higher else min)(others, key=lambda p: others[p][metric])
            theirs = others[best_p][metric]
            ok = ours[metric] >= theirs - 1e-12 if higher else ours[metric] <= theirs + 1e-12
            fmt = METRICS[metric][2]
            ratio = f" ({theirs / ours[metric]:.1f}x lower)" if metric == "kl" and ours[metric] > 0 else ""
            parts.append(f"{metric} {fmt.format(ours[metric])} vs best baseline {best_p} {fmt.format(theirs)}{ratio} "
                         f"{'OK' if ok else 'MISSED'}")
        extra = ""
        if b <= 0.05 * prompt and ours["retention"] is not None:
            extra = f"; >= 90% retention at <= 5% of the prompt: {'OK' if ours['retention'] >= 90 else 'MISSED'}"
        lines.append(f"B={b} ({100 * b / prompt:.1f}% of the prompt): " + "; ".join(parts) + extra)
    return lines


def markdown(results: dict, metrics: Sequence[str] = ("retention", "agree_uncached", "agree_full", "kl")) -> str:
    """Every table of the JSON (all samples, then per task) as markdown."""
    out = [f"model: {results['note']}", ""]
    groups = [(None, "all samples")] + [(t, f"task {t}") for t in results["tasks"]]
    for task, label in groups:
        ids = sample_ids(results, task)
        out += [f"### {label} ({len(ids)} samples, mean prompt {mean_prompt(results, ids):.0f} tokens)", ""]
        for metric in metrics:
            out += [f"{METRICS[metric][0]}:", "", table(results, metric, task), ""]
        checks = targets(results, task)
        if checks:
            out += ["targets (maskkv vs the best baseline at each budget):", ""] + [f"- {c}" for c in checks] + [""]
    return "\n".join(out)


def plot(results: dict, prefix: str | Path, metrics: Sequence[str] = ("retention", "kl")) -> list[Path]:
    """One PNG per metric (``<prefix>_<metric>.png``), one panel per task: the metric vs the
    budget, one line per policy, the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [b for b in results["budgets"] if b != FULL]
    full_x = 2 * max(finite) if finite else 1
    xs = finite + ([full_x] if FULL in results["budgets"] else [])
    budgets = finite + ([FULL] if FULL in results["budgets"] else [])
    tasks = list(results["tasks"])
    paths = []
    for metric in metrics:
        fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            ids = sample_ids(results, task)
            for policy in results["policies"]:
                points = [(x, _value(results, config_key(policy, b), ids, metric)) for x, b in zip(xs, budgets)]
                points = [(x, y) for x, y in points if y is not None and (metric != "kl" or y > 0)]
                if points:
                    ours = policy in MASKKV_POLICIES
                    ax.plot(*zip(*points), marker="o", lw=2.4 if policy == "maskkv" else 1.2,
                            ls="-" if ours else "--", label=policy, zorder=3 if ours else 2)
            for (key, label), color in zip(REFERENCE_ROWS, ("black", "gray", "silver")):
                y = _value(results, key, ids, metric)
                if y is not None and (metric != "kl" or y > 0):
                    ax.axhline(y, color=color, lw=1, ls=":", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(b) for b in budgets])
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel(f"budget B (prompt KV entries kept per head); mean prompt {mean_prompt(results, ids):.0f}")
            ax.set_title(f"{results['model']}: {task} ({len(ids)} samples)")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(AXIS[metric])
        if axes[0][-1].get_legend_handles_labels()[0]:
            axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(f"{prefix}_{metric}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
