"""The drop-in call's logits buffers of two revisions side by side, in one process: the module
``maskkv_compile/logits_buffers.py`` as it is at ``--old-rev`` (read with ``git show``) against
the working tree's, on ``bench-block``'s loop (LLaDA2's loop, gen 256, blocks of 32, 8 steps a
block), the exact prefix cache and MaskKV 256, the paths and runs taking turns (medians).

The default old revision is the one before a grown window stopped zeroing the whole buffer
(it clears the rows last written instead).

Usage: ``python scripts/logits_buffers_ab.py [--old-rev 852c831] [--prompt-lens 8192]
[--repeats 5] [--backend inductor|eager]``.
"""

import importlib.util
import subprocess
import tempfile
from pathlib import Path

from block_loop_ab import arguments, loop_table

import maskkv_compile.runtime as runtime
from maskkv_compile.logits_buffers import LogitsBuffers

ROOT = Path(__file__).resolve().parent.parent


def _old_module(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:maskkv_compile/logits_buffers.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_logits_buffers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_logits_buffers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    args = arguments(__doc__.splitlines()[0], old_rev="852c831")
    rev = args.old_rev
    old = _old_module(rev).LogitsBuffers
    print(f"the block loop (medians), logits buffers at {rev} vs the working tree:")
    paths = [(f"at {rev}", old), ("now", LogitsBuffers)]
    switches = [
        (name, lambda cls=cls: setattr(runtime, "LogitsBuffers", cls)) for name, cls in paths
    ]
    loop_table(args.prompt_lens, args.repeats, args.backend, switches)


if __name__ == "__main__":
    main()
