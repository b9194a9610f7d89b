"""Fused Triton kernels for ``maskkv::mask_votes`` (CUDA; CPU only under TRITON_INTERPRET=1).

Same contract as ``kernels/mask_votes.py``:

    q (B, H, S, D), k (B, Hkv, S, D), voter_idx (Rv,), prompt_idx (P,) int64, scale, and the
    optional bool masks key_valid (B, S), voter_valid (B, Rv), prompt_valid (B, P)
    -> votes (B, Hkv, P) float32, prompt_mass (B, H) float32

Two passes, neither holds the (Rv x S) score matrix:

1. ``_row_lse_kernel``, one program per (batch x query head, block of voter rows): an online
   max / sum over all S keys, in key blocks, gives each voter row's log-sum-exp (base 2).
   Keys with key_valid False get -inf before the max / sum.
2. ``_prompt_colsum_kernel``, one program per (batch x KV head, block of prompt columns):
   loads the block's prompt keys once, then for every query head of the GQA group and every
   block of voter rows adds exp2(s - lse) into the column sums (the votes) and into that
   head's mass; the per-block masses land in a (B, H, num_blocks) buffer summed by torch.
   A term counts only where its voter row votes for that batch row (voter_valid) and its
   column is that row's prompt (prompt_valid) and not a padding key (key_valid at the
   column's position), so masked rows and columns add nothing to votes or mass.

Masks on CUDA: the kernels honour all three masks themselves (this is the long-prompt fast
path, and padded batches are where it matters), so giving a mask never sends the op to the
torch path (only a mask that is not bool, or not on q's device, does). Each mask is a
constexpr switch (``HAS_KEY_MASK`` ...): without it nothing extra is loaded, and a given
mask is read as is, with no all-True test (that would sync the device and be
data-dependent under torch.compile). Masks are read through their strides.

Invariants: scores, exponentials and sums are float32 whatever the input dtype (fp16,
bf16, fp32; fp32 dots run in IEEE precision, not TF32); voter rows and prompt columns are
read through their index vectors, so nothing is gathered or copied first; Rv, S, P and D
need not be multiples of any block size (masked loads); a key block whose keys are all
padding leaves a row's running max / sum unchanged (guarded against -inf - -inf, e.g. left
padding longer than a block); masked terms are selected away (tl.where), never multiplied
by 0, so masked keys may hold any value. A batch row with no valid key at all gets zero
votes and mass (the torch reference gives NaN there).

``mask_votes_triton`` is the launch function. Kernels go through ``torch.library.wrap_triton``
so that, inside a ``torch.library.triton_op``, Inductor sees them; eagerly and under
``TRITON_INTERPRET=1`` it launches them directly. Importing this module never needs triton.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .attention import key_padding

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; only these kernels need it
    triton = None

HAS_TRITON = triton is not None

LOG2E = 1.4426950408889634


def upcast_dots(dtype: torch.dtype) -> bool:
    """bf16 under TRITON_INTERPRET=1 (the numpy interpreter used by the CPU tests), whose
    bf16 tl.dot returns garbage (triton 3.7.1): there the dots get fp32 operands."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        """a @ b accumulated in float32 (IEEE for fp32 inputs); UPCAST: see upcast_dots."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision="ieee")
        return out

    @triton.jit
    def _row_lse_kernel(
        q_ptr,
        k_ptr,
        voter_ptr,
        key_valid_ptr,
        lse_ptr,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        skvb,
        skvs,
        H,
        GROUP,
        RV,
        S,
        D,
        qk_scale,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """lse_ptr[(b*H + h)*RV + r] = log2 sum_j exp2(q_r . k_j * qk_scale) over the valid keys."""
        pid_r = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        kvh = h // GROUP
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < RV
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        qpos = tl.load(voter_ptr + rows, mask=row_ok, other=0)
        q = tl.load(
            q_ptr + b * sqb + h * sqh + qpos[:, None] * sqs + d[None, :] * sqd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_R, BLOCK_D)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, S, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < S
            if HAS_KEY_MASK:
                col_ok = col_ok & (
                    tl.load(key_valid_ptr + b * skvb + cols * skvs, mask=col_ok, other=0) != 0
                )
            kt = tl.load(
                k_ptr + b * skb + kvh * skh + cols[None, :] * sks + d[:, None] * skd,
                mask=d_ok[:, None] & col_ok[None, :],
                other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            s = _dot(q, kt, UPCAST) * tl.cast(qk_scale, tl.float32)  # (BLOCK_R, BLOCK_N), log2
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid key yet: 0, not NaN
            l = l * tl.exp2(m - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), 1)
            m = m_new
        tl.store(lse_ptr + pid_bh * RV + rows, m + tl.log2(l), mask=row_ok)

    @triton.jit
    def _prompt_colsum_kernel(
        q_ptr,
        k_ptr,
        voter_ptr,
        prompt_ptr,
        key_valid_ptr,
        voter_valid_ptr,
        prompt_valid_ptr,
        lse_ptr,
        votes_ptr,
        mass_ptr,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        skvb,
        skvs,
        svvb,
        svvr,
        spvb,
        spvp,
        H,
        HKV,
        GROUP,
        RV,
        P,
        D,
        NUM_PB,
        qk_scale,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_KEY_MASK: tl.constexpr,
        HAS_VOTER_MASK: tl.constexpr,
        HAS_PROMPT_MASK: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """votes[b, kvh, p] = sum over the group's heads and voter rows of exp2(s - lse);
        mass[b, h, pid_p] = the same sum for head h over this block's prompt columns.
        Only the terms of valid (voter row, prompt column) pairs are summed."""
        pid_p = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // HKV
        kvh = pid_bk % HKV
        cols = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        col_ok = cols < P
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        kpos = tl.load(prompt_ptr + cols, mask=col_ok, other=0)
        kt = tl.load(
            k_ptr + b * skb + kvh * skh + kpos[None, :] * sks + d[:, None] * skd,
            mask=d_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # (BLOCK_D, BLOCK_P): this block's prompt keys, loaded once
        col_counts = col_ok  # the columns that are this batch row's (non-padding) prompt
        if HAS_KEY_MASK:
            col_counts = col_counts & (
                tl.load(key_valid_ptr + b * skvb + kpos * skvs, mask=col_ok, other=0) != 0
            )
        if HAS_PROMPT_MASK:
            col_counts = col_counts & (
                tl.load(prompt_valid_ptr + b * spvb + cols * spvp, mask=col_ok, other=0) != 0
            )
        votes = tl.zeros((BLOCK_P,), tl.float32)
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            head_cols = tl.zeros((BLOCK_P,), tl.float32)
            for start in range(0, RV, BLOCK_R):
                rows = start + tl.arange(0, BLOCK_R)
                row_ok = rows < RV
                row_counts = row_ok
                if HAS_VOTER_MASK:
                    row_counts = row_counts & (
                        tl.load(voter_valid_ptr + b * svvb + rows * svvr, mask=row_ok, other=0) != 0
                    )
                qpos = tl.load(voter_ptr + rows, mask=row_ok, other=0)
                q = tl.load(
                    q_ptr + b * sqb + h * sqh + qpos[:, None] * sqs + d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )  # (BLOCK_R, BLOCK_D)
                lse = tl.load(lse_ptr + (b * H + h) * RV + rows, mask=row_ok, other=0.0)
                s = _dot(q, kt, UPCAST) * tl.cast(qk_scale, tl.float32)  # (BLOCK_R, BLOCK_P)
                p = tl.exp2(s - lse[:, None])
                p = tl.where(row_counts[:, None] & col_counts[None, :], p, 0.0)
                head_cols += tl.sum(p, 0)
            votes += head_cols
            tl.store(mass_ptr + (b * H + h) * NUM_PB + pid_p, tl.sum(head_cols, 0))
        tl.store(votes_ptr + pid_bk * P + cols, votes, mask=col_ok)


def _mask_args(mask, placeholder):
    """(pointer, stride 0, stride 1, present) for an optional (B, N) bool mask."""
    return (placeholder, 0, 0, False) if mask is None else (mask, *mask.stride(), True)


def mask_votes_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    voter_idx: torch.Tensor,
    prompt_idx: torch.Tensor,
    scale: float,
    key_valid: Optional[torch.Tensor] = None,
    voter_valid: Optional[torch.Tensor] = None,
    prompt_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two kernels. Shapes and dtypes as in the module docstring."""
    from torch.library import wrap_triton

    batch, heads, _, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    num_voters, num_prompt = voter_idx.shape[0], prompt_idx.shape[0]
    voter_idx = voter_idx.contiguous()
    prompt_idx = prompt_idx.contiguous()
    block_r, block_n, block_p = 32, 64, 64
    block_d = max(16, triton.next_power_of_2(dim))
    num_pb = (num_prompt + block_p - 1) // block_p
    votes = torch.empty((batch, kv_heads, num_prompt), device=q.device, dtype=torch.float32)
    mass = torch.empty((batch, heads, num_pb), device=q.device, dtype=torch.float32)
    lse = torch.empty((batch, heads, num_voters), device=q.device, dtype=torch.float32)
    if num_voters == 0 or num_prompt == 0:
        return votes.zero_(), mass.zero_().sum(-1)
    # an absent mask: the kernel never loads it (constexpr switch); any tensor fills the slot
    kv_ptr, skvb, skvs, has_key = _mask_args(key_valid, voter_idx)
    vv_ptr, svvb, svvr, has_voter = _mask_args(voter_valid, voter_idx)
    pv_ptr, spvb, spvp, has_prompt = _mask_args(prompt_valid, voter_idx)
    qk_scale = float(scale) * LOG2E
    wrap_triton(_row_lse_kernel)[((num_voters + block_r - 1) // block_r, batch * heads)](
        q,
        k,
        voter_idx,
        kv_ptr,
        lse,
        *q.stride(),
        *k.stride(),
        skvb,
        skvs,
        heads,
        heads // kv_heads,
        num_voters,
        seq,
        dim,
        qk_scale,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_KEY_MASK=has_key,
        UPCAST=upcast_dots(q.dtype),
    )
    wrap_triton(_prompt_colsum_kernel)[(num_pb, batch * kv_heads)](
        q,
        k,
        voter_idx,
        prompt_idx,
        kv_ptr,
        vv_ptr,
        pv_ptr,
        lse,
        votes,
        mass,
        *q.stride(),
        *k.stride(),
        skvb,
        skvs,
        svvb,
        svvr,
        spvb,
        spvp,
        heads,
        kv_heads,
        heads // kv_heads,
        num_voters,
        num_prompt,
        dim,
        num_pb,
        qk_scale,
        BLOCK_R=block_r,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        HAS_KEY_MASK=has_key,
        HAS_VOTER_MASK=has_voter,
        HAS_PROMPT_MASK=has_prompt,
        UPCAST=upcast_dots(q.dtype),
    )
    return votes, mass.sum(-1)  # (B, Hkv, P), (B, H)


# ---- CUDA registration -------------------------------------------------------------------

TRITON_DEVICE_TYPES = ("cuda",)  # devices whose tensors take the Triton path


def route_to_triton(op, name, fused_fn, torch_fn, supported) -> None:
    """Make the custom op ``op`` run ``fused_fn`` (Triton) where ``supported(*args)`` holds.

    ``fused_fn`` (same signature as ``op``) becomes the ``torch.library.triton_op`` ``name``.
    Eagerly, ``op``'s CUDA kernel calls it (or ``torch_fn`` when not supported). Under
    torch.compile, AOTAutograd traces with FunctionalTensorMode active; there ``op`` is
    replaced by the triton_op, which in turn decomposes into ``wrap_triton`` kernel calls
    that Inductor sees and schedules (this is what triton_op itself does for its own op).
    Unsupported inputs (float64, CPU) keep ``op`` opaque.
    """
    from maskkv_compile._torch_private import triton_route_internals

    (
        get_triton_kernels_for_op,
        triton_ops_to_kernels,
        FunctionalTensorMode,
        decomposition_disabled,
    ) = triton_route_internals()

    fused = torch.library.triton_op(name, fused_fn, mutates_args=())
    # AOTAutograd's cache key hashes the kernels of the ops in the dynamo graph (private map)
    triton_ops_to_kernels[op._name] = get_triton_kernels_for_op(name)

    def cuda_kernel(*args, **kwargs):
        return fused(*args, **kwargs) if supported(*args, **kwargs) else torch_fn(*args, **kwargs)

    def functional_decomp(mode, func, types, args, kwargs):
        if supported(*args, **kwargs) and not decomposition_disabled():
            with mode:
                return fused(*args, **kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_kernel("cuda", cuda_kernel)
    op.register_torch_dispatch(FunctionalTensorMode, functional_decomp)


def triton_dtype_ok(*tensors) -> bool:
    """Same floating dtype (fp16/bf16/fp32) on a Triton device, head dim at most 256."""
    first = tensors[0]
    return (
        first.device.type in TRITON_DEVICE_TYPES
        and first.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and all(t.shape[-1] <= 256 for t in tensors)
    )


def register_cuda(op, torch_fn) -> None:
    """Route ``maskkv::mask_votes`` to the fused kernels on CUDA (``maskkv::mask_votes_triton``).

    The kernels honour key_valid / voter_valid / prompt_valid (see the module docstring);
    a mask that is not bool or not on q's device sends the call to ``torch_fn``.
    """

    def fused(
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
        # chunk: CPU-only knob; a (B, 0) key_valid is no padding
        return mask_votes_triton(
            q, k, voter_idx, prompt_idx, scale, key_padding(key_valid), voter_valid, prompt_valid
        )

    def supported(
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
        masks = [m for m in (key_valid, voter_valid, prompt_valid) if m is not None]
        return triton_dtype_ok(q, k) and all(
            m.dtype == torch.bool and m.device == q.device for m in masks
        )

    route_to_triton(op, "maskkv::mask_votes_triton", fused, torch_fn, supported)
