"""``maskkv::select_kv``: budgeted top-k eviction into a flat per-layer cache of static size.

Inputs:  k, v (B, Hkv, S, D); votes (B, Hkv, P) scores, -inf where a row may not keep an
         entry (padding, or a column that is not that row's prompt); prompt_idx (P,)
         positions of the prompt along S; budgets (B, Hkv) int64, the number of prompt
         entries each row's KV head keeps; slots (int) a bound on any row's total budget
         (EvictKVPass: the layer's slot total, or ``Hkv * budget`` for a prompt kept whole).
Outputs: kept_k, kept_v (B, T, D), T = min(Hkv * P, slots): every head's kept entries one
         after the other, head 0 first
         kept_len (B, Hkv) int64 = min(budgets[b, h], P_b), the number of head h's entries,
         P_b the row's eligible (finite-score) entries; head h starts at the sum of the
         lengths of the heads before it
         kept_pos (B, T) int64 absolute positions kept, -1 in the padding after the last head

Invariants: rows never share anything (a row's kept set is what it would be alone); the
kept entries of a head are its top-``kept_len[h]`` votes, ties broken towards the earlier
prompt position; within a head they are stored in ascending position order; padding holds
zeros in K/V and -1 in kept_pos. A budget >= P keeps every prompt entry, in order. The
output size depends on the shapes alone and the op reads nothing on the host, so a prefill
graph can run without a synchronisation per layer. ``pad_kept`` turns the flat layout into
the (B, Hkv, Kmax, D) padded one the step graph reads, given Kmax (the runtime reads every
layer's kept lengths once, after the prefill).

The flat layout holds exactly the kept entries; padding each head to a static maximum instead
would take up to Hkv x the memory, since one head may take most of a layer's budget.

Torch on every device; no Triton kernel. Measured (median of 30, B=1 Hkv=8 D=128 fp32,
budget 256, one core, torch 2.13; `kept_columns` is the top-k threshold that replaced a
stable sort of all P votes, which alone took 1.8 / 19.6 / 49.5 ms at these lengths; the
whole op took 29.4 / 45.8 / 66.0 ms then, on a shared core; before the flat layout, with
a top-k as wide as the largest head rather than the static bound):

    P       whole op   kept_columns
    4096    2.0 ms     0.6 ms
    16384   3.7 ms     1.8 ms
    32768   5.7 ms     3.0 ms

The rest is the gather of K and V. A Triton gather can only replace that, and on a GPU it
moves 2 x Hkv x Kmax x D elements (1 MB in bf16 at budget 256): a few microseconds, once
per layer per prompt, against a prefill that runs the whole model. A candidate Triton
gather (``_gather_kv_kernel`` in ``scripts/gpu_check.py``) matches torch exactly under
TRITON_INTERPRET=1, but its speed could not be measured here (no GPU);
``scripts/gpu_check.py`` prints torch vs Triton for the gather at P = 4k..32k. Until a run
shows Triton faster, torch stays.
"""

from __future__ import annotations

import torch


def select_kv_reference(
    votes: torch.Tensor, budgets: torch.Tensor, recent: int = 0
) -> list[list[torch.Tensor]]:
    """Oracle: for each (batch, KV head), the sorted prompt-local indices kept (-inf never):
    the last ``recent`` eligible columns first, nearest first, then the best votes."""
    out = []
    for b in range(votes.shape[0]):
        row = []
        for h in range(votes.shape[1]):
            eligible = [j for j in range(votes.shape[2]) if float(votes[b, h, j]) != float("-inf")]
            n = min(int(budgets[b, h]), len(eligible))
            near = eligible[::-1][:recent]
            # stable descending sort: equal votes keep the earlier position first
            order = near + sorted(
                (j for j in eligible if j not in near), key=lambda j: (-float(votes[b, h, j]), j)
            )
            row.append(torch.tensor(sorted(order[:n]), dtype=torch.long))
        out.append(row)
    return out


def kept_mask(scores: torch.Tensor, kept_len: torch.Tensor, width: int) -> torch.Tensor:
    """(B, Hkv, P) bool: each (row, head)'s top-``kept_len`` columns of ``scores``, ties to the
    earlier column. ``kept_len`` must not exceed a row's finite scores nor ``width``.

    No sort over P: a top-``width`` gives each head's threshold t (its kept_len-th largest
    score); every column above t is kept, and of the columns equal to t the earliest ones that
    fill the budget (a stable descending sort's choice).
    """
    width = min(width, scores.shape[-1])
    if width == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = torch.topk(scores, width, dim=-1).values  # (B, Hkv, width), descending
    last = (kept_len.clamp(min=1, max=width) - 1)[..., None]  # (B, Hkv, 1)
    threshold = top.gather(-1, last)  # (B, Hkv, 1)
    above = scores > threshold  # (B, Hkv, P)
    tied = scores == threshold
    room = kept_len[..., None] - above.sum(-1, keepdim=True)  # how many tied columns still fit
    return above | (tied & (tied.cumsum(-1) <= room))


