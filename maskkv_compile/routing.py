"""The routing rules of the MaskKV runtime, as one pure decision.

Every call of a MaskKV model is routed by :func:`decide`: from what the runtime holds (its
live sessions, :class:`SessionState`) and what the call shows (:class:`CallFacts`, and per
live session :class:`SessionFacts`, computed on the device and read once), to a
:class:`Plan`: which :class:`Transition` runs, on which session, and why. Nothing here
touches a tensor; ``runtime.py`` gathers the facts and executes the plan, and
``tests/test_routing_table.py`` checks every rule as a table of cases.

The rules, in the order they are tried:

1. STALE: a session whose prefill ran with other weights (a parameter or buffer of the
   model was written in place, replaced, or changed dtype or device since: ``load_state_dict``,
   an optimizer step, ``.to(dtype)``) is dropped before anything else; a call that continues
   it is a NEW prompt, counted as a re-prefill for "weights changed".
2. CONTINUE: the first live session (most recent first) whose facts say the call continues
   it: same shape, device, padding and block ends, same tokens and per-token inputs at every
   prompt position, and the same values of every other tensor input. Of several, one it
   continues without a restart (3.) first, and of those one whose committed response tokens
   the call holds (two generations of one prompt served in turn: each goes on with the
   session its own last call left).
3. RESTART: a continuing call in which a response position that held a committed token at
   the session's last call holds the mask token again is a new generation: NEW layout,
   prefill (``Transition.RESTART``), in a session of its own; the restarted one stays live
   for the generation that left it. So is, for a block window whose last call was its
   prefill, the very same call again (block loops commit a token at every call: it is a
   generation of one call per window run again).
4. REFRESH: a continuing call that is the ``prompt_refresh``-th since the prefill reruns
   the prefill on the same layout.
5. STEP / BLOCK_REFRESH / BLOCK_STEP: any other continuing call runs the step graph. With
   the dual cache active for the session (``dual_cache.py``) and a mask left in the call,
   a call whose current block is the cached one is a BLOCK_STEP, any other a BLOCK_REFRESH.
   A loop that committed a token outside the cached block since the last call does not
   follow the block grid: the session leaves the dual cache (``Fallback``), and the call
   is a plain STEP. ``revote`` marks the plan (``Plan.revote``) at a due step
   (every k-th step) or block refresh (``revote="block"``). Fast-dLLM v2's block cache
   (``block_buffer.py``) says what a call is itself (``CallFacts.block_buffer``): a refresh
   is a BLOCK_REFRESH, a small-block call a BLOCK_STEP when the session holds its buffer's
   K/V and no re-vote is due, else a STEP of the whole block (``Fallback.BLOCK_BUFFER_LOST``
   when the buffer is not held).
6. EXTEND: a block-causal call (block diffusion) that is a live block session's window grown
   by one block (same prefix, the old window's block ends kept, one new block, no mask token
   left before it) extends it, one whose committed block tokens the call holds first
   (tried before CONTINUE when the continued session is older than the grown one, unless
   only the continued one holds the call's committed tokens, or when the call restarts it: a
   block loop run again on one prompt meets its earlier run's sessions):
   the finished block is computed once with its final tokens and joins the cached prefix, and
   the new block runs as a step (``runtime._run_extend``). A block-causal call that holds the
   mask token before its last block runs UNCACHED (``Fallback.BLOCK_NOT_LAST``).
7. NEW: any other call is a new prompt. Its layout comes from its own tokens
   (``layout.py``); when some row has no prompt (an all-mask row that copies no
   conditional row) nothing could tell its next call from a new prompt, so it runs the
   prefill UNCACHED (no session is kept) and says why. A NEW call that continues a session
   this runtime dropped (more than ``max_sessions`` prompts, or stale weights) is counted
   as a re-prefill with that reason.

Every reason for running without the cache, or re-running a prefill the loop did not ask
for, is a :class:`Fallback`: counted in ``cache_stats()["fallbacks"]`` and warned once per
reason and runtime (invariant I3 of ``tests/test_invariants.py``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence


class Transition(str, enum.Enum):
    """What a call runs; the value is the key it is counted under in ``cache_stats()``."""

    NEW = "new"  # prefill of a new prompt (a session is kept)
    RESTART = "restart"  # prefill of a new generation of a live session's prompt
    REFRESH = "refresh"  # prefill on a live session's layout (``prompt_refresh``)
    STEP = "step"  # the step graph over every computed row
    # the step graph over every row; the block's dual cache (or block-cache buffer) is built
    BLOCK_REFRESH = "block_refresh"
    # the step graph over the current block's (or small block's) rows
    BLOCK_STEP = "block_step"
    EXTEND = "extend"  # a block-causal window grown by one block (``Plan.session``'s)
    UNCACHED = "uncached"  # a prefill whose session cannot be kept (``Plan.reason`` says why)

    @property
    def is_prefill(self) -> bool:
        return self in (Transition.NEW, Transition.RESTART, Transition.REFRESH, Transition.UNCACHED)


class Fallback(str, enum.Enum):
    """Why a call ran slower than the cached path; each is counted and warned once."""

    NO_PROMPT = (
        "a row has no prompt (an all-mask row copying no conditional row): prefill without a cache"
    )
    WEIGHTS_CHANGED = (
        "the model's weights changed since the prefill: the prompt was prefilled again"
    )
    SESSION_DROPPED = (
        "a prompt whose session was dropped (more than max_sessions prompts in turn) came back: "
        "prefilled again; raise max_sessions to keep them all"
    )
    BLOCK_GRID = (
        "the dual cache is off for this prompt: its response length is not a multiple of "
        "block_length (a generation resumed after its cache was lost, or a loop whose blocks "
        "do not tile the response), so the loop's block grid cannot be told; plain steps run"
    )
    BLOCK_OFF_GRID = (
        "the dual cache is off for this prompt: the loop committed a token outside the block "
        "being computed, so it does not denoise block by block with block_length; plain steps run"
    )
    BLOCK_NO_MASK = (
        "a block-causal window's first call holds no mask token in its last block, so nothing "
        "votes for the prefix to keep: it ran whole, without a cache (if the loop's blocks do "
        "start masked, mask_token_id is not the mask token the loop writes)"
    )
    BLOCK_NOT_LAST = (
        "a block-causal call holds the mask token before its last block (the loop passes later "
        "blocks too, or refines a block that is not the last): it ran whole, without a cache; "
        "call the model on the window [prompt ; finished blocks ; current block]"
    )
    BLOCK_BUFFER_LOST = (
        "a small-block call of Fast-dLLM v2's block cache came to a session that does not hold "
        "its buffer's K/V (the buffer is another session's, or its block was prefilled again: "
        "another prompt, reset(), a weight change): the whole block was computed, as without "
        "the block cache"
    )
    RAGGED_BLOCKS = (
        "the dual cache is off for this prompt: rows have different numbers of response "
        "positions; plain steps run"
    )


@dataclass(frozen=True)
class SessionState:
    """What routing needs of a live session (host facts, no tensors)."""

    steps_since_prefill: int  # step calls since its prefill or refresh
    cached_block: Optional[int]  # the block whose dual cache is built (None: none)
    dual_cache: bool  # the dual cache applies to it
    weights: object  # the weight signature of its prefill
    buffer_held: bool = False  # it holds the K/V of the call's block-cache buffer


@dataclass(frozen=True)
class SessionFacts:
    """What a call shows about one live session (read from the device in one go)."""

    continues: bool
    restarted: bool = False
    current_block: Optional[int] = (
        None  # lowest block holding a mask (None: none left / no dual cache)
    )
    off_grid: bool = False  # a token was committed outside the cached block since the last call
    extends: bool = False  # the call is its block-causal window grown by one block
    # the call holds the tokens the session's last call had committed in its response (one of
    # two sessions of one prompt is this generation's: the one its last call left)
    agrees: bool = True


@dataclass(frozen=True)
class CallFacts:
    weights: object  # the weight signature now
    dropped: Optional[Fallback] = None  # the call continues a session this runtime dropped, and why
    block_buffer: Optional[str] = None  # Fast-dLLM v2's block cache: "refresh" or "small"


@dataclass(frozen=True)
class Schedule:
    """When a continuing call re-runs the prefill or re-votes (from ``MaskKVConfig``); not the
    eviction policy."""

    prompt_refresh: Optional[int] = None
    revote: Optional[object] = None  # None, an int k, or "block"


@dataclass(frozen=True)
class Plan:
    transition: Transition
    session: Optional[int] = None  # index into the live sessions (None: a new layout)
    block: Optional[int] = None  # the current block at a block refresh / step
    revote: bool = False  # run the re-vote graph (a due step or block refresh)
    stale: tuple[int, ...] = ()  # live sessions to drop first: their weights are not the model's
    fallback: Optional[Fallback] = None  # why this call is slower than the cached path
    leave_dual_cache: bool = False  # the session stops using the dual cache (``fallback`` says why)


def decide(
    sessions: Sequence[SessionState],
    facts: Sequence[Optional[SessionFacts]],
    call: CallFacts,
    schedule: Schedule,
) -> Plan:
    """The plan for one call. ``facts[i]`` is None when host facts already rule session i out
    (another shape or device). A NEW plan may still become UNCACHED once its layout is known
    (:func:`new_prompt`)."""
    stale = tuple(i for i, s in enumerate(sessions) if s.weights != call.weights)
    live = [None if i in stale else f for i, f in enumerate(facts)]
    continued = [i for i, f in enumerate(live) if f is not None and f.continues]
    # Generations of one prompt served in turn each go on with the session their last call
    # left: among sessions the call continues, one it steps on beats one it would restart, and
    # one whose committed tokens it holds beats one whose it does not (most recent first else)
    steps = [i for i in continued if not facts[i].restarted]
    match = _agreeing(steps, facts) if steps else (continued[0] if continued else None)
    grown = _agreeing([i for i, f in enumerate(live) if f is not None and f.extends], facts)
    if grown is not None and (
        match is None
        or facts[match].restarted
        # the newer one, unless only the continued one is what this generation's call left
        or (grown < match and (facts[grown].agrees or not facts[match].agrees))
    ):
        # A window grown by one block is stronger evidence than a session of the same window
        # from an earlier run of the loop: a block loop run twice on one prompt reaches, at
        # each window, its own grown session as well as the earlier run's session of that
        # window (whose block holds masks again, or, with one step a block, the very same
        # call). The grown session is the loop's when it ran more recently (sessions are most
        # recent first). The extend is what a first run does there: exact, and cheaper.
        return Plan(Transition.EXTEND, grown, revote=schedule.revote is not None, stale=stale)
    if match is None:
        continued_stale = any(facts[i] is not None and facts[i].continues for i in stale)
        fallback = Fallback.WEIGHTS_CHANGED if continued_stale else call.dropped
        return Plan(Transition.NEW, stale=stale, fallback=fallback)
    state, fact = sessions[match], facts[match]
    if fact.restarted:
        return Plan(Transition.RESTART, match, stale=stale)
    if (
        schedule.prompt_refresh is not None
        and state.steps_since_prefill + 1 >= schedule.prompt_refresh
    ):
        return Plan(Transition.REFRESH, match, stale=stale)
    every = schedule.revote if isinstance(schedule.revote, int) else None
    due = every is not None and (state.steps_since_prefill + 1) % every == 0
    if call.block_buffer == "refresh":
        return Plan(Transition.BLOCK_REFRESH, match, revote=due, stale=stale)
    if call.block_buffer == "small":
        if state.buffer_held and not due:
            return Plan(Transition.BLOCK_STEP, match, stale=stale)
        lost = None if state.buffer_held else Fallback.BLOCK_BUFFER_LOST
        return Plan(Transition.STEP, match, revote=due, stale=stale, fallback=lost)
    if state.dual_cache and fact.off_grid:
        return Plan(
            Transition.STEP,
            match,
            stale=stale,
            fallback=Fallback.BLOCK_OFF_GRID,
            leave_dual_cache=True,
        )
    if state.dual_cache and fact.current_block is not None:
        if fact.current_block == state.cached_block:
            return Plan(Transition.BLOCK_STEP, match, fact.current_block, stale=stale)
        return Plan(
            Transition.BLOCK_REFRESH,
            match,
            fact.current_block,
            revote=schedule.revote == "block",
            stale=stale,
        )
    return Plan(Transition.STEP, match, revote=due, stale=stale)


def _agreeing(candidates: list[int], facts) -> Optional[int]:
    """The first candidate session whose committed tokens the call holds, else the first."""
    return next((i for i in candidates if facts[i].agrees), candidates[0] if candidates else None)


def new_prompt(
    plan: Plan,
    has_prompt: bool,
    block: bool = False,
    block_not_last: bool = False,
    block_without_masks: bool = False,
) -> Plan:
    """A NEW plan once the call's layout is known: UNCACHED when some row has no prompt (for a
    block-causal call: no prefix before its last block, a window of one block, which runs whole
    and is no slower so; masks before its last block; or no mask in its last block at all,
    where nothing would vote)."""
    if plan.transition is not Transition.NEW:
        return plan
    if block_not_last:
        return Plan(Transition.UNCACHED, stale=plan.stale, fallback=Fallback.BLOCK_NOT_LAST)
    if block_without_masks and has_prompt:
        return Plan(Transition.UNCACHED, stale=plan.stale, fallback=Fallback.BLOCK_NO_MASK)
    if not has_prompt:
        return Plan(
            Transition.UNCACHED, stale=plan.stale, fallback=None if block else Fallback.NO_PROMPT
        )
    return plan
