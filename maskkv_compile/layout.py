"""Where each row's prompt, response and padding are, and which rows the step graph computes.

A :class:`Layout` is decided once per prompt (at its prefill) from the tokens, the padding
and the model family, and never changes until the next prefill of a new layout:

* padding: ``key_valid`` (B, S), False at padding (from the caller's attention mask);
* response of row b: the real positions that hold the mask token at the prefill, except in
  a *masked copy* row (classifier-free guidance's unconditional row), which takes its
  reference row's response; its extra masks are its prompt (they are never committed), so
  both CFG halves are cached alike. The reference is either
  - a row of the same call (LLaDA's ``cat([x, un_x])``): a row equal to it wherever not
    masked, and masked at every one of its prompt positions; row i + B/2 pairs with row i
    first (at step 0 an all-mask row beside a conditional row is read this way); or
  - the same row of the *previous* call (CFG as two calls, the unconditional call right
    after the conditional one): masked at every prompt position of that call's session,
    equal to its tokens at every one of its response positions (masked where they were
    masked, the same token where committed), and mirroring no other live session that puts
    that row's response elsewhere. An all-mask row at step 0 after two prompts of other
    lengths mirrors both: it is nobody's copy (a prefill without a cache), never a copy of
    the wrong one. After two prompts of one length, both readings give the row one layout
    (the copy is a session of its own), so it is read as the previous call's copy.
  The masked prompt positions of a copy are the one place where a mask token gets no logits
  (zeros): CFG combines them with the conditional row's prompt, which a loop never commits;
* prompt of row b: its real positions that are not response;
* rows the step computes (``rows``, (C,), shared by the batch): every row's response
  positions and, for a shifted-logits family (Dream: token i is predicted at row i-1), the
  row before each response position. A computed row is one of row b's *keys* only if it is
  row b's response (``resp_valid``): a row computed for a batch mate, or a shifted model's
  last prompt row (its K/V stay the cached ones), is a query only.

Per-row masks over shared index vectors (``prompt_idx`` + ``prompt_valid``, ``voter_idx`` +
``voter_valid``) let one graph serve rows of different lengths and layouts while every row
computes exactly what it would alone (batch invariance).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import torch

from maskkv_compile.policies import voter_positions


class NoMaskTokenError(ValueError):
    """A new prompt reached the model without any mask token to fill."""


@dataclass(frozen=True)
class Layout:
    key_valid: torch.Tensor  # (B, S) bool, False at padding
    response: torch.Tensor  # (B, S) bool
    rows: torch.Tensor  # (C,) int64 positions the step graph computes, ascending
    resp_valid: torch.Tensor  # (B, C) bool: computed row c is one of row b's response keys
    returned: torch.Tensor  # (B, C) bool: row b's logits at computed row c are returned
    read_idx: Optional[
        torch.Tensor
    ]  # (B, R) index into rows of the logits of each response position
    prompt_idx: torch.Tensor  # (P,) union of the rows' prompt positions
    prompt_valid: torch.Tensor  # (B, P)
    voter_idx: torch.Tensor  # (V,) union of the rows' voter positions
    voter_valid: torch.Tensor  # (B, V)
    twins: tuple[
        Optional[int], ...
    ]  # per row: the row index whose response a masked copy took (or None)
    # block-causal calls (``block_layout``): (S,) one past the last key of each position's
    # block, and where the last block (the one computed) starts
    key_end: Optional[torch.Tensor] = None
    block_start: Optional[int] = None
    block_shift: int = 0  # 1: the row before the block is computed too (shifted logits)
    # a block-causal call with the mask token before its last block (a loop that passes the
    # later blocks too, or refines a block that is not the last): it runs without a cache
    masks_outside_block: bool = False

    # Host-side facts, read from the device once per layout (never per step: on CUDA each
    # read is a synchronisation).
    @cached_property
    def prompt(self) -> torch.Tensor:  # (B, S) bool
        return self.key_valid & ~self.response

    @property
    def first_row(self) -> int:
        """A block layout's first computed row: the block's start, or for a shifted family the
        row before it."""
        return max(self.block_start - self.block_shift, 0)

    @cached_property
    def row_end(self) -> torch.Tensor:
        """(C,) int64: how many of the computed rows, from the first, each computed row sees as
        keys (``maskkv::cached_attention``), in a block layout that computes the row before its
        block (a shifted family: that row sees only itself); (0,), no limit, in every other
        layout (every computed row sees every other)."""
        if not self.block_shift:
            return self.rows.new_zeros((0,))
        count = self.rows.numel()
        return (self.key_end[self.rows] - self.first_row).clamp(max=count)  # rows contiguous

    @cached_property
    def padded(self) -> bool:
        """Some row has padding."""
        return not bool(self.key_valid.all())

    @cached_property
    def prompt_lens(self) -> list[int]:
        return self.prompt.sum(1).tolist()

    @cached_property
    def response_lens(self) -> list[int]:
        return self.response.sum(1).tolist()

    @cached_property
    def has_prompt(self) -> bool:
        """Every row has a prompt: only then can a later call be told apart from a new prompt."""
        return min(self.prompt_lens) > 0

    @cached_property
    def all_returned(self) -> bool:
        """Every row's logits at every computed row are returned (no batch mate's rows)."""
        return bool(self.returned.all())

    @cached_property
    def read_plan(self) -> tuple[str, Optional[torch.Tensor]]:
        """How (B, C, V) logits of the computed rows become (B, R, V) at ``read_idx``:
        ("all", None) when every row reads every computed row in order (LLaDA), ("select",
        (R,) index) when every row reads the same rows, else ("gather", (B, R) index)."""
        shared = self.read_idx[0]
        if not bool((self.read_idx == shared).all()):
            return "gather", self.read_idx
        if shared.numel() == self.rows.numel() and bool(
            (shared == torch.arange(shared.numel(), device=shared.device)).all()
        ):
            return "all", None
        return "select", shared


def _is_masked_copy(
    ids: torch.Tensor,
    masked: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_masked: torch.Tensor,
    valid: torch.Tensor,
) -> bool:
    """Row ``ids`` is ``ref_ids`` of the same call with the reference's whole prompt masked (1-D
    rows): CFG's unconditional row in LLaDA's ``cat([x, un_x])``. A row that masks only part of
    another row's prompt is a row of its own (an infilling variant, whose every mask is
    response)."""
    ref_prompt = ~ref_masked & valid
    return (
        bool(ref_prompt.any())
        and bool((masked | ~ref_masked | ~valid).all())  # masked wherever the reference is
        and bool((masked | ~ref_prompt).all())  # and at every position of the reference's prompt
        and bool(((ids == ref_ids) | masked | ~valid).all())  # equal wherever unmasked
    )


def _in_batch_reference(row: int, ids, masked, key_valid, resolved: dict) -> Optional[int]:
    """A row of this batch that ``row`` is a masked copy of; LLaDA's ``cat([x, un_x])`` pairs
    row i + B/2 with row i, so that partner wins when it qualifies."""
    batch = ids.shape[0]
    order = list(range(batch))
    if batch % 2 == 0 and row >= batch // 2:
        order.remove(row - batch // 2)
        order.insert(0, row - batch // 2)
    for ref in order:
        if ref == row or ref not in resolved or resolved[ref] is not None:
            continue  # a reference must itself be a plain (conditional) row
        if torch.equal(key_valid[ref], key_valid[row]) and _is_masked_copy(
            ids[row], masked[row], ids[ref], masked[ref], key_valid[row]
        ):
            return ref
    return None


def _mirrors(
    ids: torch.Tensor, masked: torch.Tensor, row: int, ref_ids: torch.Tensor, ref_layout: "Layout"
) -> bool:
    """Row ``row`` of ``ids`` is the same row of a session's last call ``ref_ids`` with the
    session's prompt masked, and exactly its tokens at the session's response positions."""
    prompt, response = ref_layout.prompt[row], ref_layout.response[row]
    return (
        bool(prompt.any())
        and bool((masked[row] | ~prompt).all())
        and bool(((ids[row] == ref_ids[row]) | ~response).all())
    )


def infer_layout(
    ids: torch.Tensor,
    key_valid: torch.Tensor,
    mask_token_id: int,
    *,
    shift: int,
    policy: str,
    window: int,
    previous: Optional[tuple[torch.Tensor, "Layout"]] = None,
    others: Sequence[tuple[torch.Tensor, "Layout"]] = (),
) -> Layout:
    """The layout of a new prompt. ``previous``: (last ids, layout) of the session the previous
    call ran on, when it has this call's shape and padding (a masked copy sent in its own call,
    CFG as two calls); ``others``: the other live sessions of that shape and padding, which a
    copy of ``previous`` must not mirror too with another response."""
    masked = (ids == mask_token_id) & key_valid  # (B, S)
    batch = ids.shape[0]
    response = masked.clone()
    twins: dict[int, Optional[int]] = {}
    for row in sorted(range(batch), key=lambda r: int(masked[r].sum())):  # plain rows resolve first
        ref = _in_batch_reference(row, ids, masked, key_valid, twins)
        if ref is not None:
            response[row] = response[ref]
        elif (
            previous is not None
            and _mirrors(ids, masked, row, *previous)
            and not any(  # another session that puts this row's response elsewhere
                not torch.equal(other[1].response[row], previous[1].response[row])
                and _mirrors(ids, masked, row, *other)
                for other in others
            )
        ):
            response[row] = previous[1].response[row]
        twins[row] = ref
    missing = [row for row in range(batch) if not bool(response[row].any())]
    if missing:
        raise NoMaskTokenError(
            f"no mask token (id {mask_token_id}) in row(s) {missing} of the input of shape "
            f"{tuple(ids.shape)}: the first call for a prompt must hold the mask token at every "
            "position to generate (padding excluded). Check mask_token_id, or call the original "
            "model for a plain forward pass."
        )
    return _build(
        ids.device,
        key_valid,
        response,
        shift,
        policy,
        window,
        tuple(twins[r] for r in range(batch)),
    )


def _union(per_row: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row position sets -> (sorted union (N,), membership (B, N))."""
    union = torch.unique(torch.cat(per_row)) if per_row else torch.zeros(0, dtype=torch.long)
    union = union.to(device)
    member = torch.stack([torch.isin(union, positions) for positions in per_row])
    return union, member


