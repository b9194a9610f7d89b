"""``maskkv::attention``: the canonical attention op.

Every attention spelling found in a model (fused SDPA, the eager matmul -> scale -> softmax
-> matmul chain, GQA by ``enable_gqa`` / ``repeat_interleave`` / ``expand``+``reshape``) is
rewritten into this one op by ``passes/find_attention.py``; later passes only look for it.

Shapes: q (B, H, S, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) with H % Hkv == 0 -> (B, H, S, Dv);
optional key_valid (B, Sk) bool: False marks a padding key that no query attends to (the
prefill graph passes it for padded batches). ``None`` or an empty (B, 0) mask is plain
attention: the runtime passes (B, 0) for a layout without padding, a fact it reads once when
the layout is made, so the op never reads the mask to find out.
optional key_end (S,) int64, for block-causal attention (block diffusion: LLaDA2, SDAR): query
i attends key j only if ``j < key_end[i]`` (one past the end of i's block), on top of the
padding. A query that would see no key at all (a padding row in a block of padding) sees every
real key instead, so no row is NaN. ``None`` or an empty (0,) tensor: no such limit. Long
windows (padded or not) go in query chunks against the keys before each chunk's last block
end (:func:`block_causal_attention`), on CPU as two segments merged by their log-sum-exps.
Query head h reads KV head h // (H // Hkv), the grouping of Hugging Face's ``repeat_kv``.

``softmax_dtype`` keeps the eager spelling's numerics: when the model computed the softmax
in a dtype other than q's (Hugging Face eager attention: float32 softmax, then a cast back),
the op does the same, so a rewritten float64 model stays bit-faithful to its source.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from maskkv_compile._torch_private import sdpa_with_logsumexp_cpu


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D), each KV head repeated for its group of query heads."""
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softmax_dtype: Optional[torch.dtype] = None,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain attention; ``key_mask`` (broadcastable to (B, H, S, Sk), True = attend)."""
    if softmax_dtype is None or softmax_dtype == q.dtype:  # GQA read in place, no copies
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, scale=scale, enable_gqa=gqa
        )
    k = expand_kv_heads(k, q.shape[1])
    v = expand_kv_heads(v, q.shape[1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, S, Sk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return torch.matmul(probs, v)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    torch._check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D (B, H, S, D)"
    )
    torch._check(
        q.shape[1] % k.shape[1] == 0,
        lambda: f"query heads {q.shape[1]} not a multiple of KV heads {k.shape[1]}",
    )


@torch.library.custom_op("maskkv::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    softmax_dtype: Optional[torch.dtype] = None,
    key_valid: Optional[torch.Tensor] = None,
    key_end: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check(q, k, v)
    if key_end is not None and key_end.numel() >= 2 * QUERY_CHUNK:
        return block_causal_attention(
            q, k, v, scale, softmax_dtype, key_end, key_padding(key_valid)
        )
    return attention_reference(
        q, k, v, scale, softmax_dtype, key_mask=attention_mask(key_valid, key_end, k.shape[2])
    ).contiguous()


# Block-causal attention goes in chunks of this many queries, each against the keys before its
# last block end only: about half the scores of the whole (S, S), the rest being masked anyway.
QUERY_CHUNK = 512
# On CPU, a chunk whose queries all see at least this many keys goes as two segments: below,
# the second call, its mask and the merge cost more than the unmasked keys save
# (scripts/block_prefill_ab.py times one chunk both ways per number of such keys).
SEGMENTS_FROM = 1024


def block_causal_attention(q, k, v, scale, softmax_dtype, key_end, key_valid=None):
    """``attention`` with block ends (S,) and optional padding (B, Sk) (the block-causal
    windows of block diffusion): queries [a, b) attend to keys [0, max(key_end[a:b])) only, the
    keys some query of the chunk may see; the masked keys past them would get zero weight. A
    query that sees no real key before its block end sees every real key instead (the op's
    contract): a chunk holding one takes every key. Same result as the whole masked
    attention, for one host read of the block ends (and, with padding, one of those queries).

    On CPU with the softmax in q's dtype, a chunk whose first block ends at ``SEGMENTS_FROM``
    or later is two segments (:func:`_chunk_segments`): the keys before that end, which every
    query of it may see (only the padding masked), and the rest, masked per query."""
    ends = key_end.tolist()
    blind = [False] * len(ends)
    if key_valid is not None:  # per row of the window: some batch row sees no real key
        real = key_valid.cumsum(1)  # (B, Sk): real keys up to and including each
        last = (key_end - 1).clamp(min=0)[None].expand(real.shape[0], -1)  # (B, S)
        blind = ((real.gather(1, last) == 0) | (key_end <= 0)).any(0).tolist()
    segments = q.device.type == "cpu" and softmax_dtype in (None, q.dtype)
    out = []
    for start in range(0, q.shape[2], QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q.shape[2])
        rows = q[:, :, start:stop]
        lo, hi = min(ends[start:stop]), max(ends[start:stop])  # seen by all / by some row
        if any(blind[start:stop]):
            lo, hi = 0, k.shape[2]
        if segments and lo >= SEGMENTS_FROM:
            out.append(_chunk_segments(rows, k, v, scale, key_end[start:stop], lo, hi, key_valid))
            continue
        padding = None if key_valid is None else key_valid[:, :hi]
        mask = attention_mask(padding, key_end[start:stop], hi)
        out.append(
            attention_reference(rows, k[:, :, :hi], v[:, :, :hi], scale, softmax_dtype, mask)
        )
    return torch.cat(out, dim=2)  # (B, H, S, Dv)


def _chunk_segments(q, k, v, scale, ends, lo: int, hi: int, key_valid=None):
    """One chunk of :func:`block_causal_attention` on CPU: q (B, H, R, D) with block ends (R,),
    row r seeing the real keys of [0, ends[r]), ends[r] >= lo >= 1. Keys [0, lo) go through
    aten's flash kernel with no mask (most of the chunk's scores, at the kernel's full speed)
    or the padding's alone, keys [lo, hi) with a mask per query, and the two merge by their
    log-sum-exps. A KV head's query heads go as one block of rows, so GQA copies no K/V.
    Every batch row has a real key in [0, lo): the chunk's row whose block ends at lo sees
    one (no query of the chunk is blind), so only the second segment can be empty."""
    batch, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.reshape(batch, kv_heads, group * rows, dim)  # (B, Hkv, group*R, D): head-major rows
    padding = None  # of the first segment: (B, 1, 1, lo), the same for every query
    if key_valid is not None:
        padding = additive_mask(key_valid[:, None, None, :lo], q.dtype)
    out, lse = sdpa_with_logsumexp_cpu(qg, k[:, :, :lo], v[:, :, :lo], padding, scale)
    if hi > lo:
        seen = (torch.arange(lo, hi) < ends[:, None])[None, None]  # (1, 1, R, hi-lo)
        if key_valid is not None:
            seen = seen & key_valid[:, None, None, lo:hi]  # (B, 1, R, hi-lo)
        # rows that see none of [lo, hi) (the chunk's first block): that segment weighs nothing
        empty = ~seen.any(-1)  # (B or 1, 1, R)
        mask = additive_mask(seen, q.dtype).repeat(1, 1, group, 1)  # head-major rows, as qg
        out_m, lse_m = sdpa_with_logsumexp_cpu(qg, k[:, :, lo:hi], v[:, :, lo:hi], mask, scale)
        lse_m = lse_m.masked_fill(empty.repeat(1, 1, group), float("-inf"))
        out = merge_segments(out, lse, out_m, lse_m)
    return out.reshape(batch, heads, rows, v.shape[3])  # (B, H, R, Dv)


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive one aten's CPU flash kernel takes."""
    return torch.zeros((), dtype=dtype).masked_fill(~allowed, float("-inf"))


