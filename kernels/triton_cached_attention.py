"""Two-segment flash attention in Triton for ``maskkv::cached_attention``.

Same contract as ``kernels/cached_attention.py``:

    q (B, H, R, D); k, v (B, Hkv, R, D|Dv) K/V of the R rows the step computes; kept_k,
    kept_v (B, Hkv, K, D|Dv) kept prompt K/V padded per layer; kept_len (B, Hkv) int64 valid
    prefix per batch row and KV head; resp_valid (B, R) bool, True where computed row j is
    one of batch row b's response keys; row_end (R,) int64, computed row r sees the computed
    keys j < row_end[r] only, or (0,): no limit; scale -> out (B, H, R, Dv) in q's dtype

One program per (block of response queries, batch x query head). It streams the first
``min(kept_len[b, kvh], K)`` kept rows of its batch row and KV head, then the R response
rows, through one online softmax (running max, running sum, float32 accumulator), so the
two segments are never concatenated. Response key j counts for query row r only where
resp_valid[b, j] holds and j < row_end[r]; every query row is computed (both mask keys,
never queries).

Invariants: the kept padding (slot >= kept_len[b, kvh]) and the K/V of the response keys
masked for row b are never read (masked loads; the tests fill them with NaN); a block whose
keys are all masked leaves the softmax state unchanged (the running max is guarded against
-inf - -inf); a query with no key at all (kept_len 0 and resp_valid all False) gets zeros,
as the CPU path's SDPA gives for a fully masked row.
GQA: query head h reads KV head h // (H // Hkv). R, K, D, Dv need not be multiples of the
block sizes, and every tensor is read through its strides (kept_len and resp_valid too).
Probabilities are cast to v's dtype before the P @ V product (as SDPA does); fp32 dots run
in IEEE precision, not TF32.

``cached_attention_triton`` is the launch function; see ``kernels/triton_votes.py`` for how
it is wrapped (``wrap_triton``) and why importing this module never needs triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from .triton_votes import HAS_TRITON, LOG2E, route_to_triton, triton_dtype_ok, upcast_dots

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .triton_votes import _dot

    @triton.jit
    def _attend_segment(
        q,
        m,
        l,
        acc,
        k_base,
        v_base,
        valid_base,
        n_keys,
        sks,
        skd,
        svs,
        svd,
        s_valid,
        limit,
        qk_scale,
        d,
        d_ok,
        dv,
        dv_ok,
        BLOCK_N: tl.constexpr,
        HAS_VALID: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Fold keys [0, n_keys) of one segment into the online softmax state (m, l, acc);
        with HAS_VALID, key j counts only where valid_base[j * s_valid] is True; for query row
        i, only keys j < limit[i] count."""
        for start in range(0, n_keys, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n_keys
            if HAS_VALID:
                col_ok = col_ok & (tl.load(valid_base + cols * s_valid, mask=col_ok, other=0) != 0)
            kt = tl.load(
                k_base + cols[None, :] * sks + d[:, None] * skd,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            vb = tl.load(
                v_base + cols[:, None] * svs + dv[None, :] * svd,
                mask=col_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_DV)
            s = _dot(q, kt, UPCAST) * tl.cast(qk_scale, tl.float32)  # (BLOCK_M, BLOCK_N), log2
            s = tl.where(col_ok[None, :] & (cols[None, :] < limit[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            # no key so far (m_new = -inf): subtract 0 instead, so that p = alpha = 0, not NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, UPCAST)
            m = m_new
        return m, l, acc

    @triton.jit
    def _cached_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        kk_ptr,
        kv_ptr,
        kept_len_ptr,
        resp_valid_ptr,
        row_end_ptr,
        out_ptr,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        svb,
        svh,
        svs,
        svd,
        skkb,
        skkh,
        skks,
        skkd,
        skvb,
        skvh,
        skvs,
        skvd,
        slb,
        slh,
        srb,
        srs,
        sre,
        sob,
        soh,
        sos,
        sod,
        H,
        GROUP,
        R,
        K,
        D,
        DV,
        qk_scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < R
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dv = tl.arange(0, BLOCK_DV)
        dv_ok = dv < DV
        q = tl.load(
            q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + d[None, :] * sqd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        n_kept = tl.minimum(tl.load(kept_len_ptr + b * slb + kvh * slh), K)
        row_end = tl.load(row_end_ptr + rows * sre, mask=row_ok, other=0)  # (BLOCK_M,)
        m, l, acc = _attend_segment(  # segment 1: the kept prompt entries of this row's KV head
            q,
            m,
            l,
            acc,
            kk_ptr + b * skkb + kvh * skkh,
            kv_ptr + b * skvb + kvh * skvh,
            resp_valid_ptr,
            n_kept,
            skks,
            skkd,
            skvs,
            skvd,
            0,
            tl.full((BLOCK_M,), K, tl.int64),
            qk_scale,
            d,
            d_ok,
            dv,
            dv_ok,
            BLOCK_N,
            False,
            UPCAST,
        )
        m, l, acc = _attend_segment(  # segment 2: the response K/V valid for this batch row
            q,
            m,
            l,
            acc,
            k_ptr + b * skb + kvh * skh,
            v_ptr + b * svb + kvh * svh,
            resp_valid_ptr + b * srb,
            R,
            sks,
            skd,
            svs,
            svd,
            srs,
            row_end,
            qk_scale,
            d,
            d_ok,
            dv,
            dv_ok,
            BLOCK_N,
            True,
            UPCAST,
        )
        out = tl.where(
            l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0
        )  # no key at all: zeros
        tl.store(
            out_ptr + b * sob + h * soh + rows[:, None] * sos + dv[None, :] * sod,
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dv_ok[None, :],
        )


def cached_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept_k: torch.Tensor,
    kept_v: torch.Tensor,
    kept_len: torch.Tensor,
    resp_valid: torch.Tensor,
    row_end: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Launch the kernel. Shapes and dtypes as in the module docstring."""
    from torch.library import wrap_triton

    batch, heads, resp, dim = q.shape
    kv_heads, dim_v = k.shape[1], v.shape[-1]
    if row_end.numel() == 0:  # no limit: every row sees all R computed keys
        row_end = torch.full((resp,), resp, device=q.device, dtype=torch.long)
    out = torch.empty((batch, heads, resp, dim_v), device=q.device, dtype=q.dtype)
    if resp == 0:
        return out
    block_m, block_n = 32, 64
    wrap_triton(_cached_attention_kernel)[((resp + block_m - 1) // block_m, batch * heads)](
        q,
        k,
        v,
        kept_k,
        kept_v,
        kept_len,
        resp_valid,
        row_end,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *kept_k.stride(),
        *kept_v.stride(),
        *kept_len.stride(),
        *resp_valid.stride(),
        *row_end.stride(),
        *out.stride(),
        heads,
        heads // kv_heads,
        resp,
        kept_k.shape[2],
        dim,
        dim_v,
        float(scale) * LOG2E,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        UPCAST=upcast_dots(q.dtype),
    )
    return out


def register_cuda(op, torch_fn) -> None:
    """Route ``maskkv::cached_attention`` to the kernel on CUDA
    (``maskkv::cached_attention_triton``).

    The kernel's softmax is float32, so ``softmax_dtype`` None, float32 or q's dtype qualify;
    kept_len and row_end must be int64 and resp_valid bool (the op's contract), on q's device.
    """

    def fused(
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
        return cached_attention_triton(
            q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale
        )

    def supported(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, softmax_dtype=None
    ):
        return (
            triton_dtype_ok(q, k, v, kept_k, kept_v)
            and softmax_dtype in (None, torch.float32, q.dtype)
            and kept_len.dtype == torch.long
            and kept_len.device == q.device
            and resp_valid.dtype == torch.bool
            and resp_valid.device == q.device
            and row_end.dtype == torch.long
            and row_end.device == q.device
        )

    route_to_triton(op, "maskkv::cached_attention_triton", fused, torch_fn, supported)
