"""The dual cache (``MaskKVConfig.block_length``): a step computes only the current block.

Semi-autoregressive loops (LLaDA's ``generate(..., block_length=...)``) denoise the response
block by block. Fast-dLLM's *dual cache* caches the K/V of every response row outside the
block being denoised and recomputes only that block's rows; this module is its bookkeeping
for the MaskKV runtime. The rule, evidence from the call alone (``runtime.py`` routes):

* Blocks: each row's response positions, in ascending order, are cut into blocks of
  ``block_length``. The grid must be the loop's, so the dual cache applies only when every
  row has the same number of response positions, a multiple of ``block_length``: a loop's
  fresh generation (LLaDA's loop requires ``gen_length % block_length == 0``) and a
  generation whose session was lost at a block boundary. A prompt prefilled mid-block (its
  session was lost: another prompt, ``reset()``, more prompts than ``max_sessions``) would
  cut blocks that straddle the loop's, so it runs plain steps instead, every response row
  computed (``routing.Fallback.BLOCK_GRID``; counted and warned, never wrong).
* Current block of a call: the lowest block that holds a mask token in some row (``None``
  when no mask is left: a plain step).
* Block refresh: a call that would run the step graph and whose current block is not the
  one cached (the first step after every prefill or prompt refresh, and the first call of
  each new block) runs the step graph over every response row, exactly today's step, and
  keeps each layer's response K/V (``ResponseKVOutputsPass``). Per layer the runtime then
  builds a merged cache: per (row, KV head) the kept prompt entries followed by the K/V of
  the row's response positions outside the current block (``kept_len`` grows by their
  number).
* Block step: the block's later calls run the same step graph with the block's rows (plus
  Dream's read rows, query only) as the computed rows and the merged cache as the kept K/V:
  the block's queries attend to [kept prompt ; cached other response rows ; the block's
  fresh K/V].

Logits of response rows outside the current block come back as zeros at a block step (in
the (B, S, V) and the (B, R, V) forms; with ``reuse_logits`` the (B, S, V) buffer keeps what
an earlier call wrote there). LLaDA's loop reads only the current block, so give
``block_length`` the loop's block length; ``MaskKVModel.generate`` uses its own
``block_length`` argument for its generation (``generation_block_length``), and the wrapped
model's own ``*generate`` methods (Dream's ``diffusion_generate``, not a block loop) run with
the dual cache off. A loop that commits a token outside the block being computed shows that
it does not follow the grid: the session leaves the dual cache at that call
(``Fallback.BLOCK_OFF_GRID``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from maskkv_compile.layout import Layout
from maskkv_compile.routing import Fallback, Plan, Transition
from maskkv_compile.session import Call, Feature, Session

_UNSET = object()
_GENERATION_BLOCK_LENGTH: contextvars.ContextVar = contextvars.ContextVar(
    "maskkv_block_length", default=_UNSET
)


@contextlib.contextmanager
def generation_block_length(block_length: Optional[int]):
    """Sessions made inside this block use this block length (None: no dual cache) instead of
    the config's: a generation loop that knows its own block length says so here."""
    token = _GENERATION_BLOCK_LENGTH.set(block_length)
    try:
        yield
    finally:
        _GENERATION_BLOCK_LENGTH.reset(token)


@dataclass
class BlockCache:
    index: int  # the current block
    outside: torch.Tensor  # (B, S) bool: the response positions outside the block
    start: int  # its response columns [start, stop) in each row's ordered response positions
    stop: int
    layout: Layout  # the full layout with rows / resp_valid / returned / read_idx of the block
    layers: list[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ]  # per layer (kept_k, kept_v, kept_len), merged

    @property
    def bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v, _ in self.layers)


def response_positions(
    layout: Layout, block_length: int
) -> tuple[Optional[torch.Tensor], Optional[Fallback]]:
    """(B, R) each row's response positions in order, or (None, why blocks do not apply)."""
    lengths = layout.response_lens
    if len(set(lengths)) != 1:
        return None, Fallback.RAGGED_BLOCKS
    if lengths[0] % block_length:
        return None, Fallback.BLOCK_GRID
    return torch.stack([row.nonzero().flatten() for row in layout.response]), None