def kept_columns(
    scores: torch.Tensor, kept_len: torch.Tensor, kmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, head)'s kept columns (``kept_mask``) in column order, padded to ``kmax``:
    (columns (B, Hkv, Kmax), 0 in the padding, and valid (B, Hkv, Kmax), False in the padding).
    The kept columns are numbered in column order by a cumulative sum and scattered into their
    slots."""
    batch, kv_heads, num = scores.shape
    valid = torch.arange(kmax, device=scores.device) < kept_len[..., None]  # (B, Hkv, Kmax)
    columns = torch.zeros((batch, kv_heads, kmax + 1), dtype=torch.long, device=scores.device)
    if kmax == 0 or num == 0:
        return columns[..., :kmax], valid
    keep = kept_mask(scores, kept_len, kmax)  # (B, Hkv, P), kept_len True per head
    slot = torch.where(keep, keep.cumsum(-1) - 1, kmax)  # the column's place; kmax = dropped
    columns.scatter_(-1, slot, torch.arange(num, device=scores.device).expand(batch, kv_heads, num))
    return columns[..., :kmax], valid  # slots past kept_len were never written: still 0


def gather_kept(
    k: torch.Tensor, v: torch.Tensor, at: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Hkv, S, D) at rows ``at`` (B, Hkv, Kmax); zeros where ``valid`` is False.
    (Advanced indexing, about 1.5x faster here than ``gather`` with an index expanded over D.)"""
    rows = torch.arange(k.shape[0], device=k.device)[:, None, None]  # (B, 1, 1)
    heads = torch.arange(k.shape[1], device=k.device)[None, :, None]  # (1, Hkv, 1)
    keep = valid[..., None]  # (B, Hkv, Kmax, 1)
    return torch.where(keep, k[rows, heads, at], 0), torch.where(keep, v[rows, heads, at], 0)


def flat_size(kv_heads: int, prompt_len, slots: int):
    """T, the flat cache's length: ``min(Hkv * P, slots)`` (``prompt_len`` may be symbolic)."""
    return torch.sym_min(kv_heads * prompt_len, slots)


def head_starts(kept_len: torch.Tensor) -> torch.Tensor:
    """(B, Hkv): where each head's entries start in the flat cache."""
    return kept_len.cumsum(-1) - kept_len


@torch.library.custom_op("maskkv::select_kv", mutates_args=())
def select_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    votes: torch.Tensor,
    prompt_idx: torch.Tensor,
    budgets: torch.Tensor,
    slots: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, kv_heads, num = votes.shape
    size = flat_size(kv_heads, num, slots)
    eligible = torch.isfinite(votes).sum(-1)  # (B, Hkv): -inf marks what a row may not keep
    kept_len = torch.minimum(budgets.to(torch.long).clamp(min=0), eligible)  # (B, Hkv)
    keep = kept_mask(votes, kept_len, min(num, slots))  # (B, Hkv, P)
    # (B, Hkv, P) -> (B, Hkv*P): each kept column's flat slot, ``size`` for the dropped ones
    slot = torch.where(keep, head_starts(kept_len)[..., None] + keep.cumsum(-1) - 1, size).flatten(
        1
    )
    column = torch.arange(num, device=votes.device).expand(batch, kv_heads, num).flatten(1)
    head = (
        torch.arange(kv_heads, device=votes.device)[:, None].expand(batch, kv_heads, num).flatten(1)
    )
    taken = votes.new_zeros((batch, size + 1), dtype=torch.long)
    columns = taken.scatter(1, slot, column)[:, :size]  # (B, T)
    heads = taken.scatter(1, slot, head)[:, :size]  # (B, T)
    valid = torch.arange(size, device=votes.device) < kept_len.sum(-1, keepdim=True)  # (B, T)
    at = prompt_idx[columns]  # (B, T) absolute positions
    rows = torch.arange(batch, device=k.device)[:, None]  # (B, 1)
    keep_row = valid[..., None]  # (B, T, 1)
    kept_k = torch.where(keep_row, k[rows, heads, at], 0)
    kept_v = torch.where(keep_row, v[rows, heads, at], 0)
    return kept_k, kept_v, kept_len, torch.where(valid, at, -1)


@select_kv.register_fake
def _(k, v, votes, prompt_idx, budgets, slots):
    batch, kv_heads, num = votes.shape
    size = flat_size(kv_heads, num, slots)
    return (
        k.new_empty((batch, size, k.shape[-1])),
        v.new_empty((batch, size, v.shape[-1])),
        budgets.new_empty((batch, kv_heads), dtype=torch.long),
        budgets.new_empty((batch, size), dtype=torch.long),
    )


def pad_kept(
    kept_k: torch.Tensor,
    kept_v: torch.Tensor,
    kept_len: torch.Tensor,
    kept_pos: torch.Tensor,
    kmax: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``select_kv``'s flat layout -> each head padded to ``kmax`` (>= every kept_len):
    kept_k, kept_v (B, Hkv, Kmax, D), zeros in the padding, and kept_pos (B, Hkv, Kmax), -1
    there."""
    valid = torch.arange(kmax, device=kept_len.device) < kept_len[..., None]  # (B, Hkv, Kmax)
    at = torch.where(
        valid, head_starts(kept_len)[..., None] + torch.arange(kmax, device=kept_len.device), 0
    )
    rows = torch.arange(kept_len.shape[0], device=kept_len.device)[:, None, None]  # (B, 1, 1)
    keep = valid[..., None]
    return (
        torch.where(keep, kept_k[rows, at], 0),
        torch.where(keep, kept_v[rows, at], 0),
        torch.where(valid, kept_pos[rows, at], -1),
    )
