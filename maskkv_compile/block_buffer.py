"""Fast-dLLM v2's block cache as a runtime feature: a small-block call computes only its rows.

Fast-dLLM v2's ``batch_sample`` with ``use_block_cache=True`` refines a block of ``b`` tokens in
small blocks. A *refresh* (the whole block, no buffer) computes every row of the block and keeps
their K/V in a per-block buffer; a *small-block call* (the small block's ``n`` tokens, that
buffer, ``replace_position``) computes only the small block's rows, against every stored key and
the whole buffer: the other rows' K/V as of the last refresh (stale where the loop has since
committed tokens there), its own fresh ones written into the buffer in place. ``kv_loop.py`` turns
both into calls on the block's window and says which one it is (:func:`buffer_call`); this
feature runs them on a block-causal session:

* **Refresh** (``Transition.BLOCK_REFRESH``, or the ``EXTEND`` of a block's first call): the
  step over every computed row of the block (``step_kv``, or the re-selecting graph, which
  also returns them), and the K/V of those rows are kept for the buffer object the call makes
  (:class:`Held`).
* **Small-block call** (``Transition.BLOCK_STEP``): a step whose computed rows are the small
  block's, against [kept prefix ; the held K/V of every other computed row of the refresh]
  (``dual_cache.merge_layer``, merged once per small block and reused by its later calls), and
  the small block's fresh K/V written into the held ones, as the released buffer takes them.
  At a budget of at least the prefix this is the released model's computation, stale K/V
  included: tokens equal its loop's. Built from host integers, it reads nothing from the
  device beyond routing's one read.

Routing (``routing.decide``) sends a small-block call to BLOCK_STEP only when the session holds
the K/V of the very buffer object the call passes and no re-vote is due; otherwise the whole
block is computed, as without the block cache (``Fallback.BLOCK_BUFFER_LOST`` when the buffer
is not held: another session's buffer, or the window was prefilled again). A prefill or an
extend drops what the session held.

Invariants: the held K/V cover exactly the refresh's computed rows (``Held.rows`` of them,
contiguous from ``Held.first``: the block, and for a shifted family the row before it); a
small-block step computes only rows of the block, each sees every kept prefix entry and every
other row of the block once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from maskkv_compile.dual_cache import StepView, merge_layer
from maskkv_compile.layout import Layout
from maskkv_compile.routing import Transition
from maskkv_compile.session import Feature, Session

if TYPE_CHECKING:
    from maskkv_compile.routing import Plan
    from maskkv_compile.session import Call


@dataclass(frozen=True)
class BufferCall:
    """What a call of the block cache is: a refresh (``at`` None) that makes ``buffer``, or a
    small-block call of ``n`` tokens at ``at`` in the block, which passes ``buffer``."""

    buffer: object  # kv_loop.BlockBuffer (compared by identity)
    at: Optional[int] = None
    n: int = 0

    @property
    def kind(self) -> str:
        return "refresh" if self.at is None else "small"


_CALL: contextvars.ContextVar[Optional[BufferCall]] = contextvars.ContextVar(
    "maskkv_block_buffer_call", default=None
)


@contextlib.contextmanager
def buffer_call(call: Optional[BufferCall]):
    """The model calls made in this block are this block-cache call (``kv_loop.py`` sets it)."""
    token = _CALL.set(call)
    try:
        yield
    finally:
        _CALL.reset(token)


class SmallView(NamedTuple):
    """The step view of one small block: its (at, n) in the block, the view, and the column of
    its first row among the refresh's rows."""

    at_n: tuple[int, int]
    view: StepView
    column: int

    @property
    def columns(self) -> slice:
        """The small block's columns among the refresh's rows."""
        return slice(self.column, self.column + self.at_n[1])


@dataclass
class Held:
    """The K/V of a refresh's computed rows, for the buffer object it made, and the step view of
    the last small block (its (at, n), the view, and its first column), which the small block's
    later calls reuse: between a refresh and the next step of another kind nothing it merges
    changes (the kept prefix, the other rows' K/V)."""

    buffer: weakref.ref  # the kv_loop.BlockBuffer
    first: int  # the position of the refresh's first computed row: column c is row first + c
    kv: list  # per layer (k, v), (B, Hkv, C, D)
    view: Optional[SmallView] = None

    @property
    def rows(self) -> int:
        return self.kv[0][0].shape[2]

    @property
    def bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


@dataclass(frozen=True)
class SmallBlock:
    """The logits contract of a small-block step (``runtime._with_logits``): its layout and the
    response columns it covers."""

    layout: Layout
    start: int
    stop: int