def _check_read_rows(key_valid: torch.Tensor, read_pos: list[torch.Tensor]) -> None:
    """A shifted family reads position i's logits at row i-1; that row must not be padding.
    A pad query sees no key, so the uncached model's logits there are whatever its attention
    makes of an empty row (zeros or NaN, by torch version): nothing to reproduce."""
    for row, rows in enumerate(read_pos):
        padded = rows[~key_valid[row, rows]]
        if padded.numel():
            at = int(padded[0])
            raise ValueError(
                f"row {row} has padding at position {at}, right before its response position "
                f"{at + 1}: this model predicts token i at row i-1 (shifted logits, as Dream), "
                "so that token would be read from a padding row, which attends to no key. Pad "
                "on the left (Dream's generate does), or after the response."
            )


def _build(device, key_valid, response, shift, policy, window, twins) -> Layout:
    prompt = key_valid & ~response
    resp_pos = [r.nonzero().flatten() for r in response]
    prompt_pos = [p.nonzero().flatten() for p in prompt]
    # where each response position's logits live (Dream: one row earlier;
    # the first row reads itself)
    read_pos = [(r - shift).clamp(min=0) for r in resp_pos]
    _check_read_rows(key_valid, read_pos)
    rows, _ = _union([torch.cat([r, q]) for r, q in zip(resp_pos, read_pos)], device)
    resp_valid = response[:, rows]
    returned = torch.stack(
        [torch.isin(rows, torch.cat([r, q])) for r, q in zip(resp_pos, read_pos)]
    )
    lengths = {int(r.numel()) for r in resp_pos}
    read_idx = (
        torch.stack([torch.searchsorted(rows, q) for q in read_pos]) if len(lengths) == 1 else None
    )
    voters = []
    for b, (p, r) in enumerate(zip(prompt_pos, resp_pos)):
        v = voter_positions(policy, p.cpu(), r.cpu(), window, -shift).to(device)
        voters.append(v[key_valid[b, v]])  # padding never votes
    prompt_idx, prompt_valid = _union(prompt_pos, device)
    voter_idx, voter_valid = _union(voters, device)
    return Layout(
        key_valid,
        response,
        rows,
        resp_valid,
        returned,
        read_idx,
        prompt_idx,
        prompt_valid,
        voter_idx,
        voter_valid,
        twins,
    )


