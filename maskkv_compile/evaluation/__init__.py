"""Quality suite: how much of the full-cache quality MaskKV and its baselines keep on real
pretrained masked LMs, per policy and budget (``maskkv-compile eval``; see docs/quality.md).

    from maskkv_compile.evaluation import run_suite, table, plot
    suite = run_suite("antiberty", budgets=[4, 8, 16, "full"], samples=8, out="eval-out")
    print(table(suite.results, "retention"))
"""

from maskkv_compile.evaluation.models import (
    MODELS,
    TASKS,
    Bundle,
    ModelUnavailable,
    Sample,
    load_bundle,
)
from maskkv_compile.evaluation.outputs import write_reports
from maskkv_compile.evaluation.report import aggregate, markdown, plot, table, targets
from maskkv_compile.evaluation.suite import (
    FULL,
    FULL_BUDGET,
    Suite,
    configurations,
    infill,
    run_suite,
)

__all__ = [
    "FULL",
    "FULL_BUDGET",
    "MODELS",
    "TASKS",
    "Bundle",
    "ModelUnavailable",
    "Sample",
    "Suite",
    "aggregate",
    "configurations",
    "infill",
    "load_bundle",
    "markdown",
    "plot",
    "run_suite",
    "table",
    "targets",
    "write_reports",
]
