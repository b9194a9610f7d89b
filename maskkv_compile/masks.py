"""The caller's attention mask, in every spelling dLLM loops use, as per-row padding.

MaskKV never traces the mask: it reads it here, checks that it only marks padding, drops
it from the call, and hands the padding to the graphs as ``key_valid`` (B, S), False at
padding keys. Spellings accepted (``attention_mask`` unless named otherwise):

* ``None`` or the string ``"full"`` (Dream's loop without padding): no padding;
* 2-D (B, S) of 0/1, any dtype (Hugging Face tokenizers; left or right padding, any pattern);
* 4-D bool (B, 1, S, S) (Dream's loop with padding): ``m[b, 0, i, j]`` must be
  ``valid[b, j]`` for every real query row i (padding query rows may see nothing, or every
  key, as transformers' ``_unmask_unattended`` makes them);
* 4-D (B, 1, 1, S) bool or 0/1: a key mask;
* ``attention_bias`` (LLaDA's forward), or any floating 4-D mask: additive,
  0 where attended and a large negative number (or -inf) where not, padding-shaped as above.

* a 4-D *block-causal* mask, in any of the spellings above (block diffusion: LLaDA2's own
  ``generate`` builds ``tril`` over blocks then ``log`` in bfloat16; SDAR-style loops pass bool
  or additive masks, with or without padding): each query sees its own block both ways and
  every earlier block. It is read as the padding plus ``key_end`` (S,), one past the last key
  of each position's block (``read_mask``); the block grid is read from the mask, never
  configured. A (B or 1, 1, S, S) mask that masks nothing is a window of one block (Dream
  says "full", LLaDA passes no bias): it runs whole, exactly, with nothing to cache. A padded
  one-block window reads as padding (a LLaDA prompt: the same pattern).

Anything else (a causal mask, a sliding window, arbitrary float biases, values other than
0/1) is an error naming what it is (``describe_structure``) and what is supported.
"""

from __future__ import annotations

from typing import Optional

import torch

from maskkv_compile.mask_rule import grid_ends
from maskkv_compile.passes.graph_info import UnsupportedModelError

MASK_NAMES = ("attention_mask", "attention_bias")
_BLOCKED = -1e4  # an additive bias at or below this blocks a key
_ROW_CHUNK = 256  # query rows a (B, 1, S, S) mask is read in at once
_CHUNK_BYTES = 1 << 20  # the mask rows ``grid_block_ends`` checks at once (in the core's cache)


def _refuse(name: str, value, why: str) -> ValueError:
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value)
    return ValueError(
        f"{name} {shape}: {why}. MaskKV accepts padding and block-causal masks only: None or "
        "'full'; a (batch, seq) 0/1 mask; a (batch, 1, seq, seq) bool mask whose real rows equal "
        "the key padding (Dream) or that is block-causal (block diffusion: each query sees its own "
        "block and every earlier one, with or without padding); a (batch, 1, 1, seq) key mask; or "
        "an additive bias of 0 and -inf (LLaDA's attention_bias) with the same shape rules"
    )


