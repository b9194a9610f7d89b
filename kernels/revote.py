"""``maskkv::prompt_kv`` and ``maskkv::revote_kv``: the second tier and re-selection from it.

``prompt_kv(k, v, prompt_idx) -> (prompt_k, prompt_v)``, each (B, Hkv, P, D): a layer's
post-RoPE K/V at the prompt positions ``prompt_idx`` (P,), copied out of the prefill so that
a later re-vote can choose among every prompt entry (``MaskKVConfig.revote``).

``revote_kv(q, k, prompt_k, prompt_v, prompt_pos, prompt_valid, resp_valid, row_end,
voter_idx, voter_valid, kept_k, kept_len, scale, chunk, policy, kernel, sink, seed, recent)
-> (kept_k, kept_v, kept_len, kept_pos)``: one layer's re-selection at a step.

  q (B, H, C, D), k (B, Hkv, C, D): the step's computed rows (post-RoPE, absolute positions);
  prompt_k, prompt_v (B, Hkv, P, D): the candidates (the second tier); prompt_pos (P,) their
  absolute positions; prompt_valid (B, P): prompt column p is row b's. Per-head candidates
  (block diffusion's re-selection over [kept prefix ; finished block], ``block_diffusion.py``)
  give both per (row, KV head) instead: prompt_pos (B, Hkv, P), prompt_valid (B, Hkv, P), each
  head's valid columns in position order. resp_valid (B, C): computed row c is one of
  row b's response keys; row_end (C,) or (0,): computed row c sees the computed keys
  j < row_end[c] only, or every one (``maskkv::cached_attention``'s); voter_idx (Rv,)
  indices into C of the voting queries, voter_valid (B, Rv); kept_k (B, Hkv, Kmax, D): the
  current hot cache, read for its padded length only; kept_len (B, Hkv): the per-row,
  per-head budgets, kept as they are.

Votes: for each KV head, the sum over voters (and the query heads of its group) of
softmax(q [prompt_k ; k]^T * scale) at the prompt columns, the softmax running over every
key the voter attends to (its prompt and its response rows), exactly Mask-Voting's rule with
the step's queries. The policy turns votes into scores (``maskkv::selection_scores``: SnapKV
pools them, StreamingLLM and random ignore them) and the top-``kept_len`` per (row, KV head)
are kept, ties to the earlier position, stored in position order, padded with zeros (K/V) and
-1 (positions) to Kmax. Positions are absolute (``prompt_pos``), as the prefill's are.
With ``kept_len`` equal to the prompt length every entry is kept, in order: the output equals
the prefill's cache bit for bit.
"""

from __future__ import annotations

import torch

from .mask_votes import KEY_BLOCK_FACTOR, accumulation_dtype
from .select_kv import gather_kept, kept_columns

# Above this many scores per (row, KV head) the prompt keys go in blocks of this many columns,
# two passes (log-sum-exp first); at or below it one score block serves both.
SCORE_BLOCK = 1 << 20


