"""Tables (paper Table 1 layout: rows policies, columns budgets), target checks and plots of
a quality JSON written by :mod:`maskkv_compile.evaluation.suite`.

Every table cell and plotted point is the value over the table's samples and, in brackets /
as an error bar, its percentile bootstrap interval over those samples (``BOOTSTRAP``: 95%,
1000 resamples of the sample ids with replacement, seeded, the same resamples for every
configuration). The targets compare MaskKV with the best baseline by a paired bootstrap on
the same resamples. All of it is computed from the per-sample cells of the JSON alone, so
``maskkv-compile eval --resume`` on a complete JSON rebuilds the markdown and the plots
without running a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from maskkv_compile.evaluation.suite import (
    FULL,
    FULL_CACHE,
    FULL_DUAL,
    FULL_REFRESH,
    UNCACHED,
    config_key,
)

METRICS = {
    # name: (title, higher is better, format)
    "retention": ("retention (%): task score / full-cache task score", True, "{:.1f}"),
    "score": ("task score: fraction of filled tokens equal to the true sequence", True, "{:.3f}"),
    "agree_uncached": ("agreement of the fill with the uncached model's fill", True, "{:.3f}"),
    "agree_full": ("agreement of the fill with the full prompt cache's fill", True, "{:.3f}"),
    "kl": ("mean KL(uncached || cached) at the masked positions, step 1", False, "{:.2e}"),
}
# MaskKV, its uniform-budget ablation and its coverage-greedy layer variant
MASKKV_POLICIES = ("maskkv", "mask_voting_uniform", "maskkv_coverage")
AXIS = {
    "retention": "retention (%) vs the full prompt cache",
    "score": "task score",
    "agree_uncached": "agreement with the uncached fill",
    "agree_full": "agreement with the full-cache fill",
    "kl": "KL(uncached || cached) at step 1",
}
REFERENCE_ROWS = (
    (FULL_CACHE, "full cache (no eviction)"),
    (FULL_REFRESH, "full cache + refresh=1"),
    (FULL_DUAL, "full cache + dual cache"),
    (UNCACHED, "uncached model"),
)
BOOTSTRAP = {"level": 0.95, "resamples": 1000, "seed": 0}
INTERVAL_FORMAT = {
    "retention": "{:.0f}",
    "score": "{:.2f}",
    "agree_uncached": "{:.2f}",
    "agree_full": "{:.2f}",
    "kl": "{:.1e}",
}


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
    out["retention"] = (
        100.0 * sum(cells[i]["score"] for i in ids) / full_score if full_score else None
    )
    out["n"] = len(ids)
    return out


def _replicates(results: dict, key: str, ids: Sequence[str], metric: str) -> Optional[Callable]:
    """f(index) -> the table's value of ``metric`` for ``key`` on the samples ``ids[index]``:
    ``index`` is a (resamples, n) long tensor, the result one value per row (nan where it is
    undefined). None where :func:`aggregate` has no value."""
    cells, full = results["cells"].get(key, {}), results["cells"].get(FULL_CACHE, {})
    if not ids or any(i not in cells for i in ids):
        return None
    if metric == "retention":
        if not all(i in full for i in ids):
            return None
        num = torch.tensor([float(cells[i]["score"]) for i in ids], dtype=torch.float64)
        den = torch.tensor([float(full[i]["score"]) for i in ids], dtype=torch.float64)
        return lambda index: 100.0 * num[index].sum(-1) / den[index].sum(-1)  # 0 / 0 -> nan
    raw = [cells[i].get(metric) for i in ids]
    valid = torch.tensor([v is not None for v in raw], dtype=torch.float64)
    vals = torch.tensor([0.0 if v is None else float(v) for v in raw], dtype=torch.float64)
    return lambda index: vals[index].sum(-1) / valid[index].sum(-1)


def _resamples(n: int, resamples: int, seed: int) -> torch.Tensor:
    """(resamples, n) indices drawn with replacement, the first row the samples themselves."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.arange(n)[None], torch.randint(0, n, (resamples, n), generator=gen)])


def _percentile_interval(reps: torch.Tensor, level: float) -> Optional[tuple[float, float]]:
    reps = reps[~torch.isnan(reps)]
    if reps.numel() == 0:
        return None
    tail = (1.0 - level) / 2
    lo, hi = torch.quantile(reps, torch.tensor([tail, 1.0 - tail], dtype=reps.dtype)).tolist()
    return lo, hi


