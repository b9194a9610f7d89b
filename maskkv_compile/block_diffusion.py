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
  and the new block runs as a step against that.
* **Re-selection** (:class:`BlockReselect`, without ``revote``): where a head had evicted, the
  new block's first step re-selects it: the block's [MASK] queries vote, per (row, KV head),
  over that head's own [kept prefix ; finished block] (softmax over those and the block's own
  keys, as at a prefill), the policy ranks the votes and the head keeps its budget
  (:func:`extend_budgets`); the step then attends to the new selection. No second tier is
  held: the candidates are the hot cache itself, so the kept prefix stays within the budget
  for the whole generation, at the cost of one scoring of the block's mask rows against
  budget + block keys per layer, once per block. An evicted entry never comes back. With
  ``revote`` (``revote.Revote.extend``), the candidates are the whole prefix instead (the
  second tier, on the device or the host), which can bring back what an earlier block
  evicted.

* **Token shift** (Fast-dLLM v2, ``family="dream"``: a position's logits live one row
  earlier): the row before the block predicts its first token and sees nothing after its own
  block, so every step computes it with the block, seeing only itself among the computed rows
  (``Layout.row_end``); the kept prefix is what lies before it, and at an EXTEND it stays out
  of the finished rows that join the prefix (:func:`finished_rows`): the new block computes it.

At a budget of at least the prompt, every step and extend reproduces the uncached model's
logits (``tests/test_block_diffusion.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from maskkv_compile.layout import Layout
from maskkv_compile.session import Feature, LayerCache, Session

if TYPE_CHECKING:
    from maskkv_compile.routing import Plan
    from maskkv_compile.session import Call


def finished_columns(resp_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) which computed rows of the finished block are real -> ((B, C) their columns, real
    ones first in order, (B,) how many are real)."""
    order = torch.argsort((~resp_valid).to(torch.int8), dim=1, stable=True)  # (B, C)
    return order, resp_valid.sum(1)


def finished_rows(old: Layout, new: Layout, response_kv: list) -> tuple[Layout, list]:
    """At an EXTEND: the old window's computed rows that join the prefix (those before the new
    window's first computed row: every one, but a shifted family's last row, which the new
    block computes again) as ``old`` restricted to them, and each layer's (k, v) of them
    ((B, Hkv, C', D))."""
    n = new.first_row - old.first_row  # rows ascend: the first n
    if n == old.rows.numel():
        return old, response_kv
    layout = dataclasses.replace(old, rows=old.rows[:n], resp_valid=old.resp_valid[:, :n])
    return layout, [(k[:, :, :n], v[:, :, :n]) for k, v in response_kv]


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


def block_voters(layout: Layout, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block diffusion: (Rv,) indices into ``layout.rows`` (the block's rows) of the voting
    queries and (B, Rv) per row: the block's rows that hold the mask token (``masked`` (B, S)),
    for a shifted family the rows before them; every real row of the block in a row with no mask
    left."""
    seq, shift = masked.shape[1], layout.block_shift
    read = layout.rows + shift  # (C,) the position each row predicts
    mine = masked[:, read.clamp(max=seq - 1)] & (read < seq) & layout.resp_valid  # (B, C)
    block = layout.resp_valid & (layout.rows >= layout.block_start)  # the block's own rows
    mine = torch.where(mine.any(1, keepdim=True), mine, block)
    return torch.arange(layout.rows.numel(), device=layout.rows.device), mine


def extend_budgets(
    kept_len: torch.Tensor, whole: torch.Tensor, grow: torch.Tensor, budget: int
) -> torch.Tensor:
    """Each (row, KV head)'s budget once a finished block joins the prefix: ``kept_len``
    (B, Hkv) as the prefill (or the last re-selection) left it, ``whole`` (B,) the prefix
    each row had, ``grow`` (B,) the finished block's real rows. A head that had evicted keeps
    its budget; a head that held its whole prefix holds the block too, up to the larger of
    what it held and the model-wide ``budget`` (a short prompt is kept whole, but the
    generation does not grow the cache past the budget)."""
    full = kept_len == whole[:, None]  # (B, Hkv): nothing was evicted
    cap = torch.clamp(kept_len, min=budget)
    return torch.where(full, torch.minimum(kept_len + grow[:, None], cap), kept_len)


@dataclass
class Pending:
    """A re-selection the next step runs over the session's layers (the kept prefix with the
    finished block appended): each head's budget."""

    budgets: list[torch.Tensor]  # per layer (B, Hkv)
    widths: list[int]  # per layer the largest budget: the new hot cache's width


class BlockReselect(Feature):
    """Block diffusion without ``revote``: at an EXTEND the runtime appends the finished block to
    each head's kept entries, and where any head must stay within its budget the new block's
    first step runs the re-vote graph over those per-head candidates (the module docstring)."""

    name = "block_reselect"

    def __init__(self, budget: int):
        self.budget = budget

    def start(self, session: Session) -> None:
        session.state[self.name] = None  # a Pending between an EXTEND and its step
        return None

    def extend(self, session: Session, finished: Layout, response_kv: list) -> bool:
        """Each head's budget once the finished block joins it; the runtime appends the block
        (returns False)."""
        whole = finished.prompt_valid.sum(1)  # (B,)
        grow = finished.resp_valid.sum(1)  # (B,) real rows of the finished block
        budgets = [
            extend_budgets(cache.kept_len, whole, grow, self.budget) for cache in session.layers
        ]
        wanted = torch.stack(budgets)  # (L, B, Hkv)
        held = torch.stack([cache.kept_len for cache in session.layers]) + grow[:, None]
        # one read: does any head evict, and each layer's largest budget
        evicts = (wanted < held).any().view(1).to(wanted.dtype)
        evicts, *widths = torch.cat([evicts, wanted.flatten(1).amax(1)]).tolist()
        if evicts:
            session.state[self.name] = Pending(budgets, widths)
        return False

    def step_graph(self, session: Session, plan: "Plan", call: "Call", inputs: dict):
        pending: Optional[Pending] = session.state[self.name]
        if pending is None:
            return None
        voter_idx, voter_valid = block_voters(session.layout, session.masked)
        inputs.update({"revoter_idx": voter_idx, "revoter_valid": voter_valid})
        for layer, (cache, budget, kmax) in enumerate(
            zip(session.layers, pending.budgets, pending.widths)
        ):
            width = cache.kept_k.shape[2]
            inputs.update(
                {
                    f"prompt_k_{layer}": cache.kept_k,
                    f"prompt_v_{layer}": cache.kept_v,
                    f"prompt_pos_{layer}": cache.kept_pos,
                    f"prompt_valid_{layer}": torch.arange(width, device=cache.kept_len.device)
                    < cache.kept_len[..., None],  # (B, Hkv, P)
                    # read for its width only: the largest budget
                    f"kept_k_{layer}": cache.kept_k[:, :, :kmax],
                    f"kept_len_{layer}": budget,
                }
            )
        return "reselect"

    def step_outputs(self, session: Session, plan: "Plan", named: dict) -> None:
        if session.state[self.name] is None:
            return
        for layer, (k, v, length, pos) in enumerate(named["reselected"]):
            session.layers[layer] = dataclasses.replace(
                session.layers[layer], kept_k=k, kept_v=v, kept_len=length, kept_pos=pos
            )
        session.state[self.name] = None
