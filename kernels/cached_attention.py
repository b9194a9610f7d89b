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

CPU: SDPA over the concatenated K/V with a key mask. CUDA with triton installed (fp16,
bf16, fp32): the two-segment flash kernel of ``kernels/triton_cached_attention.py``, which
never concatenates; under torch.compile Inductor sees that kernel (``triton_op``).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import triton_cached_attention
from .attention import attention_reference, expand_kv_heads


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
    """The CPU path: SDPA over the concatenation with a key mask."""
    return cached_attention_reference(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype
    ).contiguous()


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
