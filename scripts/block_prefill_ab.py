"""The CPU prefill of a long block-causal window side by side, in one process: each query chunk
as one masked SDPA call over the keys before its last block end, against two segments merged
by their log-sum-exps (``kernels/attention.py``: the keys every row of the chunk sees, through
the flash kernel without a mask, and the rest, masked).

0. One chunk of 512 queries per number of keys they all see (the evidence for
   ``SEGMENTS_FROM``, from which a chunk goes as two segments).
1. The op alone (``maskkv::attention`` with block ends, no padding), per window: ``bench-block``'s
   attention shapes (4 query heads on one KV head of 128, float32), blocks of 32. And a
   left-padded batch of 2, which took the whole masked (S, S) attention before it was chunked.
2. The whole block loop of ``bench-block`` (LLaDA2's loop, gen 256, blocks of 32, 8 steps a
   block) at each ``--prompt-lens``: the exact prefix cache and MaskKV 256, each path timed
   ``--repeats`` times taking turns (medians), and whether the tokens are the same. Each
   window's first call is a prefill of the whole window.

Usage: ``python scripts/block_prefill_ab.py [--prompt-lens 4096 8192] [--repeats 3]
[--backend inductor|eager]``.
"""

import statistics
import time

import torch
from block_loop_ab import arguments, loop_table
from maskkv_compile.kernels import attention as attention_kernels

SEGMENTS = attention_kernels._chunk_segments  # as shipped


def _one_call(q, k, v, scale, ends, lo, hi, key_valid=None):
    """A chunk as one masked SDPA call over keys [0, hi) (the path before the segments)."""
    padding = None if key_valid is None else key_valid[:, :hi]
    mask = attention_kernels.attention_mask(padding, ends, hi)
    return attention_kernels.attention_reference(q, k[:, :, :hi], v[:, :, :hi], scale, None, mask)


PATHS = (("one call", _one_call), ("two segments", SEGMENTS))


def _clock(fn, runs: int) -> float:
    """Milliseconds a call, after one call to warm up."""
    fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e3


def _chunk_table() -> None:
    """One chunk of 512 queries whose first block ends at ``lo``: the evidence for
    ``SEGMENTS_FROM`` (the paths take turns, medians of 15 rounds)."""
    print("one chunk of 512 queries, milliseconds: keys all see | one masked call | two segments")
    for lo in [32, 256, 512, 1024, 2048, 4096]:
        q = torch.randn(1, 512, 4, 128).transpose(1, 2)
        k, v = torch.randn(2, 1, 1, lo + 512, 128)
        ends = (torch.arange(512) // 32 + 1) * 32 + lo - 32  # blocks of 32, the first ends at lo
        args = (q, k, v, 128**-0.5, ends, lo, int(ends.max()))
        rounds = [[_clock(lambda: fn(*args), 5) for _, fn in PATHS] for _ in range(15)]
        one, two = (statistics.median(r[i] for r in rounds) for i in range(2))
        print(f"  {lo:5d} | {one:6.2f} | {two:6.2f} | {one / two:.2f}x")


def _op_table() -> None:
    print("op alone, milliseconds a call: window | one masked call | two segments")
    for window in [1024, 2048, 4096, 8192, 16384]:
        q = torch.randn(1, window, 4, 128).transpose(1, 2)  # the graphs' layout
        k, v = torch.randn(2, 1, 1, window, 128)
        key_end = (torch.arange(window) // 32 + 1) * 32
        times = []
        for _, chunk_fn in PATHS:
            attention_kernels._chunk_segments = chunk_fn
            call = lambda: torch.ops.maskkv.attention(q, k, v, 128**-0.5, None, None, key_end)  # noqa: E731
            call()
            runs = max(3, 8192 // window)
            start = time.perf_counter()
            for _ in range(runs):
                call()
            times.append((time.perf_counter() - start) / runs * 1e3)
        attention_kernels._chunk_segments = SEGMENTS
        print(f"  {window:6d} | {times[0]:7.1f} | {times[1]:7.1f} | {times[0] / times[1]:.2f}x")
    print(
        "a left-padded batch of 2 (row 0 by 100), milliseconds a call: window | the whole "
        "masked (S, S) attention (padded windows before the chunks) | chunks, two segments"
    )
    for window in [2048, 8192]:
        q = torch.randn(2, window, 4, 128).transpose(1, 2)
        k, v = torch.randn(2, 2, 1, window, 128)
        key_end = (torch.arange(window) // 32 + 1) * 32
        key_valid = torch.ones(2, window, dtype=torch.bool)
        key_valid[0, :100] = False
        mask = attention_kernels.attention_mask(key_valid, key_end, window)
        calls = (
            lambda: attention_kernels.attention_reference(q, k, v, 128**-0.5, None, mask),
            lambda: torch.ops.maskkv.attention(q, k, v, 128**-0.5, None, key_valid, key_end),
        )
        times = []
        for call in calls:
            call()
            start = time.perf_counter()
            for _ in range(3):
                call()
            times.append((time.perf_counter() - start) / 3 * 1e3)
        print(f"  {window:6d} | {times[0]:7.1f} | {times[1]:7.1f} | {times[0] / times[1]:.2f}x")


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    _chunk_table()
    _op_table()
    print("the block loop (medians):")
    switches = [
        (name, lambda fn=fn: setattr(attention_kernels, "_chunk_segments", fn))
        for name, fn in PATHS
    ]
    loop_table(args.prompt_lens, args.repeats, args.backend, switches)


if __name__ == "__main__":
    main()
