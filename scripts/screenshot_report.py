"""Render the `maskkv-compile diff` HTML report in headless Chromium and save screenshots.

    python scripts/screenshot_report.py   # docs/explain_report_tiny-qwen2.png (1280 x 900)
    python scripts/screenshot_report.py --model tiny-llama --width 1280 --height 900 \
        --out /tmp/shots

Needs Debian's ``chromium`` (``apt-get install chromium``) or ``--chromium PATH``; nothing
else beyond the package. For each model: writes the HTML with ``maskkv-compile diff
--html``, then ``chromium --headless --screenshot`` at the given window size (the first
screen a reader sees). Exit status 2 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_chromium(given: str | None) -> str | None:
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def render(model: str, budget: int, html: Path, attn: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "maskkv_compile.cli",
            "diff",
            "--model",
            model,
            "--budget",
            str(budget),
            "--attn",
            attn,
            "--prompt-len",
            "16",
            "--gen-length",
            "8",
            "--html",
            str(html),
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )


def screenshot(chromium: str, html: Path, png: Path, width: int, height: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                html.resolve().as_uri(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot for {html}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", choices=["tiny-llama", "tiny-qwen2"], help="default: tiny-qwen2"
    )
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="eager")
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", help="path to a Chromium/Chrome binary")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print(
            "no chromium found: apt-get install chromium, or pass --chromium PATH", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.model or ["tiny-qwen2"]:
        html = args.out / f"explain_report_{model}.html"
        png = args.out / f"explain_report_{model}.png"
        render(model, args.budget, html, args.attn)
        screenshot(chromium, html, png, args.width, args.height)
        print(f"{png} ({args.width} x {args.height}) from {html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
