"""Block diffusion (LLaDA2, SDAR, Fast-dLLM v2): the prefix cache and how a window grows.

Block-diffusion loops call the model on a growing window [prompt ; finished blocks ; current
block] with a block-causal mask (``masks.read_mask`` reads its block ends): a query sees its own
block both ways and every earlier block, never a later one. So a prefix row never attends to
the current block, and its K/V do not change while the block is refined: a prefix cache is
exact. The runtime treats such a call as one more layout (``layout.block_layout``):

* **Prefill** (a new window): the whole window, block-causal (``maskkv::attention``'s
  ``key_end``); the current block's mask queries vote over the prefix per KV head and the
  policy keeps the budget, as for a LLaDA prompt.
* **Step** (the same window again, same prefix): the block's rows against [kept prefix ;
  block].
* **Extend** (the window grew by one block, ``routing.Transition.EXTEND``): the finished block's
  rows are computed once with their final tokens against [kept prefix ; finished block] (what
  the uncached model computes for them at the new window's first call: they see nothing
  later), their K/V join the kept prefix of every (row, KV head) whole (:func:`append_block`),
  and the new block runs as a step against that. The kept set grows by the generated blocks
  and never re-reads the prompt: the prompt's entries stay the ones the first block's votes
  chose under the budget, and the generation is kept whole, as MaskKV keeps the response of a
  LLaDA prompt. Re-selecting over [kept prefix ; finished block] with the new block's votes
  is not done yet (see the README's "Block diffusion").

At a budget of at least the prompt, every step and extend reproduces the uncached model's
logits (``tests/test_block_diffusion.py``).
"""

from __future__ import annotations

import dataclasses

import torch

from maskkv_compile.session import LayerCache


def finished_columns(resp_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) which computed rows of the finished block are real -> ((B, C) their columns, real
    ones first in order, (B,) how many are real)."""
    order = torch.argsort((~resp_valid).to(torch.int8), dim=1, stable=True)  # (B, C)
    return order, resp_valid.sum(1)


def append_block(
    cache: LayerCache,
    k: torch.Tensor,
    v: torch.Tensor,
    columns: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
) -> LayerCache:
    """``cache`` with the finished block's K/V (``k``, ``v``: (B, Hkv, C, D) of its computed rows)
    appended after each (row, KV head)'s kept entries: the real ones (``columns`` (B, C), the
    first ``counts`` (B,) of each row) in order; what lies past a head's new length is never
    read. ``positions`` (C,): the absolute position of each computed row."""
    batch, heads, width = cache.kept_k.shape[:3]
    c = columns.shape[1]
    dest = (cache.kept_len[..., None] + torch.arange(c, device=columns.device))[
        ..., None
    ]  # (B, Hkv, C, 1)

    def grow(kept: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        dim = fresh.shape[-1]
        picked = fresh.gather(2, columns[:, None, :, None].expand(batch, heads, c, dim))
        out = torch.cat([kept, kept.new_zeros((batch, heads, c, dim))], dim=2)
        return out.scatter_(2, dest.expand(-1, -1, -1, dim), picked.to(kept.dtype))

    new_pos = positions[columns][:, None, :].expand(batch, heads, c)  # (B, Hkv, C)
    pos = torch.cat([cache.kept_pos, cache.kept_pos.new_full((batch, heads, c), -1)], dim=2)
    pos = pos.scatter_(2, dest[..., 0], new_pos)
    length = cache.kept_len + counts[:, None].to(cache.kept_len.dtype)
    # entries past each head's new length are garbage from the scatter: mark them as padding
    beyond = torch.arange(width + c, device=pos.device) >= length[..., None]
    return dataclasses.replace(
        cache,
        kept_k=grow(cache.kept_k, k),
        kept_v=grow(cache.kept_v, v),
        kept_len=length,
        kept_pos=pos.masked_fill(beyond, -1),
    )
