"""``maskkv::mask_votes``: Mask-Voting without materializing the attention matrix.

For every KV head, sum over the voter queries (the [MASK] positions, or whatever
``voter_idx`` names) of softmax(q K^T * scale) restricted to the prompt columns. The
softmax denominator runs over every key. GQA: the votes of the query heads of one group
are summed into their KV head.

Inputs:  q (B, H, S, D), k (B, Hkv, S, D), voter_idx (Rv,) and prompt_idx (P,) int64
         positions along S, scale, chunk (block size, see Memory); and, for batches whose
         rows differ (padding, per-row layouts), optional bool masks: key_valid (B, S)
         False at padding keys (out of every softmax), voter_valid (B, Rv) False where a
         voter position does not vote for that row, prompt_valid (B, P) False where a
         prompt column is not that row's prompt (its votes are 0 and its mass is not
         prompt mass). ``None`` (or all True) means every row is the same layout; a
         (B, 0) key_valid means no padding (as for ``maskkv::attention``).
Outputs: votes (B, Hkv, P)   accumulated in float32 (float64 for float64 inputs)
         prompt_mass (B, H)  attention mass of the voters on the prompt keys, per query
                             head; prompt preference is prompt_mass / Rv, since each row
                             of the softmax sums to one and every key is prompt or response.

Memory (CPU path): ``chunk`` is the block size. Voter rows go ``chunk`` at a time and keys
``KEY_BLOCK_FACTOR * chunk`` at a time, in two passes per row block: first each row's
log-sum-exp over all S keys (key block by key block, merged with logaddexp), then the
column sums of exp(s - lse) over the prompt keys (prompt block by prompt block). The
largest temporary is (B, H, chunk, KEY_BLOCK_FACTOR * chunk) plus the (B, Hkv, P) output;
nothing grows with Rv x S. The price is computing the prompt scores twice.
On CUDA with triton installed the op runs the fused kernels of ``kernels/triton_votes.py``
(fp16/bf16/fp32 inputs; float64 stays on this path).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import triton_votes
from .attention import key_padding

KEY_BLOCK_FACTOR = 16  # keys per block = KEY_BLOCK_FACTOR * chunk (see docs/kernels.md)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def free_to_read(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no synchronisation: it is on the CPU."""
    return t.device.type == "cpu"


def _weights(valid, like):
    """An optional bool mask as multiplicative weights in ``like``'s dtype (None stays None).
    An all-True mask is dropped where finding out is free (``free_to_read``); elsewhere it is
    applied (a product with 1.0, exact) rather than read."""
    if valid is None or (free_to_read(valid) and bool(valid.all())):
        return None
    return valid.to(like.dtype)


