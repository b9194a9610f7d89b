"""Plots of ``maskkv-compile bench`` results: speed-up and memory against prompt length.

``write_results`` saves a run's rows (the dicts ``run_benchmark`` returns) with the command
that produced them; ``plot_bench`` draws, one panel per setup (model, gen length, steps,
threads: rows from different setups are never mixed on one line):

* ``bench_speedup.png``: speed-up over the eager uncached loop vs prompt length (log x), one
  line per configuration (the CFG rows, whose baseline is the uncached CFG loop, apart);
* ``bench_memory.png``: peak resident memory above the start, and KV bytes held, vs prompt
  length.

Regenerate from saved runs: ``python -m maskkv_compile.bench_plots docs/bench_*.json --out docs``.
matplotlib is needed (in the ``test`` extra); the core never imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from collections import defaultdict


def write_results(path: str, rows: list[dict], command: str) -> None:
    with open(path, "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=1, default=str)


def load_results(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += [dict(row, command=data["command"]) for row in data["rows"]]
    return rows


def _by_setup(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{setup: {run name: rows sorted by prompt}}."""
    grouped: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row.get("setup", "")][row["run"]].append(row)
    for runs in grouped.values():
        for name in runs:
            runs[name].sort(key=lambda r: r["prompt"])
    return grouped


def plot_bench(rows: list[dict], out_dir: str, title: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    grouped = _by_setup(rows)
    setups = sorted(grouped)
    names = sorted({name for runs in grouped.values() for name in runs})
    palette = plt.get_cmap("tab10")
    color = {
        name: palette(i % 10) for i, name in enumerate(names)
    }  # one colour per configuration, every panel
    paths = []
    for kind in ("speedup", "memory"):
        fig, axes = plt.subplots(1, len(setups), figsize=(6.5 * len(setups), 4.8), squeeze=False)
        for ax, setup in zip(axes[0], setups):
            for name, runs in sorted(grouped[setup].items()):
                prompts = [r["prompt"] for r in runs]
                if kind == "speedup":
                    if name == "uncached":
                        continue
                    ax.plot(
                        prompts,
                        [r["speedup"] for r in runs],
                        marker="o",
                        label=name,
                        color=color[name],
                        linestyle="--" if "CFG" in name else "-",
                    )
                else:
                    ax.plot(
                        prompts,
                        [r["peak_rss"] / 2**20 for r in runs],
                        marker="o",
                        label=f"{name}: peak RSS",
                        color=color[name],
                    )
                    kept = [
                        (r["prompt"], r["kept_bytes"] / 2**20) for r in runs if r.get("kept_bytes")
                    ]
                    if kept:
                        ax.plot(
                            *zip(*kept),
                            marker="x",
                            linestyle=":",
                            label=f"{name}: KV held",
                            color=color[name],
                        )
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length (tokens)")
            if kind == "speedup":
                ax.set_yscale("log")
                ax.set_ylabel("speed-up over the uncached loop (x)")
            else:
                ax.set_yscale("log")
                ax.set_ylabel("MiB")
            ax.set_title(textwrap.fill(setup, 70), fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6 if kind == "memory" else 7)
        if title:
            fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"bench_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", nargs="+", help="JSON files written by `maskkv-compile bench --json`"
    )
    parser.add_argument(
        "--out", default=".", help="folder for bench_speedup.png and bench_memory.png"
    )
    args = parser.parse_args(argv)
    for path in plot_bench(load_results(args.results), args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
