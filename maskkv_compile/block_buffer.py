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
  (``dual_cache.merge_layer``), and the small block's fresh K/V written into the held ones,
  as the released buffer takes them. At a budget of at least the prefix this is the released
  model's computation, stale K/V included: tokens equal its loop's.

Routing (``routing.decide``) sends a small-block call to BLOCK_STEP only when the session holds
the K/V of the very buffer object the call passes and no re-vote is due; otherwise the whole
block is computed, as without the block cache (``Fallback.BLOCK_BUFFER_LOST`` when the buffer
is not held: another session's buffer, or the window was prefilled again). A prefill or an
extend drops what the session held.

Invariants: the held K/V cover exactly the refresh's computed rows (``Held.rows``: the block,
and for a shifted family the row before it); a small-block step computes only rows of the
block, each sees every kept prefix entry and every other row of the block once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

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


def current_call() -> Optional[BufferCall]:
    return _CALL.get()


@dataclass
class Held:
    """The K/V of a refresh's computed rows, for the buffer object it made."""

    buffer: weakref.ref  # the kv_loop.BlockBuffer
    rows: torch.Tensor  # (C,) the refresh's computed rows, ascending
    kv: list  # per layer (k, v), (B, Hkv, C, D)

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


def small_block_view(
    session: Session, held: Held, at: int, n: int
) -> tuple[StepView, torch.Tensor]:
    """The step view of a small-block call of ``n`` rows at ``at`` in the block, and (n,) the
    columns of those rows in ``held.rows``."""
    layout = session.layout
    first = layout.block_start + at
    mine = (held.rows >= first) & (held.rows < first + n)  # (C,)
    columns = mine.nonzero().flatten()  # (n,)
    rows = held.rows[columns]
    batch = layout.key_valid.shape[0]
    small = dataclasses.replace(
        layout,
        rows=rows,
        resp_valid=layout.key_valid[:, rows],
        returned=torch.ones((batch, n), dtype=torch.bool, device=rows.device),
        # (B, n): each small-block row's own logits (kv_loop reads the call's rows of the
        # (B, S, V) form and refuses response_logits_only(); kept well-formed)
        read_idx=torch.arange(n, device=rows.device).expand(batch, n),
        block_shift=0,  # the small block's rows see each other: no row limit
    )
    others = (~mine).nonzero().flatten().expand(batch, -1)  # (B, C - n)
    kept = [
        merge_layer(cache.kept_k, cache.kept_v, cache.kept_len, k, v, others)
        for cache, (k, v) in zip(session.layers, held.kv)
    ]
    return StepView(small, kept, SmallBlock(small, at, at + n)), columns


class BlockBufferCache(Feature):
    """Fast-dLLM v2's block cache on block-causal sessions (module docstring)."""

    name = "block_buffer"

    def start(self, session: Session) -> None:
        session.state[self.name] = _State()
        return None

    def holds(self, session: Session, call: Optional[BufferCall]) -> bool:
        """The session holds the K/V of this small-block call's buffer."""
        held = session.state[self.name].held
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
        state = session.state[self.name]
        state.columns = None
        if plan.transition is not Transition.BLOCK_STEP or session.layout.block_start is None:
            return None
        call = current_call()
        view, state.columns = small_block_view(session, state.held, call.at, call.n)
        return view

    def step_graph(self, session: Session, plan: "Plan", call: "Call", inputs: dict):
        if self._refresh(session, plan) or session.state[self.name].columns is not None:
            return "step_kv"  # a re-selecting graph chosen after this returns them too
        return None

    def step_outputs(self, session: Session, plan: "Plan", named: dict) -> None:
        state = session.state[self.name]
        if self._refresh(session, plan):
            kv = [(k.clone(), v.clone()) for k, v in named["response_kv"]]
            state.held = Held(weakref.ref(current_call().buffer), session.layout.rows, kv)
            state.refreshes += 1
        elif state.columns is not None:  # the small block's fresh K/V into the buffer
            for (k, v), (fresh_k, fresh_v) in zip(state.held.kv, named["response_kv"]):
                k[:, :, state.columns] = fresh_k.to(k.dtype)
                v[:, :, state.columns] = fresh_v.to(v.dtype)
            state.small_steps += 1
            state.columns = None

    @staticmethod
    def _refresh(session: Session, plan: "Plan") -> bool:
        call = current_call()
        return (
            call is not None
            and call.kind == "refresh"
            and session.layout.block_start is not None
            and plan.transition in (Transition.BLOCK_REFRESH, Transition.EXTEND)
        )

    def stats(self, session: Optional[Session]) -> dict:
        """``cache_stats()["block_buffer"]``: the K/V held for Fast-dLLM v2's block cache (bytes,
        rows) and this session's refreshes and small-block steps; None without one."""
        state = None if session is None else session.state.get(self.name)
        if state is None or (state.held is None and not state.refreshes):
            return {"block_buffer": None}
        held = state.held
        return {
            "block_buffer": {
                "rows": None if held is None else held.rows.numel(),
                "bytes": 0 if held is None else held.bytes,
                "refreshes": state.refreshes,
                "small_steps": state.small_steps,
            }
        }


@dataclass
class _State:
    held: Optional[Held] = None
    columns: Optional[torch.Tensor] = None  # (n,) the small block's columns in held.rows
    refreshes: int = 0  # of this session
    small_steps: int = 0