def mask_votes_reference(
    q, k, voter_idx, prompt_idx, scale, key_valid=None, voter_valid=None, prompt_valid=None
):
    """Oracle: the full attention matrix, materialized. For tests only."""
    acc = accumulation_dtype(q.dtype)
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qv = q.index_select(2, voter_idx).to(acc)
    kk = k.to(acc).repeat_interleave(heads // kv_heads, dim=1)
    scores = qv @ kk.transpose(-2, -1) * scale  # (B, H, Rv, S)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    on_prompt = probs.index_select(-1, prompt_idx)  # (B, H, Rv, P)
    if voter_valid is not None:
        on_prompt = on_prompt * voter_valid[:, None, :, None].to(acc)
    if prompt_valid is not None:
        on_prompt = on_prompt * prompt_valid[:, None, None, :].to(acc)
    votes = on_prompt.sum(2).view(batch, kv_heads, heads // kv_heads, -1).sum(2)
    return votes, on_prompt.sum((2, 3))


def mask_votes_chunked(
    q,
    k,
    voter_idx,
    prompt_idx,
    scale,
    chunk=64,
    key_valid=None,
    voter_valid=None,
    prompt_valid=None,
):
    """The CPU path (any device, any float dtype): two passes over key blocks, see Memory."""
    torch._check(chunk > 0, lambda: f"chunk must be positive, got {chunk}")
    acc = accumulation_dtype(q.dtype)
    batch, heads, _, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = heads // kv_heads
    num_prompt = prompt_idx.numel()
    key_block = chunk * KEY_BLOCK_FACTOR
    votes = q.new_zeros((batch, kv_heads, num_prompt), dtype=acc)
    prompt_mass = q.new_zeros((batch, kv_heads, group), dtype=acc)
    key_valid = key_padding(key_valid)
    padding = None if key_valid is None else ~key_valid[:, None, None, :]  # (B, 1, 1, S)
    voter_w, column_w = _weights(voter_valid, votes), _weights(prompt_valid, votes)
    if padding is not None:  # a padding key is no prompt column either
        real = key_valid.index_select(1, prompt_idx).to(acc)
        column_w = real if column_w is None else column_w * real
    for start in range(0, voter_idx.numel(), chunk):
        rows = voter_idx[start : start + chunk]
        n = rows.numel()
        # (B, H, n, D) -> (B, Hkv, G*n, D): one matmul per KV head covers its whole group
        qc = q.index_select(2, rows).to(acc).reshape(batch, kv_heads, group * n, dim) * scale
        # pass 1: each row's log-sum-exp over all S keys, one key block at a time
        lse = q.new_full((batch, kv_heads, group * n), float("-inf"), dtype=acc)
        for ks in range(0, seq, key_block):
            keys = k[:, :, ks : ks + key_block].to(acc)  # (B, Hkv, kb, D)
            scores = qc @ keys.transpose(-2, -1)  # (B, Hkv, G*n, kb)
            if (
                padding is not None
            ):  # masked_fill, not a -inf bias: garbage (NaN) in a padding key stays out
                scores = scores.masked_fill(padding[..., ks : ks + key_block], float("-inf"))
            lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
        # pass 2: column sums of exp(s - lse) over the prompt keys, one key block at a time
        row_w = (
            None
            if voter_w is None
            else voter_w[:, start : start + n].repeat(1, group)[:, None, :, None]
        )  # (B, 1, G*n, 1)
        for ps in range(0, num_prompt, key_block):
            keys = k.index_select(2, prompt_idx[ps : ps + key_block]).to(acc)  # (B, Hkv, kb, D)
            probs = torch.exp(qc @ keys.transpose(-2, -1) - lse[..., None])  # (B, Hkv, G*n, kb)
            if row_w is not None:
                probs = probs * row_w
            if column_w is not None:
                probs = probs * column_w[:, None, None, ps : ps + key_block]
            votes[..., ps : ps + key_block] += probs.sum(2)
            prompt_mass += probs.sum(-1).view(batch, kv_heads, group, n).sum(-1)
    return votes, prompt_mass.view(batch, heads)


@torch.library.custom_op("maskkv::mask_votes", mutates_args=())
def mask_votes(
    q: torch.Tensor,
    k: torch.Tensor,
    voter_idx: torch.Tensor,
    prompt_idx: torch.Tensor,
    scale: float,
    chunk: int = 64,
    key_valid: Optional[torch.Tensor] = None,
    voter_valid: Optional[torch.Tensor] = None,
    prompt_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_votes_chunked(
        q, k, voter_idx, prompt_idx, scale, chunk, key_valid, voter_valid, prompt_valid
    )


@mask_votes.register_fake
def _(
    q,
    k,
    voter_idx,
    prompt_idx,
    scale,
    chunk=64,
    key_valid=None,
    voter_valid=None,
    prompt_valid=None,
):
    acc = accumulation_dtype(q.dtype)
    votes = q.new_empty((q.shape[0], k.shape[1], prompt_idx.shape[0]), dtype=acc)
    return votes, q.new_empty((q.shape[0], q.shape[1]), dtype=acc)


# CUDA: the fused Triton kernels, registered only where both CUDA and triton exist.
if triton_votes.HAS_TRITON and torch.backends.cuda.is_built():
    triton_votes.register_cuda(mask_votes, mask_votes_chunked)