def merge_segments(out_a, lse_a, out_b, lse_b):
    """Softmax attention over two key segments from each one's output (..., Dv) and log-sum-exp
    (...): ``out_a + w (out_b - out_a)`` with ``w = e^lse_b / (e^lse_a + e^lse_b)``. A segment
    a row sees no key of must come with lse -inf (weight 0); both empty: half of each."""
    w = torch.sigmoid((lse_b - lse_a).nan_to_num(nan=0.0))[..., None]
    return torch.lerp(out_a.to(w.dtype), out_b.to(w.dtype), w).to(out_a.dtype)


def banded_key_ranges(mask: torch.Tensor, chunk: int) -> Optional[list[tuple[int, int, int]]]:
    """For a bool attention mask (B, H or 1, S, Sk), True = attend: per chunk of ``chunk``
    query rows starting at ``start``, the keys [lo, hi) outside which every row of the chunk is
    masked, as ``(start, lo, hi)``. Attention over the chunk's rows and those keys alone equals
    the whole masked attention (the keys left out would get zero weight). For a sliding-window
    or causal mask most of the (S, Sk) falls outside the ranges.

    None when chunking would not pay (the ranges cover over 3/4 of the scores) or when
    some row sees no key at all (its fully masked softmax stays with the whole attention). One
    pass over the mask and one host read."""
    rows, keys = mask.shape[-2:]
    if rows < 2 * chunk or mask.dtype != torch.bool or not bool(mask.any(-1).all()):
        return None
    seen = torch.stack(
        [
            mask[:, :, start : start + chunk].any(2).flatten(0, 1).any(0)
            for start in range(0, rows, chunk)
        ]
    )  # (chunks, Sk): some row of the chunk sees the key
    position = torch.arange(keys, device=mask.device)
    lo = torch.where(seen, position, keys).amin(1)  # (chunks,)
    hi = torch.where(seen, position + 1, 0).amax(1)  # (chunks,)
    bounds = torch.stack([lo, hi], 1).tolist()
    if sum(h - lo_ for lo_, h in bounds) * 4 > len(bounds) * keys * 3:
        return None
    return [(i * chunk, lo_, h) for i, (lo_, h) in enumerate(bounds)]


def key_padding(key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The (B, Sk) key validity, or None when nothing is padding (None or (B, 0))."""
    return None if key_valid is None or key_valid.shape[-1] == 0 else key_valid


def padding_mask(key_valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, Sk) key validity -> an SDPA key mask (B, 1, 1, Sk), or None when nothing is padding."""
    key_valid = key_padding(key_valid)
    return None if key_valid is None else key_valid[:, None, None, :]


def attention_mask(
    key_valid: Optional[torch.Tensor], key_end: Optional[torch.Tensor], keys: int
) -> Optional[torch.Tensor]:
    """An SDPA mask (True = attend) from the padding (B, Sk) and the block ends (S,): (B, 1, 1,
    Sk) for padding alone, (B or 1, 1, S, Sk) with block ends; None when neither limits."""
    padding = padding_mask(key_valid)
    if key_end is None or key_end.numel() == 0:
        return padding
    pos = torch.arange(keys, device=key_end.device)
    allowed = (pos[None, :] < key_end[:, None])[None, None]  # (1, 1, S, Sk)
    if padding is None:
        return allowed
    limited = allowed & padding  # (B, 1, S, Sk)
    return torch.where(limited.any(-1, keepdim=True), limited, padding)


@attention.register_fake
def _(q, k, v, scale, softmax_dtype=None, key_valid=None, key_end=None):
    _check(q, k, v)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
