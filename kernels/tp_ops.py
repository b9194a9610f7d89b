"""``maskkv::gather_heads``: every rank's heads of a per-head statistic, in global head order.

Under tensor parallelism each rank holds a contiguous block of heads (rank r: heads
r*h .. r*h+h-1). ``gather_heads(x (B, h, ...), group_name, world) -> (B, world*h, ...)``
all-gathers ``x`` over the process group named ``group_name`` (a functional collective,
``_c10d_functional.all_gather_into_tensor`` + ``wait_tensor``, inside the op) and lays the
ranks' blocks side by side along dim 1. Every rank gets the same tensor.

Invariants: the result equals ``torch.cat([x_rank0, x_rank1, ...], dim=1)``; the first call
for a (group, shape) also gathers every rank's shape and raises a clear error if they differ
(ranks holding different head counts), instead of a collective failing or hanging. With
``world == 1`` it returns a copy of ``x``.
"""

from __future__ import annotations

import torch

_checked: set[tuple] = set()  # (group_name, shape) whose shapes were seen equal on every rank


def _all_gather(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    out = torch.ops._c10d_functional.all_gather_into_tensor(
        x.contiguous(), world, group_name
    )  # (world*B, ...)
    return torch.ops._c10d_functional.wait_tensor(out)


def _check_shapes(x: torch.Tensor, group_name: str, world: int) -> None:
    key = (group_name, tuple(x.shape))
    if key in _checked:
        return
    mine = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    every = _all_gather(mine, group_name, world).view(world, -1)
    if not bool((every == mine).all()):
        raise ValueError(
            "tensor-parallel ranks hold different head counts at an attention site (per-rank "
            f"shapes {every.tolist()}): MaskKV needs the heads split evenly; use a tensor-parallel "
            "size that divides the number of query and KV heads"
        )
    _checked.add(key)


@torch.library.custom_op("maskkv::gather_heads", mutates_args=())
def gather_heads(x: torch.Tensor, group_name: str, world: int) -> torch.Tensor:
    if world == 1:
        return x.clone()
    _check_shapes(x, group_name, world)
    gathered = _all_gather(x, group_name, world)  # (world*B, h, ...)
    blocks = gathered.view(world, *x.shape)  # (world, B, h, ...)
    return blocks.movedim(0, 1).reshape(
        x.shape[0], world * x.shape[1], *x.shape[2:]
    )  # (B, world*h, ...)


@gather_heads.register_fake
def _(x, group_name, world):
    return x.new_empty((x.shape[0], world * x.shape[1], *x.shape[2:]))