def _allowed(name: str, mask: torch.Tensor) -> torch.Tensor:
    """Any spelling -> bool 'may attend', same shape."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() and mask.dim() == 4:
        # in chunks of query rows: the temporaries stay small (an (S, S) float mask at 8k is
        # 288 MB, and every fresh temporary that large is page-faulted in)
        open_ = torch.empty(mask.shape, dtype=torch.bool, device=mask.device)
        for start in range(0, mask.shape[2], _ROW_CHUNK):
            part = mask[:, :, start : start + _ROW_CHUNK]
            torch.eq(part, 0, out=open_[:, :, start : start + _ROW_CHUNK])
            if not bool(((part <= _BLOCKED) | open_[:, :, start : start + _ROW_CHUNK]).all()):
                raise _refuse(
                    name,
                    mask,
                    "a float mask holds values other than 0 and a large negative number",
                )
        return open_
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise _refuse(name, mask, "a 0/1 mask holds values other than 0 and 1")
    return mask == 1


def _real_keys(rows: torch.Tensor) -> torch.Tensor:
    """(B, S, S) query x key 'may attend' -> (B, S) real keys. A real query row sees exactly the
    real keys; a padding query row sees nothing, or everything (transformers'
    ``_unmask_unattended`` and Dream-style builders open them up to avoid NaN rows). So the
    real keys are the pattern of the rows that are neither empty nor full, or every key when
    all rows are (no padding, or padding rows that see nothing)."""
    seen = rows.sum(-1)  # (B, S)
    partial = (seen > 0) & (seen < rows.shape[-1])  # (B, S)
    pattern = (rows & partial[..., None]).any(1)  # (B, S): keys some partial row sees
    return torch.where(partial.any(1, keepdim=True), pattern, rows.any(1))


def describe_structure(rows: torch.Tensor, valid: torch.Tensor) -> str:
    """What a (B, S, S) 'may attend' pattern is, in words, judged on its real rows and keys:
    causal, block-causal with its block length (block diffusion: LLaDA2, SDAR, Fast-dLLM v2),
    a sliding window, or another pattern (the first row that shows it)."""
    pos = torch.arange(rows.shape[-1], device=rows.device)
    real = valid[:, :, None] & valid[:, None, :]  # (B, S, S) real query x real key
    seen = rows & real
    if bool((seen == (real & (pos[None, :] <= pos[:, None]))).all()):
        return "causal (each token sees the tokens up to itself): a causal LM, not a diffusion LM"
    ends = torch.where(seen, pos, -1).amax(-1) + 1  # (B, S): one past the last key each row sees
    starts = torch.where(seen, pos, rows.shape[-1]).amin(-1)  # (B, S): the first key each row sees
    sees_prefix = seen == (real & (pos[None, None, :] < ends[..., None]))
    if bool(sees_prefix.all()) and bool((starts[valid] == starts[valid].min()).all()):
        bounds = torch.cat([starts[valid].min().view(1), torch.unique(ends[valid])])
        block = int(torch.diff(bounds).max())  # the first or last block may be partial
        return (
            f"block-causal with blocks of {block} but not every row cuts the blocks alike, or "
            "padding rows in the middle of the blocks"
        )
    window = int((ends - starts)[valid].max())
    causal_window = (pos[None, :] <= pos[:, None]) & (
        pos[:, None] - pos[None, :] < window
    )  # (S, S)
    if bool((seen == (real & causal_window)).all()):
        return f"a causal sliding window of {window}"
    b, i = [
        int(v[0])
        for v in torch.nonzero(
            valid & ~((rows == valid[:, None, :]) | ~valid[:, :, None]).all(-1), as_tuple=True
        )
    ]
    return (
        f"another pattern (row {b}, query {i} sees {int(seen[b, i].sum())} of "
        f"{int(valid[b].sum())} real keys)"
    )


def _unpadded_block_ends(rows: torch.Tensor) -> Optional[torch.Tensor]:
    """The common case read in two passes over the (B, S, S) pattern: a block-causal mask
    without padding, the same in every row of the batch -> its (S,) block ends (what
    :func:`_block_ends` finds for it), else None (the general reading decides). Each query sees
    a prefix of the keys (no key it sees after one it does not: one pass), ending at ``end``
    (its first unseen key: the other pass); the ends are the same in every row of the batch,
    non-decreasing and past their query, and the query at ``end - 1`` ends there too, so the
    ends cut the sequence into contiguous blocks; some query sees a later key (else it is
    causal, blocks of one). A last block of one token is read as a block (the general reading
    takes it for a right-padding row opened up; in a block-diffusion window it is the block
    being generated)."""
    seq = rows.shape[-1]
    pos = torch.arange(seq, device=rows.device)
    seen = rows.view(torch.uint8)  # (B, S, S), 0/1 without a copy
    for start in range(0, seq, _ROW_CHUNK):  # a seen key after an unseen one
        part = seen[:, start : start + _ROW_CHUNK]
        if bool((part[..., 1:] > part[..., :-1]).any()):
            return None
    # each query's first unseen key (argmin finds the first 0; a row that sees every key ends
    # at S)
    ends = torch.where(seen[..., -1] == 1, seq, seen.argmin(-1))  # (B, S)
    end = ends[0]
    if not bool((ends == end).all()):
        return None
    if not bool((end > pos).all() and (end[1:] >= end[:-1]).all()):
        return None
    if not bool((end[end - 1] == end).all() and (end > pos + 1).any()):
        return None
    return end


def grid_block_ends(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """The loops' usual mask read in one pass, before any conversion: block-causal on a uniform
    grid from position 0 (blocks of ``b``, the last one possibly shorter), without padding, the
    same in every row of the batch -> its (S,) block ends; None for anything else, which the
    general reading then decides. ``b`` is the first query's run of attended keys; every entry of
    the (B or 1, 1, S, S) bool or float mask is then checked against that grid (True / 0 where it
    allows, False / at most ``_BLOCKED`` elsewhere) in chunks of whole blocks of rows, small
    enough to stay in the core's cache: per chunk, the keys every row of it attends, the keys
    none attends, and the staircase between. So the (S, S) mask is read once, mostly by plain
    reductions (at 8k: 288 MB of float32; the general reading makes four passes and a bool
    copy)."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return None
    seq = mask.shape[-1]
    first = mask[0, 0, 0] if mask.dtype == torch.bool else mask[0, 0, 0] == 0  # (S,)
    b = seq if bool(first.all()) else int(first.to(torch.uint8).argmin())
    if b < 2 or b == seq:  # blocks of one (causal), or one block: the general reading
        return None
    pos = torch.arange(seq, device=mask.device)
    end = grid_ends(seq, b, mask.device)  # (S,)
    rows = -(-max(1, _CHUNK_BYTES // (seq * mask.element_size())) // b) * b  # whole blocks
    ok = []  # 0-d bools: read once at the end, or at each chunk on the CPU (no sync to save)
    for start in range(0, seq, rows):
        checked = len(ok)
        part = mask[:, 0, start : start + rows]  # (B, r, S)
        # block ends of the chunk's first and last rows, from host ints (no device read)
        lo, hi = (min((row // b + 1) * b, seq) for row in (start, min(start + rows, seq) - 1))
        stair = part[..., lo:hi]  # (B, r, hi - lo): each row attends up to its own end
        allowed = pos[None, lo:hi] < end[start : start + rows, None]  # (r, hi - lo)
        if mask.dtype == torch.bool:
            ok += [part[..., :lo].all(), ~part[..., hi:].any(), (stair == allowed).all()]
        else:
            low, high = part[..., :lo].aminmax()  # every row attends these keys: all 0
            ok += [
                (low == 0) & (high == 0),
                torch.where(allowed, stair == 0, stair <= _BLOCKED).all(),
            ]
            if hi < seq:  # no row attends these: at most _BLOCKED (NaN fails every test)
                ok.append(part[..., hi:].amax() <= _BLOCKED)
        if mask.device.type == "cpu" and not all(bool(t) for t in ok[checked:]):
            return None  # off the grid: the general reading reads it, once
    return end if bool(torch.stack(ok).all()) else None


def _block_ends(rows: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """A (B, S, S) 'may attend' pattern read as block-causal: ((B, S) real keys, (S,) one past
    the last key each position's query sees), or None when it is not of that form.

    Real keys: those some row other than their own sees (a key only its own row sees is a
    padding row that keeps its diagonal); rows that see every key count only when they end the
    sequence (the last block: elsewhere they are padding rows opened up, as transformers does
    to rows that would see nothing). Each real query must see exactly the real keys before its
    end, the ends must cut the sequence into contiguous blocks (a query sees its own block both
    ways and every earlier block), and every row of the batch must cut it alike. Padding
    queries are free (their outputs are never read): they take the end of the next real
    position."""
    batch, seq, _ = rows.shape
    pos = torch.arange(seq, device=rows.device)
    eye = pos[:, None] == pos[None, :]  # (S, S)
    full = rows.all(-1)  # (B, S)
    if not bool((rows & (pos[None, :] > pos[:, None]) & ~full[..., None]).any()):
        return None  # no row sees a later key: causal (blocks of one), not block diffusion
    # rows that see every key are the last block's when they end the sequence (no padding
    # there), else padding rows opened up
    suffix = full.flip(1).cumprod(1).flip(1).bool()  # (B, S)
    others = rows & ~eye & ~(full & ~suffix)[..., None]  # (B, S, S)
    valid = others.any(1)  # (B, S)
    seen = rows & valid[:, None, :]  # (B, S, S)
    # one past the last key each row sees (0: none), without an int64 (B, S, S) intermediate
    ends = torch.where(seen.any(-1), seq - seen.flip(-1).to(torch.uint8).argmax(-1), 0)  # (B, S)
    prefix = seen == (valid[:, None, :] & (pos[None, None, :] < ends[..., None]))
    if not bool((prefix | ~valid[..., None]).all()):
        return None
    real = valid.any(0)  # (S,) real in some row
    end = torch.where(valid, ends, -1).amax(0)  # (S,)
    if not bool(((ends == end) | ~valid).all()) or not bool(real.any()):
        return None
    # padding-only positions take the end of the next real position (the last block's: S), and
    # an end followed by padding-only positions moves past them (nobody sees those keys)
    nxt = torch.where(real, pos, seq).flip(0).cummin(0).values.flip(0)  # (S,)
    nxt = torch.cat([nxt, nxt.new_full((1,), seq)])  # (S + 1,): first real position >= p
    end = torch.where(nxt[:-1] < seq, end[nxt[:-1].clamp(max=seq - 1)], seq)
    end = nxt[end]
    last = torch.zeros(seq + 1, dtype=torch.long, device=rows.device)
    last = last.scatter_reduce(0, end, pos, "amax", include_self=False)  # block end -> last row
    if not bool((end > pos).all()) or not bool((last[end] + 1 == end).all()):
        return None
    return valid, end


def _same_suffix(opened: torch.Tensor, valid: torch.Tensor) -> bool:
    """Every row's non-real positions are the same suffix of the sequence, and all of them see
    every key: read as the last block of a block-causal mask (right padding that transformers
    opened up would differ from row to row)."""
    return (
        bool((opened == ~valid).all())
        and bool((opened == opened[:1]).all())
        and bool((opened[0].cummax(0).values == opened[0]).all())
    )


def read_mask(name: str, mask, batch: int, seq: int):
    """((B, S) bool real keys or None when nothing is padding, (S,) block ends or None when the
    attention is not block-causal) from one mask spelling.

    One pattern reads both ways: a block-causal mask of two blocks is also real rows followed
    by padding rows that see every key. It is read as blocks when those rows are the same
    suffix in every row of the batch (a block-diffusion window of two blocks; right padding
    differs from row to row)."""
    if mask is None or (isinstance(mask, str) and mask == "full"):
        return None, None
    if not isinstance(mask, torch.Tensor):
        raise _refuse(name, mask, "not a tensor")
    if (
        mask.dim() == 4
        and mask.shape[0] in (1, batch)
        and mask.shape[1] == 1
        and tuple(mask.shape[2:]) == (seq, seq)
    ):
        end = grid_block_ends(mask)  # the loops' usual mask, read in one pass
        if end is not None:
            return None, end
    allowed = _allowed(name, mask)
    end = None
    if allowed.dim() == 2 and allowed.shape == (batch, seq):
        valid = allowed
    elif (
        allowed.dim() == 4
        and allowed.shape[0] in (1, batch)
        and allowed.shape[1] == 1
        and allowed.shape[-1] == seq
    ):
        allowed = allowed.expand(batch, *allowed.shape[1:])
        if allowed.shape[2] == 1:
            valid = allowed[:, 0, 0]
        elif allowed.shape[2] == seq:
            rows = allowed[:, 0]  # (B, S, S)
            end = _unpadded_block_ends(rows)  # the loops' usual mask, read in two passes
            if end is not None:
                return None, end
            if bool(rows.all()):
                # a (S, S) mask that masks nothing: a block-diffusion window of one block (a
                # prompt shorter than the block), the one way a loop spells no padding so
                return None, torch.full((seq,), seq, dtype=torch.long, device=rows.device)
            valid = _real_keys(rows)
            real_rows_ok = (rows == valid[:, None, :]) | ~valid[:, :, None]
            opened = ~valid & rows.all(-1)  # (B, S) "padding" rows that see every key
            generating = bool(opened.any()) and _same_suffix(opened, valid)
            if generating or not bool(real_rows_ok.all()):
                blocks = _block_ends(rows)
                if blocks is None and bool(real_rows_ok.all()):
                    blocks = (valid, None)
                if blocks is None:
                    raise _refuse(
                        name,
                        mask,
                        "some real query row does not see exactly the real keys: the mask is "
                        + describe_structure(rows, valid),
                    )
                valid, end = blocks
        else:
            raise _refuse(
                name,
                mask,
                f"a 4-D mask must be (batch or 1, 1, seq, seq) or (batch, 1, 1, seq) for seq {seq}",
            )
    else:
        raise _refuse(name, mask, f"expected (batch, seq) = ({batch}, {seq}) or a 4-D mask")
    if not bool(valid.any(1).all()):
        raise _refuse(name, mask, "a row has no real token at all")
    return (None if bool(valid.all()) else valid.to(torch.bool)), end


def key_padding(name: str, mask, batch: int, seq: int) -> Optional[torch.Tensor]:
    """(B, S) bool, False at padding keys; None when the mask marks no padding. A block-causal
    mask is an error here (callers that take block structure use :func:`read_mask`)."""
    valid, end = read_mask(name, mask, batch, seq)
    if end is not None:
        raise _refuse(name, mask, "a block-causal mask where only padding is accepted")
    return valid


def _key(mask) -> tuple:
    """What identifies a mask tensor's contents without reading them: its storage, view and
    version counter (an in-place write bumps it). Loops pass the same mask, or slices of one,
    at every step."""
    if not isinstance(mask, torch.Tensor):
        return ("value", repr(mask))
    return (
        mask.data_ptr(),
        mask.storage_offset(),
        tuple(mask.shape),
        mask.stride(),
        mask.dtype,
        mask.device,
        mask._version,
    )


class MaskReader:
    """:func:`structure_from_masks` with the results of the last ``size`` masks remembered:
    reading a (B, 1, S, S) mask costs O(S^2) and host reads, and a block loop passes the same one
    (or a slice of the same tensor) at every refinement step of a window. A remembered mask is
    held, so no other tensor can take its memory (and so its key) while it is remembered."""

    def __init__(self, size: int = 2):
        self.size = size
        self.seen: dict = {}  # key -> (the masks, held; the result)

    def __call__(self, input_ids: torch.Tensor, kwargs: dict):
        masks = {name: kwargs.pop(name) for name in MASK_NAMES if name in kwargs}
        batch, seq = input_ids.shape
        if len(masks) == 1:
            ((name, mask),) = masks.items()
            base = _corner_of(mask, seq)
            if base is not None:
                # the window's mask is the top-left corner of one of the whole length (LLaDA2's
                # and SDAR's loops slice it): read that once per generation, cut it here
                key = (batch, input_ids.device, name, _key(base))
                whole = self._read(key, base, lambda: _or_none(read_mask, name, base, batch))
                if whole is not None:
                    valid, end = whole
                    valid = None if valid is None else valid[:, :seq]
                    return (
                        None if valid is None or bool(valid.all()) else valid,
                        None if end is None else end[:seq].clamp(max=seq),
                    )
        key = (tuple(input_ids.shape), input_ids.device, *((n, _key(m)) for n, m in masks.items()))
        return self._read(key, masks, lambda: structure_from_masks(input_ids, dict(masks)))

    def _read(self, key, held, read):
        """``read()``, remembered under ``key`` with ``held`` (the masks it read) kept alive."""
        if key not in self.seen:
            if len(self.seen) >= self.size:
                self.seen.pop(next(iter(self.seen)))
            self.seen[key] = (held, read())
        return self.seen[key][1]


def _or_none(read, name, mask, batch):
    """A whole-length mask's reading, or None when it has none (its corner may still have)."""
    try:
        return read(name, mask, batch, mask.shape[-1])
    except ValueError:
        return None


def _corner_of(mask, seq: int) -> Optional[torch.Tensor]:
    """The square (B or 1, 1, T, T) mask, T >= seq, whose top-left (seq, seq) corner ``mask`` is
    (its rows are T apart in memory: a slice ``whole[:, :, :seq, :seq]``), over the same
    memory; None when ``mask`` is not such a corner. A reading of the whole is the corner's,
    cut."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    row, col = mask.stride()[-2:]
    if tuple(mask.shape[-2:]) != (seq, seq) or col != 1 or row < seq:
        return None
    size = (mask.shape[0], 1, row, row)
    last = mask.storage_offset() + (mask.shape[0] - 1) * mask.stride(0) + row * row
    if mask.untyped_storage().nbytes() < last * mask.element_size():
        return None
    if mask.shape[0] > 1 and mask.stride(0) < row * row:
        return None
    return mask.as_strided(size, mask.stride(), mask.storage_offset())


def structure_from_masks(
    input_ids: torch.Tensor, kwargs: dict
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Pop every mask spelling out of ``kwargs``; return the padding they agree on, (B, S) or
    None, and the block ends of a block-causal mask, (S,) or None."""
    batch, seq = input_ids.shape
    found = [read_mask(name, kwargs.pop(name), batch, seq) for name in MASK_NAMES if name in kwargs]
    padding = [valid for valid, _ in found if valid is not None]
    ends = [end for _, end in found if end is not None]
    if len(padding) > 1 and not torch.equal(padding[0], padding[1]):
        raise ValueError(
            "attention_mask and attention_bias mark different padding; pass one of them"
        )
    if len(ends) > 1 and not torch.equal(ends[0], ends[1]):
        raise ValueError("attention_mask and attention_bias mark different blocks; pass one")
    device = input_ids.device
    return (
        padding[0].to(device) if padding else None,
        ends[0].to(device) if ends else None,
    )


def read_model_masks(masks, batch: int, seq: int) -> Optional[torch.Tensor]:
    """The masks a model builds inside forward from the length alone (one per distinct mask in
    its graph, ``pipeline.MaskKVGraphs.mask_fn``) -> (S,) block ends, or None when they limit
    nothing. They must be one mask, and it may hide keys only by blocks: padding comes from the
    call. (S, S) and (B, S, S) masks gain their missing dims; a per-head (B, H, S, S) mask the
    same for every head keeps one."""

    def as_4d(mask: torch.Tensor) -> torch.Tensor:  # (B or 1, 1, S, S)
        if mask.dim() == 2:
            return mask[None, None]
        if mask.dim() == 3:
            return mask[:, None]
        if mask.shape[1] > 1 and bool((mask == mask[:, :1]).all()):
            return mask[:, :1]
        return mask

    masks = [as_4d(m) for m in masks]
    if any(not torch.equal(m, masks[0]) for m in masks[1:]):
        raise UnsupportedModelError(
            f"the model builds {len(masks)} different attention masks inside forward for its "
            "layers; MaskKV needs one mask for every layer"
        )
    name = "the attention mask the model builds in forward"
    valid, end = read_mask(name, masks[0], batch, seq)
    if valid is not None:
        raise UnsupportedModelError(
            f"{name} hides keys from every query (padding from the length alone); MaskKV reads "
            "padding from the call's attention_mask"
        )
    if end is not None and bool((end == seq).all()):
        # one block (an all-open mask, as BERT-style eager code builds when called without
        # one): plain bidirectional attention, not a window of one block with nothing to cache
        return None
    return end