def current_block(masked: torch.Tensor, positions: torch.Tensor, block_length: int) -> torch.Tensor:
    """0-d int64 on the device: the lowest block holding a mask token in some row (``masked``
    (B, S) bool), -1 when no mask is left (computed on the device: the runtime reads it with
    its other evidence)."""
    masked = masked.gather(1, positions).any(0)  # (R,)
    width = masked.numel()
    first = torch.where(masked, torch.arange(width, device=masked.device), width).min()
    return torch.where(first < width, first // block_length, -1)


def block_layout(
    layout: Layout, positions: torch.Tensor, start: int, stop: int, shift: int
) -> Layout:
    """``layout`` with the computed rows restricted to response columns [start, stop) of every
    row (and, for a shifted family, the row before each of them, query only)."""
    block = positions[:, start:stop]  # (B, n)
    read = (block - shift).clamp(min=0)
    rows = torch.unique(torch.cat([block.flatten(), read.flatten()]))  # sorted
    in_block = torch.zeros_like(layout.response).scatter_(1, block, True)
    returned = torch.stack([torch.isin(rows, torch.cat([b, r])) for b, r in zip(block, read)])
    out = dataclasses.replace(
        layout,
        rows=rows,
        resp_valid=in_block[:, rows],
        returned=returned,
        read_idx=torch.searchsorted(rows, read),
    )
    _ = (
        out.read_plan,
        out.all_returned,
    )  # read the host facts now, at the block refresh, not at its steps
    return out


def merge_layer(kept_k, kept_v, kept_len, k, v, columns):
    """[kept prompt ; the response K/V at ``columns`` (B, m) of the computed rows] as a padded
    per-(row, KV head) prefix: the m entries go right after each (row, head)'s kept ones."""
    batch, heads = kept_len.shape
    m = columns.shape[1]
    steps = torch.arange(m, device=kept_len.device)
    dest = (kept_len[..., None] + steps)[..., None]  # (B, Hkv, m, 1)

    def one(kept, fresh):
        dim = fresh.shape[-1]
        picked = fresh.gather(2, columns[:, None, :, None].expand(batch, heads, m, dim))
        merged = torch.cat([kept, kept.new_zeros((batch, heads, m, dim))], dim=2)
        return merged.scatter_(2, dest.expand(-1, -1, -1, dim), picked.to(kept.dtype))

    return one(kept_k, k), one(kept_v, v), kept_len + m


def build_block_cache(
    index: int,
    block_length: int,
    layout: Layout,
    positions: torch.Tensor,
    shift: int,
    prompt_layers,
    response_kv: list[tuple[torch.Tensor, torch.Tensor]],
) -> BlockCache:
    """At a block refresh: ``response_kv`` holds each layer's K/V of ``layout.rows``."""
    start = index * block_length
    stop = min(start + block_length, positions.shape[1])
    others = torch.cat(
        [positions[:, :start], positions[:, stop:]], dim=1
    )  # (B, m) response outside the block
    columns = torch.searchsorted(layout.rows, others)
    layers = [
        merge_layer(cache.kept_k, cache.kept_v, cache.kept_len, k, v, columns)
        for cache, (k, v) in zip(prompt_layers, response_kv)
    ]
    outside = layout.response.clone()
    outside.scatter_(1, positions[:, start:stop], False)
    return BlockCache(
        index, outside, start, stop, block_layout(layout, positions, start, stop, shift), layers
    )


@dataclass
class DualCacheState:
    block_length: Optional[int]
    positions: Optional[torch.Tensor] = (
        None  # (B, R) each row's response positions (None: plain steps)
    )
    fallback: Optional[Fallback] = None  # why the dual cache does not apply
    block: Optional[BlockCache] = None  # the current block's merged caches


@dataclass(frozen=True)
class StepView:
    """What a block step computes instead of the session's layout."""

    layout: Layout
    kept: list  # per layer (kept_k, kept_v, kept_len), merged
    block: BlockCache


class DualCache(Feature):
    """The dual cache as a runtime feature (``config.block_length``)."""

    name = "dual_cache"

    def __init__(self, block_length: int, shift: int, mask_token_id: int):
        self.block_length = block_length
        self.shift = shift
        self.mask_token_id = mask_token_id

    def start(self, session: Session) -> Optional[Fallback]:
        length = _GENERATION_BLOCK_LENGTH.get()
        state = DualCacheState(self.block_length if length is _UNSET else length)
        if session.layout.block_start is not None:  # a block-causal call caches its own prefix
            state.block_length = None
        if state.block_length is not None:
            state.positions, state.fallback = response_positions(session.layout, state.block_length)
        session.state[self.name] = state
        return state.fallback

    def active(self, session: Session) -> bool:
        return session.state[self.name].positions is not None

    def evidence(self, session: Session, call: Call) -> dict[str, torch.Tensor]:
        state = session.state[self.name]
        if state.positions is None:
            return {}
        facts = {"current_block": current_block(call.masked, state.positions, state.block_length)}
        if state.block is not None:
            # a commit outside the block since the last call: not the loop's grid
            facts["off_grid"] = ((session.masked > call.masked) & state.block.outside).any()
        return facts

    def prefill_outputs(self, session: Session, named: dict) -> None:
        session.state[self.name].block = None  # the next step is a block refresh

    def step_view(self, session: Session, plan: Plan) -> Optional[StepView]:
        state = session.state[self.name]
        if plan.leave_dual_cache:
            state.positions, state.block, state.fallback = None, None, plan.fallback
        if plan.transition is Transition.BLOCK_STEP and state.block is not None:
            return StepView(state.block.layout, state.block.layers, state.block)
        return None  # (a BLOCK_STEP of a block-causal window is the block cache's)

    def step_outputs(self, session: Session, plan: Plan, named: dict) -> None:
        state = session.state[self.name]
        if plan.transition is Transition.BLOCK_REFRESH and state.positions is not None:
            state.block = build_block_cache(
                plan.block,
                state.block_length,
                session.layout,
                state.positions,
                self.shift,
                session.layers,
                named["response_kv"],
            )

    def cached_block(self, session: Session) -> Optional[int]:
        block = session.state[self.name].block
        return None if block is None else block.index

    def stats(self, session: Optional[Session]) -> dict:
        """``cache_stats()["block_cache"]``: current block, the response columns it covers,
        bytes of the merged per-layer caches, and why the dual cache does not apply, if so."""
        state = None if session is None else session.state[self.name]
        block = None if state is None else state.block
        return {
            "block_cache": {
                "block_length": self.block_length if state is None else state.block_length,
                "current_block": None if block is None else block.index,
                "columns": None if block is None else (block.start, block.stop),
                "bytes": 0 if block is None else block.bytes,
                "note": None if state is None or state.fallback is None else state.fallback.value,
            }
        }