def interval(
    results: dict,
    key: str,
    ids: Sequence[str],
    metric: str,
    *,
    level: float = BOOTSTRAP["level"],
    resamples: int = BOOTSTRAP["resamples"],
    seed: int = BOOTSTRAP["seed"],
) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of a table cell (configuration ``key``, samples ``ids``):
    ``resamples`` resamples of ``ids`` with replacement, seeded. None where the cell is empty."""
    f = _replicates(results, key, ids, metric)
    if f is None:
        return None
    reps = f(_resamples(len(ids), resamples, seed))
    if math.isnan(reps[0]):
        return None
    return _percentile_interval(reps[1:], level)


def paired_interval(
    results: dict,
    key: str,
    other: str,
    ids: Sequence[str],
    metric: str,
    *,
    level: float = BOOTSTRAP["level"],
    resamples: int = BOOTSTRAP["resamples"],
    seed: int = BOOTSTRAP["seed"],
) -> Optional[tuple[float, tuple[float, float]]]:
    """(value, interval) of ``key``'s cell minus ``other``'s, both on the same resamples (paired);
    for ``kl``, ``other``'s divided by ``key``'s (how many times lower ``key``'s KL is)."""
    f, g = _replicates(results, key, ids, metric), _replicates(results, other, ids, metric)
    if f is None or g is None:
        return None
    index = _resamples(len(ids), resamples, seed)
    a, b = f(index), g(index)
    reps = b / a if metric == "kl" else a - b
    reps = torch.where(torch.isinf(reps), torch.nan, reps)
    if math.isnan(reps[0]):
        return None
    bounds = _percentile_interval(reps[1:], level)
    return None if bounds is None else (float(reps[0]), bounds)


def interval_note(
    level: float = BOOTSTRAP["level"],
    resamples: int = BOOTSTRAP["resamples"],
    seed: int = BOOTSTRAP["seed"],
) -> str:
    return (
        f"Each cell: the value over the table's samples [its {100 * level:.0f}% percentile "
        f"bootstrap interval: {resamples} resamples of the samples with replacement, seed {seed}]."
    )


def mean_prompt(results: dict, ids: Sequence[str]) -> float:
    return sum(results["samples"][i]["prompt_len"] for i in ids) / max(len(ids), 1)


def _budget_label(budget, prompt: float) -> str:
    return "full" if budget == FULL else f"B={budget} ({100 * budget / prompt:.0f}%)"


def table(
    results: dict,
    metric: str = "retention",
    task: Optional[str] = None,
    fmt: str = "github",
    policies: Optional[Sequence[str]] = None,
    budgets: Optional[Sequence] = None,
    intervals: bool = True,
) -> str:
    """Rows policies (then the references), columns budgets; the best policy per column (by its
    value) in bold (github format). With ``intervals``, each value is followed by its bootstrap
    interval over the samples (:func:`interval`)."""
    title, higher, number = METRICS[metric]
    ids = sample_ids(results, task)
    policies = list(policies or results["policies"])
    budgets = list(budgets or results["budgets"])
    columns = [b for b in budgets if b != FULL] + [FULL]
    prompt = mean_prompt(results, ids)
    values = {
        p: [_value(results, config_key(p, b), ids, metric) for b in columns] for p in policies
    }
    best = []
    for j in range(len(columns)):
        col = [values[p][j] for p in policies if values[p][j] is not None]
        best.append((max(col) if higher else min(col)) if col else None)

    def bounds(key: str) -> str:
        ci = interval(results, key, ids, metric) if intervals else None
        return (
            ""
            if ci is None
            else " [{}, {}]".format(*(INTERVAL_FORMAT[metric].format(x) for x in ci))
        )

    rows = []
    for p in policies:
        row = [p]
        for j, v in enumerate(values[p]):
            key = config_key(p, columns[j])
            text = (
                "n/a"
                if v is None
                and metric == "retention"
                and _value(results, key, ids, "score") is not None
                else ("" if v is None else number.format(v))
            )
            if (
                fmt == "github"
                and v is not None
                and best[j] is not None
                and math.isclose(v, best[j], rel_tol=1e-9, abs_tol=1e-12)
            ):
                text = f"**{text}**"
            row.append(text if v is None else text + bounds(key))
        rows.append(row)
    for key, label in REFERENCE_ROWS:
        if key == FULL_DUAL and key not in results["cells"]:
            continue  # a run without the dual cache
        v = _value(results, key, ids, metric)
        rows.append(
            [label]
            + [""] * (len(columns) - 1)
            + ["" if v is None else number.format(v) + bounds(key)]
        )
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
    prompt (retention, agreement with uncached, KL), and >= 90% retention at <= 5%.

    OK / MISSED compares the values over all the samples. Each comparison also gives the paired
    bootstrap interval (:func:`paired_interval`) of MaskKV minus the best baseline (for KL: the
    baseline's KL over MaskKV's), and says "clear" where that interval excludes a tie (0, or a KL
    ratio of 1) and "within the interval" where it does not. The best baseline is picked on all
    the samples, not per resample."""
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
            paired = paired_interval(
                results, config_key("maskkv", b), config_key(best_p, b), ids, metric
            )
            if paired is None:
                detail = ""
            elif metric == "kl":
                ratio, (lo, hi) = paired
                clear = "clear" if lo > 1 or hi < 1 else "within the interval"
                detail = f" (baseline's KL / maskkv's {ratio:.2f} [{lo:.2f}, {hi:.2f}], {clear})"
            else:
                diff, (lo, hi) = paired
                clear = "clear" if lo > 0 or hi < 0 else "within the interval"
                detail = (
                    f" (difference {fmt.format(diff)} [{fmt.format(lo)}, {fmt.format(hi)}], "
                    f"{clear})"
                )
            parts.append(
                f"{metric} {fmt.format(ours[metric])} vs best baseline {best_p} "
                f"{fmt.format(theirs)}{detail} {'OK' if ok else 'MISSED'}"
            )
        extra = ""
        if b <= 0.05 * prompt and ours["retention"] is not None:
            extra = (
                "; >= 90% retention at <= 5% of the prompt: "
                f"{'OK' if ours['retention'] >= 90 else 'MISSED'}"
            )
        lines.append(f"B={b} ({100 * b / prompt:.1f}% of the prompt): " + "; ".join(parts) + extra)
    return lines


def markdown(
    results: dict, metrics: Sequence[str] = ("retention", "agree_uncached", "agree_full", "kl")
) -> str:
    """Every table of the JSON (all samples, then per task) as markdown."""
    out = [f"model: {results['note']}", "", interval_note(), ""]
    groups = [(None, "all samples")] + [(t, f"task {t}") for t in results["tasks"]]
    for task, label in groups:
        ids = sample_ids(results, task)
        out += [
            f"### {label} ({len(ids)} samples, mean prompt {mean_prompt(results, ids):.0f} tokens)",
            "",
        ]
        for metric in metrics:
            out += [f"{METRICS[metric][0]}:", "", table(results, metric, task), ""]
        checks = targets(results, task)
        if checks:
            out += (
                ["targets (maskkv vs the best baseline at each budget):", ""]
                + [f"- {c}" for c in checks]
                + [""]
            )
    return "\n".join(out)


def plot(
    results: dict, prefix: str | Path, metrics: Sequence[str] = ("retention", "kl")
) -> list[Path]:
    """One PNG per metric (``<prefix>_<metric>.png``), one panel per task: the metric vs the
    budget, one line per policy with its bootstrap intervals as error bars (policies spread
    slightly along x so that the bars stay apart), the references as horizontal lines."""
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
            n_policies = len(results["policies"])
            for k, policy in enumerate(results["policies"]):
                spread = 2 ** (0.025 * (k - (n_policies - 1) / 2))
                points = []
                for x, b in zip(xs, budgets):
                    y = _value(results, config_key(policy, b), ids, metric)
                    if y is None or (metric == "kl" and y <= 0):
                        continue
                    ci = interval(results, config_key(policy, b), ids, metric) or (y, y)
                    low = max(y - ci[0], 0.0) if metric != "kl" else y - max(ci[0], y * 1e-3)
                    points.append((x * spread, y, low, max(ci[1] - y, 0.0)))
                if points:
                    ours = policy in MASKKV_POLICIES
                    px, py, lo, hi = zip(*points)
                    ax.errorbar(
                        px,
                        py,
                        yerr=[lo, hi],
                        marker="o",
                        ms=4,
                        capsize=2,
                        elinewidth=0.8,
                        lw=2.4 if policy == "maskkv" else 1.2,
                        ls="-" if ours else "--",
                        label=policy,
                        zorder=3 if ours else 2,
                    )
            for (key, label), color in zip(REFERENCE_ROWS, ("black", "gray", "silver")):
                y = _value(results, key, ids, metric)
                if y is not None and (metric != "kl" or y > 0):
                    ax.axhline(y, color=color, lw=1, ls=":", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(b) for b in budgets])
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel(
                "budget B (prompt KV entries kept per head); mean prompt "
                f"{mean_prompt(results, ids):.0f}"
            )
            ax.set_title(
                f"{results['model']}: {task} ({len(ids)} samples; bars: "
                f"{100 * BOOTSTRAP['level']:.0f}% bootstrap intervals)",
                fontsize=9,
            )
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
