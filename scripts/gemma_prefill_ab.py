"""A/B of DiffusionGemma's prefill under ``generate``, side by side in one process.

``new``: the optimized model as it ships (the encoder calls stop once the last layer has written
the cache; sliding-window bands of a quarter of the window). ``old``: the same model with both
turned off (the last layer runs whole; bands of ``QUERY_CHUNK`` queries), as before they
landed. Each run is ``generate`` with one canvas and one denoising step, so the prefill is most
of it; the model and prompt are ``bench-gemma``'s at 8k. Runs alternate, three of each; the
median ratio is printed. Usage: ``python scripts/gemma_prefill_ab.py [prompt_len]``.
"""

import contextlib
import sys
import time
import warnings

import torch

import maskkv_compile
from maskkv_compile.bench_gemma import build_model
from maskkv_compile.diffusion_gemma import attention


class _NeverStop:
    """Stands in for ``attention.CACHE_ONLY``: the attention never finds its module marked as
    the encoder's last one to run, so it never stops the call."""

    def set(self, value):
        return None

    def reset(self, token):
        pass

    def get(self):
        return None


@contextlib.contextmanager
def _before():
    saved = attention.CACHE_ONLY, attention.query_chunk
    attention.CACHE_ONLY = _NeverStop()
    attention.query_chunk = lambda module: attention.QUERY_CHUNK
    try:
        yield
    finally:
        attention.CACHE_ONLY, attention.query_chunk = saved


def main(prompt_len: int = 8192) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model = build_model(6, 512, 4096, 64, prompt_len + 128)
    prompt = torch.randint(3, 4093, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    net = maskkv_compile.optimize(model, budget=64)
    seconds = {"new": [], "old": []}
    for _ in range(3):
        for name in ("new", "old"):
            with _before() if name == "old" else contextlib.nullcontext():
                torch.manual_seed(0)
                start = time.perf_counter()
                net.generate(prompt, max_new_tokens=64, max_denoising_steps=1)
                seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.2f} s", flush=True)
    new, old = (sorted(seconds[k])[1] for k in ("new", "old"))
    print(f"median: old {old:.2f} s, new {new:.2f} s, {old / new:.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
