"""Rewrite README.md's quality summary from docs/quality_*.json (``--check``: only compare).

python scripts/update_readme_quality.py           # after a new eval run
python scripts/update_readme_quality.py --check   # exit 1 when README is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from maskkv_compile.evaluation.readme_summary import rewrite

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = rewrite(old, ROOT / "docs")
    if args.check:
        if new != old:
            print("README.md's quality summary is out of date: run this script without --check")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
