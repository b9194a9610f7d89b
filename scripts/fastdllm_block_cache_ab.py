"""What Fast-dLLM v2's block cache does for a MaskKV model, side by side in one process: the same
optimized model (budget 256, ``bench_cached_loop.py``'s shapes) runs ``batch_sample`` with and
without ``use_block_cache``, alternating, three runs each after a warm-up. The two loops make
other calls (a small-block call commits other tokens than a whole-block one), so each run's
transitions and seconds per call are printed with the ratio of median seconds. Usage:
``python scripts/fastdllm_block_cache_ab.py [prompt_len]``.
"""

import statistics
import sys
import time
import warnings

import torch

import maskkv_compile
from maskkv_compile.bench_block import MASK_ID, build_model
from maskkv_compile.fastdllm_standin import fastdllm_cached_generate, tiny_fastdllm


def main(prompt_len: int = 4096) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    model = build_model(2, 512, 1024, prompt_len + 256 + 64, factory=tiny_fastdllm)
    prompt = torch.randint(0, 1023, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt[prompt == MASK_ID] = 0
    kwargs = dict(block_size=32, max_new_tokens=256, small_block_size=8, mask_id=MASK_ID)
    net = maskkv_compile.optimize(model, budget=256, family="dream")
    seconds = {False: [], True: []}
    transitions = {}
    for rounds in (1, 3):  # a warm-up round, then the timed ones
        for _ in range(rounds):
            for block_cache in (False, True):
                net.reset()
                start = time.perf_counter()
                fastdllm_cached_generate(net, prompt, use_block_cache=block_cache, **kwargs)
                if rounds == 3:
                    seconds[block_cache].append(time.perf_counter() - start)
                transitions[block_cache] = dict(net.cache_stats()["transitions"])
    for block_cache, times in seconds.items():
        calls = sum(transitions[block_cache].values())
        per_call = 1e3 * statistics.median(times) / calls
        print(
            f"use_block_cache={block_cache}: " + " / ".join(f"{t:.2f}" for t in times) + " s, "
            f"{calls} calls ({per_call:.1f} ms a call) {transitions[block_cache]}"
        )
    ratio = statistics.median(seconds[False]) / statistics.median(seconds[True])
    print(f"without / with: {ratio:.2f}x")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