def block_layout(
    ids: torch.Tensor,
    key_valid: torch.Tensor,
    key_end: torch.Tensor,
    mask_token_id: int,
    *,
    policy: str,
    window: int,
    shift: int = 0,
) -> Layout:
    """The layout of a block-causal call (block diffusion: the window [prompt ; finished blocks ;
    current block], ``key_end`` (S,) read from its mask). The prefix (every position before the
    last block) is the cached, evicted "prompt"; the last block is the "response": every one of
    its rows is computed at a step (the prompt tail that shares the first block, committed and
    edited tokens alike), and only its positions that hold the mask token vote. A padding
    position in the block (the tail past the generation length that diffusers' pipeline marks
    as padding) is computed as a query only, attending like the block's real rows, and its
    logits are returned: the loop reads them.

    A shifted-logits family (``shift`` 1: Fast-dLLM v2 predicts token i at row i-1) reads the
    block's first token at the last row of the finished blocks. That row sees nothing after its
    own block, so it is computed at every step too, as a row of the block with its K/V (its own
    block's end bounds its keys); the kept prefix is everything before it, and the rows that
    vote are the ones before each mask position. It stays a prompt position for routing (its
    token is part of the prefix the cache was built from)."""
    seq = ids.shape[1]
    device = ids.device
    pos = torch.arange(seq, device=device)
    masked = (ids == mask_token_id) & key_valid  # (B, S)
    # the rows computed: the last block, or, with masks before it (that call runs uncached),
    # every block from the one holding the first mask (host reads, once per layout)
    last = int((key_end == seq).nonzero()[0])
    masks_at = masked.any(0).nonzero().flatten()
    first = int(masks_at[0]) if masks_at.numel() else last
    start = min(last, int((key_end == key_end[first]).nonzero()[0]))
    computed = max(start - shift, 0)  # the first computed row (shifted: the row before)
    in_block = pos >= start  # (S,)
    response = key_valid & in_block  # (B, S)
    rows = pos[computed:]  # (C,)
    resp_valid = key_valid[:, computed:]  # (B, C)
    returned = torch.ones_like(resp_valid)
    resp_pos = [r.nonzero().flatten() for r in response]
    lengths = {int(r.numel()) for r in resp_pos}
    read_idx = (
        torch.stack([torch.searchsorted(rows, (r - shift).clamp(min=0)) for r in resp_pos])
        if len(lengths) == 1
        else None
    )
    prompt = key_valid & (pos < computed)
    prompt_pos = [p.nonzero().flatten() for p in prompt]
    voters = []
    for b, p in enumerate(prompt_pos):
        mine = (masked[b] & in_block).nonzero().flatten()
        mine = mine if mine.numel() else resp_pos[b]  # no mask left: the block's rows vote
        v = voter_positions(policy, p.cpu(), mine.cpu(), window, -shift).to(device)
        voters.append(v[key_valid[b, v]])
    prompt_idx, prompt_valid = _union(prompt_pos, device)
    voter_idx, voter_valid = _union(voters, device)
    return Layout(
        key_valid,
        response,
        rows,
        resp_valid,
        returned,
        read_idx,
        prompt_idx,
        prompt_valid,
        voter_idx,
        voter_valid,
        (None,) * ids.shape[0],
        key_end=key_end,
        block_start=start,
        block_shift=shift,
        masks_outside_block=start < last,
    )