def revote_votes(
    q, k, prompt_k, prompt_valid, resp_valid, row_end, voter_idx, voter_valid, scale, chunk=64
):
    """(B, Hkv, P) votes of the voters over the prompt columns, softmax over [prompt ; response].

    The prompt keys and the step's keys are scored apart (nothing concatenated or copied):
    each voter's log-sum-exp merges both, then the prompt columns' exp(s - lse) are summed.
    Voters are few (the response rows), so all of a KV head's voters, its query heads' included,
    go in one matmul; the prompt keys go in one block (one exp, normalized by each voter's
    denominator inside the summing matmul), or in ``chunk * KEY_BLOCK_FACTOR``-column blocks,
    two passes, when the scores would exceed ``SCORE_BLOCK`` per (row, KV head).
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, _, dim = q.shape
    kv_heads, num_prompt = prompt_k.shape[1], prompt_k.shape[2]
    group, voters = heads // kv_heads, voter_idx.numel()
    # (B, H, Rv, D) -> (B, Hkv, G*Rv, D): a KV head's query heads are consecutive
    qv = q.index_select(2, voter_idx).to(acc).reshape(batch, kv_heads, group * voters, dim) * scale
    voter_w = voter_valid.repeat(1, group).to(acc)[:, None, :, None]  # (B, 1, G*Rv, 1)
    # (B, 1, 1, P), or per head (B, Hkv, 1, P)
    prompt_out = ~(prompt_valid[:, None] if prompt_valid.dim() == 2 else prompt_valid)[:, :, None]

    def prompt_scores(start, stop):  # (B, Hkv, G*Rv, stop - start), -inf off the row's prompt
        scores = qv @ prompt_k[:, :, start:stop].to(acc).transpose(-2, -1)
        return scores.masked_fill(prompt_out[..., start:stop], float("-inf"))

    seen = resp_valid[:, None, None, :]  # (B, 1, 1, C): the computed keys each voter sees
    if row_end.numel():  # (Rv, C) -> (G*Rv, C), in qv's row order
        limit = row_end[voter_idx, None]
        seen = seen & (torch.arange(k.shape[2], device=q.device) < limit).repeat(group, 1)
    response = (qv @ k.to(acc).transpose(-2, -1)).masked_fill(~seen, float("-inf"))
    if group * voters * num_prompt <= SCORE_BLOCK:  # one exp of the prompt scores serves both sums
        scores = prompt_scores(0, num_prompt)
        top = torch.maximum(
            scores.amax(-1, keepdim=True), response.amax(-1, keepdim=True)
        )  # (B, Hkv, G*Rv, 1)
        unnormed = torch.exp(scores - top)
        total = unnormed.sum(-1, keepdim=True) + torch.exp(response - top).sum(-1, keepdim=True)
        # (B, Hkv, 1, G*Rv) @ (B, Hkv, G*Rv, P): each voter's row over its softmax
        # denominator, summed
        return ((voter_w / total).transpose(-2, -1) @ unnormed).squeeze(-2)
    lse = torch.logsumexp(response, dim=-1)  # (B, Hkv, G*Rv)
    block = chunk * KEY_BLOCK_FACTOR
    for start in range(0, num_prompt, block):
        lse = torch.logaddexp(lse, torch.logsumexp(prompt_scores(start, start + block), dim=-1))
    votes = qv.new_empty((batch, kv_heads, num_prompt))
    for start in range(0, num_prompt, block):
        probs = torch.exp(prompt_scores(start, start + block) - lse[..., None]) * voter_w
        votes[..., start : start + block] = probs.sum(2)
    return votes


@torch.library.custom_op("maskkv::prompt_kv", mutates_args=())
def prompt_kv(
    k: torch.Tensor, v: torch.Tensor, prompt_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return k.index_select(2, prompt_idx), v.index_select(2, prompt_idx)


@prompt_kv.register_fake
def _(k, v, prompt_idx):
    num_prompt = prompt_idx.shape[0]
    return (
        k.new_empty((*k.shape[:2], num_prompt, k.shape[-1])),
        v.new_empty((*v.shape[:2], num_prompt, v.shape[-1])),
    )


@torch.library.custom_op("maskkv::revote_kv", mutates_args=())
def revote_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    prompt_pos: torch.Tensor,
    prompt_valid: torch.Tensor,
    resp_valid: torch.Tensor,
    row_end: torch.Tensor,
    voter_idx: torch.Tensor,
    voter_valid: torch.Tensor,
    kept_k: torch.Tensor,
    kept_len: torch.Tensor,
    scale: float,
    chunk: int,
    policy: str,
    kernel: int,
    sink: int,
    seed: int,
    recent: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    votes = revote_votes(
        q, k, prompt_k, prompt_valid, resp_valid, row_end, voter_idx, voter_valid, scale, chunk
    )
    if prompt_valid.dim() == 2:
        scores = torch.ops.maskkv.selection_scores(
            votes, prompt_valid, policy, kernel, sink, seed, recent
        )
    else:  # per-head candidates: each (row, KV head) ranked as a row of its own
        batch, kv_heads, width = votes.shape
        scores = torch.ops.maskkv.selection_scores(
            votes.reshape(batch * kv_heads, 1, width),  # (B*Hkv, 1, P)
            prompt_valid.reshape(batch * kv_heads, width),
            policy,
            kernel,
            sink,
            seed,
            recent,
        ).reshape(batch, kv_heads, width)
    eligible = torch.isfinite(scores).sum(-1)  # (B, Hkv)
    budgets = torch.minimum(kept_len.to(torch.long), eligible)
    columns, valid = kept_columns(scores, budgets, kept_k.shape[2])  # (B, Hkv, Kmax) each
    new_k, new_v = gather_kept(prompt_k, prompt_v, columns, valid)
    positions = prompt_pos[columns] if prompt_pos.dim() == 1 else prompt_pos.gather(2, columns)
    return new_k, new_v, budgets, torch.where(valid, positions, -1)


@revote_kv.register_fake
def _(
    q,
    k,
    prompt_k,
    prompt_v,
    prompt_pos,
    prompt_valid,
    resp_valid,
    row_end,
    voter_idx,
    voter_valid,
    kept_k,
    kept_len,
    scale,
    chunk,
    policy,
    kernel,
    sink,
    seed,
    recent,
):
    batch, kv_heads, kmax = kept_k.shape[:3]
    return (
        prompt_k.new_empty((batch, kv_heads, kmax, prompt_k.shape[-1])),
        prompt_v.new_empty((batch, kv_heads, kmax, prompt_v.shape[-1])),
        kept_len.new_empty((batch, kv_heads), dtype=torch.long),
        kept_len.new_empty((batch, kv_heads, kmax), dtype=torch.long),
    )