def small_block_view(session: Session, held: Held, at: int, n: int) -> tuple[StepView, int]:
    """The step view of a small-block call of ``n`` rows at ``at`` in the block, and the column
    of its first row among the refresh's rows. Built from host integers: no device read."""
    layout = session.layout
    position = layout.block_start + at  # the small block's first row
    column = position - held.first
    batch = layout.key_valid.shape[0]
    device = layout.rows.device
    small = dataclasses.replace(
        layout,
        rows=layout.rows[column : column + n],  # (n,): the refresh's rows are contiguous
        resp_valid=layout.key_valid[:, position : position + n],
        returned=torch.ones((batch, n), dtype=torch.bool, device=device),
        # (B, n): each small-block row's own logits (kv_loop reads the call's rows of the
        # (B, S, V) form and refuses response_logits_only(); kept well-formed)
        read_idx=torch.arange(n, device=device).expand(batch, n),
        block_shift=0,  # the small block's rows see each other: no row limit
    )
    # host facts known by construction, so no step reads them from the device
    vars(small).update(all_returned=True, read_plan=("all", None))
    others = torch.cat(
        [torch.arange(column, device=device), torch.arange(column + n, held.rows, device=device)]
    ).expand(batch, -1)  # (B, C - n): the columns of every other row of the refresh
    kept = [
        merge_layer(cache.kept_k, cache.kept_v, cache.kept_len, k, v, others)
        for cache, (k, v) in zip(session.layers, held.kv)
    ]
    return StepView(small, kept, SmallBlock(small, at, at + n)), column


def call_kind() -> Optional[str]:
    """What the call being routed is to the block cache: "refresh", "small", or None."""
    call = _CALL.get()
    return None if call is None else call.kind


class BlockBufferCache(Feature):
    """Fast-dLLM v2's block cache on block-causal sessions (module docstring)."""

    name = "block_buffer"

    def start(self, session: Session) -> None:
        session.state[self.name] = _State()
        return None

    def holds(self, session: Session) -> bool:
        """The session holds the K/V of the buffer the small-block call being routed passes."""
        held, call = session.state[self.name].held, _CALL.get()
        return (
            call is not None
            and call.kind == "small"
            and held is not None
            and held.buffer() is call.buffer
        )

    def prefill_outputs(self, session: Session, named: dict) -> None:
        session.state[self.name].held = None

    def extend(self, session: Session, finished: Layout, response_kv: list) -> bool:
        session.state[self.name].held = None
        return False

    def step_view(self, session: Session, plan: "Plan") -> Optional[StepView]:
        if not _small(session, plan):
            return None
        held, call = session.state[self.name].held, _CALL.get()
        if held.view is None or held.view.at_n != (call.at, call.n):
            held.view = SmallView(
                (call.at, call.n), *small_block_view(session, held, call.at, call.n)
            )
        return held.view.view

    def step_graph(self, session: Session, plan: "Plan", call: "Call", inputs: dict):
        if _refresh(session, plan) or _small(session, plan):
            return "step_kv"  # a re-selecting graph chosen after this returns them too
        return None

    def step_outputs(self, session: Session, plan: "Plan", named: dict) -> None:
        state = session.state[self.name]
        if _refresh(session, plan):
            kv = [(k.clone(), v.clone()) for k, v in named["response_kv"]]
            state.held = Held(weakref.ref(_CALL.get().buffer), session.layout.first_row, kv)
            state.refreshes += 1
        elif _small(session, plan):  # the small block's fresh K/V into the buffer
            cols = state.held.view.columns
            for (k, v), (fresh_k, fresh_v) in zip(state.held.kv, named["response_kv"]):
                k[:, :, cols] = fresh_k
                v[:, :, cols] = fresh_v
            state.small_steps += 1
        elif state.held is not None:  # another step may change the kept prefix: merge again
            state.held.view = None

    def stats(self, session: Optional[Session]) -> dict:
        """``cache_stats()["block_buffer"]``: the K/V held for Fast-dLLM v2's block cache (bytes,
        rows) and this session's refreshes and small-block steps; None without one."""
        state = None if session is None else session.state.get(self.name)
        if state is None or (state.held is None and not state.refreshes):
            return {"block_buffer": None}
        held = state.held
        return {
            "block_buffer": {
                "rows": None if held is None else held.rows,
                "bytes": 0 if held is None else held.bytes,
                "refreshes": state.refreshes,
                "small_steps": state.small_steps,
            }
        }


def _refresh(session: Session, plan: "Plan") -> bool:
    """The step is a block-cache refresh: it keeps the block rows' K/V."""
    return (
        call_kind() == "refresh"
        and session.layout.block_start is not None
        and plan.transition in (Transition.BLOCK_REFRESH, Transition.EXTEND)
    )


def _small(session: Session, plan: "Plan") -> bool:
    """The step is a small-block call on the K/V the session holds (routing made it so)."""
    return plan.transition is Transition.BLOCK_STEP and session.layout.block_start is not None


@dataclass
class _State:
    held: Optional[Held] = None
    refreshes: int = 0  # of this session
    small_steps: int = 0
