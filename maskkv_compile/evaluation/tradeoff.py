"""Retention vs per-step cost: one-shot selection, re-selection (``revote``), prompt refresh and
the dual cache.

From a quality JSON whose suite ran with ``revotes`` / ``refreshes`` / the dual cache
(``maskkv-compile eval --revote 1 --refresh 1``, ``--semi-ar B --dual``): per policy x budget x
setting, the retention (with its bootstrap interval, as every table of
:mod:`maskkv_compile.evaluation.report`), the KL at the first step call, and the cost measured
in the same run on the configuration's own calls (``net_seconds``, ``step_ms`` of each cell,
after an untimed warm-up): the mean latency of a step over every step of the run (each sample's
mean weighted by its step count, so that the re-votes and refreshes of long answers count as
often as they ran), tokens/s over the whole generation (prefill included), and the step cost
relative to the same policy and budget without re-selection or dual cache. The plot puts every
configuration at (mean step ms, retention) and draws the Pareto front (no other point both
cheaper and better).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from maskkv_compile.evaluation.report import _tabulate, aggregate, interval, mean_prompt, sample_ids
from maskkv_compile.evaluation.suite import (
    FULL,
    FULL_CACHE,
    FULL_DUAL,
    FULL_REFRESH,
    UNCACHED,
    config_key,
)


def has_tradeoff(results: dict) -> bool:
    """Whether the JSON holds re-vote, refresh or dual-cache cells: the trade-off has rows."""
    return bool(results.get("revotes") or results.get("refreshes") or results.get("dual"))


def _cost(results: dict, key: str, ids) -> Optional[dict]:
    cells = results["cells"].get(key, {})
    if not ids or any(i not in cells or cells[i].get("net_seconds") is None for i in ids):
        return None
    # (mean ms of a sample's steps, its step count): the suite's loops call the model once per
    # filled token, and every call after the first is a step
    steps = [
        (cells[i]["step_ms"], len(cells[i]["tokens"]) - 1)
        for i in ids
        if cells[i].get("step_ms") is not None
    ]
    count = sum(n for _, n in steps)
    tokens = sum(len(cells[i]["tokens"]) for i in ids)
    seconds = sum(cells[i]["net_seconds"] for i in ids)
    revotes = [cells[i].get("revotes") or 0 for i in ids]
    return {
        "step_ms": sum(ms * n for ms, n in steps) / count if count else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "revotes": sum(revotes) / len(revotes),
    }


def rows(results: dict, task: Optional[str] = None) -> list[dict]:
    """One dict per configuration with the re-vote settings' budgets: policy, budget, setting,
    retention (+ interval), kl, step_ms, tokens_per_s, revotes, step cost vs one-shot."""
    ids = sample_ids(results, task)
    budgets = [b for b in results["budgets"] if b != FULL]
    out = []
    for policy in results["policies"]:
        for budget in budgets:
            base = config_key(policy, budget)
            base_cost = _cost(results, base, ids)
            keys = [(base, "one-shot")]
            keys += [
                (
                    config_key(policy, budget, revote=r, revote_voters=v),
                    f"revote {r}" + ("" if v == "response" else f" {v}"),
                )
                for v in results.get("revote_voters", ["response"])
                for r in results.get("revotes", [])
            ]
            keys += [
                (config_key(policy, budget, refresh=r), f"refresh {r}")
                for r in results.get("refreshes", [])
            ]
            if results.get("dual"):
                keys.append((config_key(policy, budget, dual=True), "dual cache"))
            for key, setting in keys:
                agg, cost = aggregate(results, key, ids), _cost(results, key, ids)
                if agg is None or cost is None:
                    continue
                rel = (
                    cost["step_ms"] / base_cost["step_ms"]
                    if base_cost and base_cost["step_ms"] and cost["step_ms"] is not None
                    else None
                )
                out.append(
                    {
                        "key": key,
                        "policy": policy,
                        "budget": budget,
                        "setting": setting,
                        "retention": agg["retention"],
                        "ci": interval(results, key, ids, "retention"),
                        "kl": agg["kl"],
                        **cost,
                        "vs_one_shot": rel,
                    }
                )
    for key, label in (
        (FULL_CACHE, "full cache"),
        (FULL_REFRESH, "full cache + refresh=1"),
        (FULL_DUAL, "full cache + dual cache"),
        (UNCACHED, "uncached"),
    ):
        agg, cost = aggregate(results, key, ids), _cost(results, key, ids)
        if agg is not None and cost is not None:
            out.append(
                {
                    "key": key,
                    "policy": label,
                    "budget": "",
                    "setting": "reference",
                    "retention": agg["retention"],
                    "ci": interval(results, key, ids, "retention"),
                    "kl": agg["kl"],
                    **cost,
                    "vs_one_shot": None,
                }
            )
    return out


def table(results: dict, task: Optional[str] = None, fmt: str = "github") -> str:
    ids = sample_ids(results, task)
    prompt = mean_prompt(results, ids)
    body = []
    for r in rows(results, task):
        ret = "" if r["retention"] is None else f"{r['retention']:.1f}"
        if r["ci"] is not None and r["retention"] is not None:
            ret += f" [{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]"
        budget = (
            r["budget"]
            if r["budget"] == ""
            else f"{r['budget']} ({100 * r['budget'] / prompt:.0f}%)"
        )
        body.append(
            [
                r["policy"],
                budget,
                r["setting"],
                ret,
                "" if r["kl"] is None else f"{r['kl']:.3g}",
                "" if r["step_ms"] is None else f"{r['step_ms']:.2f}",
                "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
                "" if r["vs_one_shot"] is None else f"{r['vs_one_shot']:.2f}x",
                f"{r['revotes']:.1f}",
            ]
        )
    headers = [
        "policy",
        "budget",
        "setting",
        "retention % [95% CI]",
        "KL step 1",
        "step ms",
        "tokens/s",
        "step cost vs one-shot",
        "re-votes",
    ]
    return _tabulate(body, headers, fmt)


def markdown(results: dict) -> str:
    out = [f"model: {results['note']}", ""]
    groups = [(None, "all samples")] + [(t, f"task {t}") for t in results["tasks"]]
    for task, label in groups:
        ids = sample_ids(results, task)
        out += [
            f"### {label} ({len(ids)} samples, mean prompt {mean_prompt(results, ids):.0f} tokens)",
            "",
            table(results, task),
            "",
        ]
    return "\n".join(out)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) that no other point beats on both (lower cost and
    higher quality, one of them strictly), sorted by cost."""
    front = []
    for i, (c, q) in enumerate(points):
        dominated = any(
            (c2 <= c and q2 >= q) and (c2 < c or q2 > q)
            for j, (c2, q2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot(results: dict, path: str | Path, task: Optional[str] = None) -> Path:
    """Retention vs mean step latency of every configuration, the Pareto front drawn through
    them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [
        r for r in rows(results, task) if r["step_ms"] is not None and r["retention"] is not None
    ]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"one-shot": "o", "reference": "*", "dual cache": "D"}
    policies = sorted({r["policy"] for r in data if r["setting"] != "reference"})
    colors = dict(zip(policies, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for r in data:
        kind = r["setting"].split()[0]
        marker = markers.get(r["setting"], "^" if kind == "revote" else "s")
        color = colors.get(r["policy"], "black")
        ax.scatter(
            r["step_ms"],
            r["retention"],
            marker=marker,
            color=color,
            s=40 if marker != "*" else 120,
            edgecolor="black" if kind == "revote" else None,
            zorder=3,
        )
        label = r["policy"] if r["setting"] == "reference" else f"{r['budget']}"
        ax.annotate(
            label,
            (r["step_ms"], r["retention"]),
            fontsize=6,
            xytext=(3, 3),
            textcoords="offset points",
        )
    front = pareto([(r["step_ms"], r["retention"]) for r in data])
    ax.plot(
        [data[i]["step_ms"] for i in front],
        [data[i]["retention"] for i in front],
        color="black",
        lw=1,
        ls="--",
        label="Pareto front",
        zorder=2,
    )
    for policy in policies:
        ax.scatter([], [], color=colors[policy], marker="o", label=policy)
    ax.scatter(
        [], [], color="white", edgecolor="black", marker="o", label="one-shot (label: budget)"
    )
    ax.scatter([], [], color="white", edgecolor="black", marker="^", label="revote")
    ax.scatter([], [], color="white", edgecolor="black", marker="s", label="prompt refresh")
    if results.get("dual"):
        ax.scatter([], [], color="white", edgecolor="black", marker="D", label="dual cache")
    ax.scatter([], [], color="white", edgecolor="black", marker="*", s=120, label="references")
    if data:
        ax.set_xscale("log")
    else:  # e.g. a model scored without retention (tiny-llama), or one-token spans (no step call)
        ax.text(
            0.5,
            0.5,
            "nothing to plot: no configuration has both a retention and a step time",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(
        "mean step latency (ms, the configuration's own calls after the prefill; same run)"
    )
    ax.set_ylabel("retention (%) vs the full prompt cache")
    ids = sample_ids(results, task)
    ax.set_title(
        f"{results['model']}{'' if task is None else ': ' + task} ({len(ids)} samples, mean prompt "
        f"{mean_prompt(results, ids):.0f})",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
