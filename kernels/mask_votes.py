"""``maskkv::mask_votes``: Mask-Voting without materializing the attention matrix.

For every KV head, sum over the voter queries (the [MASK] positions, or whatever
``voter_idx`` names) of softmax(q K^T * scale) restricted to the prompt columns. The
softmax denominator runs over every key. GQA: the votes of the query heads of one group
are summed into their KV head.

Inputs:  q (B, H, S, D), k (B, Hkv, S, D), voter_idx (Rv,) and prompt_idx (P,) int64
         positions along S, scale, chunk (block size, see Memory).
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

import torch

from . import triton_votes

KEY_BLOCK_FACTOR = 16  # keys per block = KEY_BLOCK_FACTOR * chunk (see docs/kernels.md)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_votes_reference(q, k, voter_idx, prompt_idx, scale):
    """Oracle: the full attention matrix, materialized. For tests only."""
    acc = accumulation_dtype(q.dtype)
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qv = q.index_select(2, voter_idx).to(acc)
    kk = k.to(acc).repeat_interleave(heads // kv_heads, dim=1)
    probs = torch.softmax(qv @ kk.transpose(-2, -1) * scale, dim=-1)  # (B, H, Rv, S)
    on_prompt = probs.index_select(-1, prompt_idx)  # (B, H, Rv, P)
    votes = on_prompt.sum(2).view(batch, kv_heads, heads // kv_heads, -1).sum(2)
    return votes, on_prompt.sum((2, 3))


def mask_votes_chunked(q, k, voter_idx, prompt_idx, scale, chunk=64):
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
    for start in range(0, voter_idx.numel(), chunk):
        rows = voter_idx[start : start + chunk]
        n = rows.numel()
        # (B, H, n, D) -> (B, Hkv, G*n, D): one matmul per KV head covers its whole group
        qc = q.index_select(2, rows).to(acc).reshape(batch, kv_heads, group * n, dim) * scale
        # pass 1: each row's log-sum-exp over all S keys, one key block at a time
        lse = q.new_full((batch, kv_heads, group * n), float("-inf"), dtype=acc)
        for ks in range(0, seq, key_block):
            keys = k[:, :, ks : ks + key_block].to(acc)  # (B, Hkv, kb, D)
            lse = torch.logaddexp(lse, torch.logsumexp(qc @ keys.transpose(-2, -1), dim=-1))
        # pass 2: column sums of exp(s - lse) over the prompt keys, one key block at a time
        for ps in range(0, num_prompt, key_block):
            keys = k.index_select(2, prompt_idx[ps : ps + key_block]).to(acc)  # (B, Hkv, kb, D)
            probs = torch.exp(qc @ keys.transpose(-2, -1) - lse[..., None])  # (B, Hkv, G*n, kb)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    return mask_votes_chunked(q, k, voter_idx, prompt_idx, scale, chunk)


@mask_votes.register_fake
def _(q, k, voter_idx, prompt_idx, scale, chunk=64):
    acc = accumulation_dtype(q.dtype)
    votes = q.new_empty((q.shape[0], k.shape[1], prompt_idx.shape[0]), dtype=acc)
    return votes, q.new_empty((q.shape[0], q.shape[1]), dtype=acc)


# CUDA: the fused Triton kernels, registered only where both CUDA and triton exist.
if triton_votes.HAS_TRITON and torch.backends.cuda.is_built():
    triton_votes.register_cuda(mask_votes, mask_votes_chunked)
