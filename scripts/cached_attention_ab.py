"""The CPU path of ``maskkv::cached_attention`` side by side, in one process: one SDPA call over
the concatenation [kept K/V ; computed K/V] against two calls merged by their log-sum-exps
(``kernels/cached_attention.py``), which never copies the kept K/V.

1. The op alone, per kept length (the evidence for ``TWO_SEGMENTS_FROM``): a step of
   ``bench-block``'s shapes (32 rows, 4 query heads on one KV head of 128), of a small block
   (8 rows), and of a batch of 2 with GQA 4:1 on heads of 64.
2. The whole block loop of ``bench-block`` (LLaDA2's loop, gen 256, blocks of 32, 8 steps a
   block) at each ``--prompt-lens``: the exact prefix cache and MaskKV 256, each path timed
   ``--repeats`` times taking turns (medians), and whether the tokens are the same.

Usage: ``python scripts/cached_attention_ab.py [--prompt-lens 4096 8192] [--repeats 3]
[--backend inductor|eager]``.
"""

import time

import torch
from block_loop_ab import arguments, loop_table
from maskkv_compile.kernels import cached_attention as op

CONCAT = 1 << 62  # a TWO_SEGMENTS_FROM that never splits
SPLIT = op.TWO_SEGMENTS_FROM  # as shipped


def _op_table() -> None:
    def clock(fn, n=200):
        fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n * 1e6

    print("op alone, microseconds a call: kept | concatenation | two segments")
    for batch, heads, kv_heads, rows, dim in [
        (1, 4, 1, 32, 128),
        (1, 4, 1, 8, 128),
        (2, 8, 2, 16, 64),
    ]:
        for kept in [64, 256, 512, 1024, 2048, 4096, 8192]:
            q = torch.randn(batch, rows, heads, dim).transpose(1, 2)  # the graphs' layout
            k, v = torch.randn(2, batch, kv_heads, rows, dim)
            kept_k, kept_v = torch.randn(2, batch, kv_heads, kept, dim)
            args = (
                q, k, v, kept_k, kept_v,
                torch.full((batch, kv_heads), kept),
                torch.ones(batch, rows, dtype=torch.bool),
                torch.zeros(0, dtype=torch.long),
                dim**-0.5,
            )  # fmt: skip
            one = clock(lambda: op.cached_attention_reference(*args).contiguous())
            two = clock(lambda: op._two_segments_cpu(*args))
            shape = f"B{batch} H{heads}/{kv_heads} R{rows} D{dim}"
            print(f"  {shape} | {kept:5d} | {one:6.0f} | {two:6.0f}")


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    _op_table()
    print("the block loop (medians):")
    paths = [("concatenation", CONCAT), ("two segments", SPLIT)]
    switches = [(name, lambda t=t: setattr(op, "TWO_SEGMENTS_FROM", t)) for name, t in paths]
    loop_table(args.prompt_lens, args.repeats, args.backend, switches)


if __name__ == "__main__":
    main()
