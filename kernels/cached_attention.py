"""``maskkv::cached_attention``: response queries over [kept prompt K/V ; response K/V].

Inputs:  q (B, H, R, D); k, v (B, Hkv, R, D) of the rows the step computes; kept_k, kept_v
         (B, Hkv, K, D) padded per layer, kept_len (B, Hkv) valid prefix per row and KV
         head; resp_valid (B, R) bool, True where computed row j is one of row b's
         response keys (False: a row computed for another row of the batch, or a query-only
         row such as a shifted-logits model's last prompt row); row_end (R,) int64: computed
         row r sees only the computed keys j < row_end[r] (block diffusion's shifted families
         compute the row before the block, which must not see the block), or (0,): every
         computed row sees every computed key; scale; softmax_dtype as in
         ``maskkv::attention``.
Output:  (B, H, R, Dv): every computed row's output (query rows are never masked).

Padding slots (index >= kept_len[b, h]) and keys with resp_valid False get no attention
weight. With every prompt entry
kept, this equals attention over the concatenation of the prompt's and the response's K/V.

CPU, from ``TWO_SEGMENTS_FROM`` kept slots on (a long exact prefix): two SDPA calls, one over
the kept K/V and one over the computed rows' K/V, merged by their log-sum-exps, so the kept
K/V are never copied; a KV head's query heads go as one block of rows (B, Hkv, group * R, D),
so GQA copies nothing either. Below that, SDPA over the concatenation (faster when the copy is
small). CUDA with triton installed (fp16, bf16, fp32): the two-segment flash kernel of
``kernels/triton_cached_attention.py``, which never concatenates either; under torch.compile
Inductor sees that kernel (``triton_op``). Elsewhere, and for a softmax in another dtype than
q's: the reference, over the concatenation.
"""

from __future__ import annotations

from typing import Optional

import torch

from maskkv_compile._torch_private import sdpa_with_logsumexp_cpu

from . import triton_cached_attention
from .attention import additive_mask, attention_reference, expand_kv_heads, merge_segments


def cached_attention_reference(
    q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype=None
):
    num_kept, resp = kept_k.shape[2], k.shape[2]
    keys = torch.cat([kept_k, k], dim=2)  # (B, Hkv, K+R, D)
    values = torch.cat([kept_v, v], dim=2)
    kept_valid = torch.arange(num_kept, device=q.device) < kept_len[..., None]  # (B, Hkv, K)
    computed = resp_valid[:, None, None, :]  # (B, 1, 1, R): the same for every query row
    rows = 1
    if row_end.numel():  # per query row: (B, 1, R, R), query r, key j
        computed = computed & (torch.arange(resp, device=q.device) < row_end[:, None])
        rows = resp
    kept_valid = kept_valid[:, :, None, :].expand(-1, -1, rows, -1)  # (B, Hkv, rows, K)
    computed = computed.expand(-1, kept_len.shape[1], rows, -1)  # (B, Hkv, rows, R)
    key_mask = torch.cat([kept_valid, computed], dim=3)  # (B, Hkv, rows, K+R)
    key_mask = expand_kv_heads(key_mask, q.shape[1])  # (B, H, rows, K+R)
    return attention_reference(q, keys, values, scale, softmax_dtype, key_mask=key_mask)


def cached_attention_torch(
    q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype=None
):
    """The op without triton: on CPU from ``TWO_SEGMENTS_FROM`` kept slots on, two segments
    merged; else the reference."""
    if (
        q.device.type != "cpu"
        or softmax_dtype not in (None, q.dtype)
        or kept_k.shape[2] < TWO_SEGMENTS_FROM
    ):
        return cached_attention_reference(
            q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype
        ).contiguous()
    return _two_segments_cpu(q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale)


# Kept slots (per layer) from which the CPU path runs two segments: below, one SDPA call over
# the concatenation is faster (the copy is small, the second call and the merge are not); at
# 2048 and more the copy dominates (scripts/cached_attention_ab.py measures both).
TWO_SEGMENTS_FROM = 1024


def _two_segments_cpu(q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale):
    """``cached_attention`` as two SDPA segments merged by their log-sum-exps (module
    docstring); the same contract and result as the reference."""
    batch, heads, resp, _ = q.shape
    kv_heads, num_kept = k.shape[1], kept_k.shape[2]
    group = heads // kv_heads
    rows = group * resp
    qg = q.reshape(batch, kv_heads, rows, q.shape[3])  # (B, Hkv, group*R, D): head-major rows
    computed = resp_valid[:, None, None, :]  # (B, 1, 1, R): the computed keys each row sees
    if row_end.numel():  # query r sees computed key j < row_end[r]: (B, 1, group*R, R)
        ends = torch.arange(resp) < row_end[:, None]  # (R, R)
        computed = computed & ends.repeat(group, 1)[None, None]
    # masks always (reading whether they hide anything would be a host read; they cost nothing)
    out_c, lse_c = sdpa_with_logsumexp_cpu(qg, k, v, additive_mask(computed, q.dtype), scale)
    if num_kept:
        kept = torch.arange(num_kept) < kept_len[..., None, None]  # (B, Hkv, 1, K)
        out_k, lse_k = sdpa_with_logsumexp_cpu(
            qg, kept_k, kept_v, additive_mask(kept, q.dtype), scale
        )
        # a segment a row sees no key of weighs nothing (the kernel reports 0 there, not -inf)
        lse_k = lse_k.masked_fill(~kept.any(-1), float("-inf"))
        lse_c = lse_c.masked_fill(~computed.any(-1), float("-inf"))
        out_c = merge_segments(out_c, lse_c, out_k, lse_k)
    # (B, H, R, Dv), contiguous as the fake kernel's output (the flash kernel's is not)
    return out_c.reshape(batch, heads, resp, v.shape[3]).contiguous()


@torch.library.custom_op("maskkv::cached_attention", mutates_args=())
def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept_k: torch.Tensor,
    kept_v: torch.Tensor,
    kept_len: torch.Tensor,
    resp_valid: torch.Tensor,
    row_end: torch.Tensor,
    scale: float,
    softmax_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    return cached_attention_torch(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype
    )


@cached_attention.register_fake
def _(q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# CUDA: the Triton kernel, registered only where both CUDA and triton exist.
if triton_cached_attention.HAS_TRITON and torch.backends.cuda.is_built():
    triton_cached_attention.register_cuda(cached_attention, cached_attention_torch)
