"""``maskkv::select_kv``: budgeted top-k eviction into a padded per-layer cache.

Inputs:  k, v (B, Hkv, S, D); votes (B, Hkv, P) scores, -inf where a row may not keep an
         entry (padding, or a column that is not that row's prompt); prompt_idx (P,)
         positions of the prompt along S; budgets (B, Hkv) int64, the number of prompt
         entries each row's KV head keeps.
Outputs: kept_k, kept_v (B, Hkv, Kmax, D), Kmax = max over rows and heads of kept_len
         kept_len (B, Hkv) int64 = min(budgets[b, h], P_b), valid prefix of each row's head,
         P_b the row's eligible (finite-score) entries
         kept_pos (B, Hkv, Kmax) int64 absolute positions kept, -1 in the padding

Invariants: rows never share anything (a row's kept set is what it would be alone); the
kept entries of a head are its top-``kept_len[h]`` votes, ties broken
towards the earlier prompt position; within a head they are stored in ascending position
order; padding holds zeros in K/V and -1 in kept_pos. A budget >= P keeps every prompt
entry, in order, so the cache is then exactly the prompt's K/V.

Torch on every device; no Triton kernel. Measured (median of 30, B=1 Hkv=8 D=128 fp32,
budget 256, one core, torch 2.13; `kept_columns` is the top-k threshold that replaced a
stable sort of all P votes, which alone took 1.8 / 19.6 / 49.5 ms at these lengths; the
whole op took 29.4 / 45.8 / 66.0 ms then, on a shared core):

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


def select_kv_reference(votes: torch.Tensor, budgets: torch.Tensor) -> list[list[torch.Tensor]]:
    """Oracle: for each (batch, KV head), the sorted prompt-local indices kept (-inf never)."""
    out = []
    for b in range(votes.shape[0]):
        row = []
        for h in range(votes.shape[1]):
            eligible = [j for j in range(votes.shape[2]) if float(votes[b, h, j]) != float("-inf")]
            n = min(int(budgets[b, h]), len(eligible))
            # stable descending sort: equal votes keep the earlier position first
            order = sorted(eligible, key=lambda j: (-float(votes[b, h, j]), j))
            row.append(torch.tensor(sorted(order[:n]), dtype=torch.long))
        out.append(row)
    return out


def kept_columns(scores: torch.Tensor, kept_len: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, head)'s top-``kept_len`` columns of ``scores`` (B, Hkv, P), ties to the earlier
    column, in column order and padded to ``kmax``: (columns (B, Hkv, Kmax), 0 in the padding,
    and valid (B, Hkv, Kmax), False in the padding). ``kept_len`` must not exceed a row's
    finite scores.

    No sort over P: a top-Kmax gives each head's threshold t (its kept_len-th largest score);
    every column above t is kept, and of the columns equal to t the earliest ones that fill
    the budget (a stable descending sort's choice). The kept columns are then numbered in
    column order by a cumulative sum and scattered into their slots.
    """
    batch, kv_heads, num = scores.shape
    valid = torch.arange(kmax, device=scores.device) < kept_len[..., None]  # (B, Hkv, Kmax)
    columns = torch.zeros((batch, kv_heads, kmax + 1), dtype=torch.long, device=scores.device)
    if kmax == 0 or num == 0:
        return columns[..., :kmax], valid
    top = torch.topk(scores, min(kmax, num), dim=-1).values  # (B, Hkv, <=Kmax), descending
    last = (kept_len.clamp(min=1, max=top.shape[-1]) - 1)[..., None]  # (B, Hkv, 1)
    threshold = top.gather(-1, last)  # (B, Hkv, 1)
    above = scores > threshold  # (B, Hkv, P)
    tied = scores == threshold
    room = kept_len[..., None] - above.sum(-1, keepdim=True)  # how many tied columns still fit
    keep = above | (tied & (tied.cumsum(-1) <= room))  # (B, Hkv, P), kept_len True per head
    slot = torch.where(keep, keep.cumsum(-1) - 1, kmax)  # the column's place; kmax = dropped
    columns.scatter_(-1, slot, torch.arange(num, device=scores.device).expand(batch, kv_heads, num))
    return columns[..., :kmax], valid  # slots past kept_len were never written: still 0


def gather_kept(k: torch.Tensor, v: torch.Tensor, at: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (B, Hkv, S, D) at rows ``at`` (B, Hkv, Kmax); zeros where ``valid`` is False.
    (Advanced indexing, about 1.5x faster here than ``gather`` with an index expanded over D.)"""
    rows = torch.arange(k.shape[0], device=k.device)[:, None, None]  # (B, 1, 1)
    heads = torch.arange(k.shape[1], device=k.device)[None, :, None]  # (1, Hkv, 1)
    keep = valid[..., None]  # (B, Hkv, Kmax, 1)
    return torch.where(keep, k[rows, heads, at], 0), torch.where(keep, v[rows, heads, at], 0)


@torch.library.custom_op("maskkv::select_kv", mutates_args=())
def select_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    votes: torch.Tensor,
    prompt_idx: torch.Tensor,
    budgets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    eligible = torch.isfinite(votes).sum(-1)  # (B, Hkv): -inf marks what a row may not keep
    kept_len = torch.minimum(budgets.to(torch.long).clamp(min=0), eligible)  # (B, Hkv)
    kmax = int(kept_len.max()) if kept_len.numel() else 0
    columns, valid = kept_columns(votes, kept_len, kmax)  # (B, Hkv, Kmax) each
    at = prompt_idx[columns]  # absolute positions
    kept_k, kept_v = gather_kept(k, v, at, valid)
    return kept_k, kept_v, kept_len, torch.where(valid, at, -1)


@select_kv.register_fake
def _(k, v, votes, prompt_idx, budgets):
    kmax = torch.library.get_ctx().new_dynamic_size()
    batch, kv_heads = votes.shape[:2]
    return (
        k.new_empty((batch, kv_heads, kmax, k.shape[-1])),
        v.new_empty((batch, kv_heads, kmax, v.shape[-1])),
        budgets.new_empty((batch, kv_heads), dtype=torch.long),
        budgets.new_empty((batch, kv_heads, kmax), dtype=torch.long),
    )
