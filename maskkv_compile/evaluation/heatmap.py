"""Needle depth x context length: where in a long prompt retrieval survives eviction.

For every haystack length and needle depth, ``samples`` needle sequences
(:func:`maskkv_compile.evaluation.needles.needle_task`, needle 0 at that depth, ``needles - 1``
distractors elsewhere) are filled by the suite's greedy loop through each configuration: the
uncached model, the full prompt cache, and ``policy@budget`` for each policy. A cell is the
exact-match rate of the needle's value. Deterministic (fixed seeds); no model state is shared
between configurations.

``heatmap(...)`` returns a JSON-able dict; ``plot_heatmap`` draws one panel per configuration.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import torch

from maskkv_compile.evaluation import needles as nt
from maskkv_compile.evaluation.models import Sample, needle_sample
from maskkv_compile.evaluation.suite import FULL_BUDGET, infill, optimized

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LENGTHS = (32, 64, 128, 256)


def needle_samples(
    length: int, depth: float, samples: int, needles: int, seed: int = 0
) -> list[Sample]:
    gen = torch.Generator().manual_seed(
        9_000_000 + 10_000 * seed + 10 * length + round(100 * depth)
    )
    return [
        needle_sample(
            f"T{length}/d{depth:g}/{i}",
            "heatmap",
            nt.needle_task(gen, length, needles, depth=depth),
        )
        for i in range(samples)
    ]


def heatmap(
    model: torch.nn.Module,
    policies: Sequence[str] = ("maskkv", "snapkv", "streaming"),
    budget: int = 8,
    *,
    lengths: Sequence[int] = LENGTHS,
    depths: Sequence[float] = DEPTHS,
    samples: int = 8,
    needles: int = 2,
    profile=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Exact match per (configuration, length, depth); ``profile`` is the layer profile for the
    policies that need one (``maskkv``, ``squeezeattention``)."""
    from maskkv_compile.policies import get_policy

    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    for policy in policies:  # fail before anything runs
        if get_policy(policy).needs_profile and profile is None:
            raise ValueError(
                f"policy {policy!r} needs a layer profile: pass "
                "profile=maskkv_compile.calibrate(...)"
            )
    configs = {"uncached": None, "full cache": ("mask_voting_uniform", FULL_BUDGET)}
    configs.update({f"{p}@{budget}": (p, budget) for p in policies})
    grid = {
        (length, depth): needle_samples(length, depth, samples, needles, seed)
        for length in lengths
        for depth in depths
    }
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional

        def tqdm(items, **_):
            return items

    out = {
        "lengths": list(lengths),
        "depths": list(depths),
        "samples": samples,
        "needles": needles,
        "budget": budget,
        "exact_match": {},
    }
    for label, spec in tqdm(list(configs.items()), desc="needle heatmap", disable=not progress):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = (
                model
                if spec is None
                else optimized(model, nt.MASK, *spec, profile=profile, seed=seed)
            )
            rows = []
            for length in lengths:
                row = []
                for depth in depths:
                    hits = 0
                    for sample in grid[length, depth]:
                        if spec is not None:
                            net.reset()
                        hits += infill(net, sample, nt.MASK)[0] == sample.truth()
                    row.append(hits / samples)
                rows.append(row)
        out["exact_match"][label] = rows  # [length][depth]
        del net
    return out


def plot_heatmap(result: dict, png: Union[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["exact_match"])
    fig, axes = plt.subplots(1, len(labels), figsize=(2.9 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        grid = result["exact_match"][label]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
        ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
        ax.set_xlabel("needle depth")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("haystack length")
    fig.suptitle(
        f"needle retrieval, exact match ({result['needles']} needles, "
        f"{result['samples']} per cell)",
        fontsize=10,
    )
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
