"""``routing.decide`` as a table: every rule, and the cases that sit between two rules.

The decision is a pure function of host facts, so each row states the sessions, the facts a
call shows about each, and the plan; nothing here runs a model."""

import pytest

from maskkv_compile.routing import (
    CallFacts,
    Fallback,
    Plan,
    Schedule,
    SessionFacts,
    SessionState,
    Transition,
    decide,
    new_prompt,
)

W, W2 = ("w", 1), ("w", 2)  # two weight signatures
T = Transition


def live(steps=0, block=None, dual=False, weights=W, buffer=False):
    return SessionState(
        steps_since_prefill=steps,
        cached_block=block,
        dual_cache=dual,
        weights=weights,
        buffer_held=buffer,
    )


CONT = SessionFacts(continues=True)
OTHER = SessionFacts(continues=False)

# (id, sessions, facts, call facts, policy, expected plan)
TABLE = [
    ("nothing live: new", [], [], CallFacts(W), Schedule(), Plan(T.NEW)),
    ("no session matches: new", [live()], [OTHER], CallFacts(W), Schedule(), Plan(T.NEW)),
    ("host facts rule it out: new", [live()], [None], CallFacts(W), Schedule(), Plan(T.NEW)),
    ("continues: step", [live()], [CONT], CallFacts(W), Schedule(), Plan(T.STEP, 0)),
    (
        "the first continuing session wins",
        [live(), live(steps=4)],
        [OTHER, CONT],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 1),
    ),
    (
        "a response position went back to the mask: restart",
        [live(steps=3)],
        [SessionFacts(True, restarted=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.RESTART, 0),
    ),
    (
        "restart beats a due refresh",
        [live(steps=0)],
        [SessionFacts(True, restarted=True)],
        CallFacts(W),
        Schedule(prompt_refresh=1),
        Plan(T.RESTART, 0),
    ),
    (
        "refresh every call",
        [live(steps=0)],
        [CONT],
        CallFacts(W),
        Schedule(prompt_refresh=1),
        Plan(T.REFRESH, 0),
    ),
    (
        "refresh not due yet",
        [live(steps=1)],
        [CONT],
        CallFacts(W),
        Schedule(prompt_refresh=3),
        Plan(T.STEP, 0),
    ),
    (
        "refresh due on the third call",
        [live(steps=2)],
        [CONT],
        CallFacts(W),
        Schedule(prompt_refresh=3),
        Plan(T.REFRESH, 0),
    ),
    (
        "dual cache, no block cached: block refresh",
        [live(dual=True)],
        [SessionFacts(True, current_block=0)],
        CallFacts(W),
        Schedule(),
        Plan(T.BLOCK_REFRESH, 0, block=0),
    ),
    (
        "dual cache, the cached block: block step",
        [live(block=2, dual=True)],
        [SessionFacts(True, current_block=2)],
        CallFacts(W),
        Schedule(),
        Plan(T.BLOCK_STEP, 0, block=2),
    ),
    (
        "dual cache, the next block: block refresh",
        [live(block=2, dual=True)],
        [SessionFacts(True, current_block=3)],
        CallFacts(W),
        Schedule(),
        Plan(T.BLOCK_REFRESH, 0, block=3),
    ),
    (
        "dual cache, no mask left: plain step",
        [live(block=2, dual=True)],
        [SessionFacts(True, current_block=None)],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 0),
    ),
    (
        "dual cache off for the session: plain step",
        [live(dual=False)],
        [SessionFacts(True, current_block=1)],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 0),
    ),
    (
        "a commit outside the block: leave the dual cache",
        [live(block=0, dual=True)],
        [SessionFacts(True, current_block=0, off_grid=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 0, fallback=Fallback.BLOCK_OFF_GRID, leave_dual_cache=True),
    ),
    (
        "refresh beats the dual cache",
        [live(steps=0, block=0, dual=True)],
        [SessionFacts(True, current_block=0)],
        CallFacts(W),
        Schedule(prompt_refresh=1),
        Plan(T.REFRESH, 0),
    ),
    (
        "revote every 2: not due",
        [live(steps=0)],
        [CONT],
        CallFacts(W),
        Schedule(revote=2),
        Plan(T.STEP, 0),
    ),
    (
        "revote every 2: due",
        [live(steps=1)],
        [CONT],
        CallFacts(W),
        Schedule(revote=2),
        Plan(T.STEP, 0, revote=True),
    ),
    (
        "revote at block refreshes",
        [live(dual=True)],
        [SessionFacts(True, current_block=1)],
        CallFacts(W),
        Schedule(revote="block"),
        Plan(T.BLOCK_REFRESH, 0, block=1, revote=True),
    ),
    (
        "revote at block refreshes: not at a block step",
        [live(block=1, dual=True)],
        [SessionFacts(True, current_block=1)],
        CallFacts(W),
        Schedule(revote="block"),
        Plan(T.BLOCK_STEP, 0, block=1),
    ),
    (
        "weights changed: the continued session is stale",
        [live(weights=W)],
        [CONT],
        CallFacts(W2),
        Schedule(),
        Plan(T.NEW, stale=(0,), fallback=Fallback.WEIGHTS_CHANGED),
    ),
    (
        "weights changed: another session still continues",
        [live(weights=W), live(weights=W2)],
        [CONT, CONT],
        CallFacts(W2),
        Schedule(),
        Plan(T.STEP, 1, stale=(0,)),
    ),
    (
        "weights changed, nothing continued: no fallback",
        [live(weights=W)],
        [OTHER],
        CallFacts(W2),
        Schedule(),
        Plan(T.NEW, stale=(0,)),
    ),
    (
        "a dropped session came back",
        [live()],
        [OTHER],
        CallFacts(W, dropped=Fallback.SESSION_DROPPED),
        Schedule(),
        Plan(T.NEW, fallback=Fallback.SESSION_DROPPED),
    ),
    (
        "a block window grown by one block: extend",
        [live(steps=3)],
        [SessionFacts(False, extends=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.EXTEND, 0),
    ),
    (
        "a continuing session beats an older extendable one",
        [live(), live()],
        [CONT, SessionFacts(False, extends=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 0),
    ),
    (
        # a block loop run again with one step a block: its last call was on the grown
        # session; the earlier run's session of the same window gets the very same call
        "a grown window beats an older session it continues",
        [live(), live()],
        [SessionFacts(False, extends=True), CONT],
        CallFacts(W),
        Schedule(),
        Plan(T.EXTEND, 0),
    ),
    (
        # two generations of one prompt served in turn (found by a randomized hunt)
        "a session the call steps on beats a newer one it would restart",
        [live(), live()],
        [SessionFacts(True, restarted=True), CONT],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 1),
    ),
    (
        "a session whose committed tokens the call holds beats a newer one",
        [live(), live()],
        [SessionFacts(True, agrees=False), CONT],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 1),
    ),
    (
        "no continued session agrees: the newest",
        [live(), live()],
        [SessionFacts(True, agrees=False), SessionFacts(True, agrees=False)],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 0),
    ),
    (
        "a grown session whose committed tokens the call holds beats a newer one",
        [live(), live()],
        [SessionFacts(False, extends=True, agrees=False), SessionFacts(False, extends=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.EXTEND, 1),
    ),
    (
        "a continued session that agrees beats a newer grown one that does not",
        [live(), live()],
        [SessionFacts(False, extends=True, agrees=False), CONT],
        CallFacts(W),
        Schedule(),
        Plan(T.STEP, 1),
    ),
    (
        "a grown window beats a finished session of that window with masks again",
        [live(), live()],
        [SessionFacts(True, restarted=True), SessionFacts(False, extends=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.EXTEND, 1),
    ),
    (
        "a block-cache refresh: block refresh",
        [live(steps=2)],
        [CONT],
        CallFacts(W, block_buffer="refresh"),
        Schedule(),
        Plan(T.BLOCK_REFRESH, 0),
    ),
    (
        "a small-block call with its buffer held: block step",
        [live(steps=2, buffer=True)],
        [CONT],
        CallFacts(W, block_buffer="small"),
        Schedule(),
        Plan(T.BLOCK_STEP, 0),
    ),
    (
        "a small-block call whose buffer is not held: the whole block, counted",
        [live(steps=2)],
        [CONT],
        CallFacts(W, block_buffer="small"),
        Schedule(),
        Plan(T.STEP, 0, fallback=Fallback.BLOCK_BUFFER_LOST),
    ),
    (
        "a small-block call at a due re-vote: the whole block re-votes",
        [live(steps=2, buffer=True)],
        [CONT],
        CallFacts(W, block_buffer="small"),
        Schedule(revote=3),
        Plan(T.STEP, 0, revote=True),
    ),
    (
        "a block-cache refresh that grew the window: extend",
        [live(steps=2, buffer=True)],
        [SessionFacts(False, extends=True)],
        CallFacts(W, block_buffer="refresh"),
        Schedule(),
        Plan(T.EXTEND, 0),
    ),
    (
        "a small-block call of a restarted session: restart",
        [live(steps=2, buffer=True)],
        [SessionFacts(True, restarted=True)],
        CallFacts(W, block_buffer="small"),
        Schedule(),
        Plan(T.RESTART, 0),
    ),
    (
        "an extendable session with stale weights is dropped: new",
        [live(weights=W2)],
        [SessionFacts(False, extends=True)],
        CallFacts(W),
        Schedule(),
        Plan(T.NEW, stale=(0,)),
    ),
]


@pytest.mark.parametrize(
    "sessions, facts, call, policy, expected",
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_decide(sessions, facts, call, policy, expected):
    assert decide(sessions, facts, call, policy) == expected


def test_a_block_window_without_a_prefix_or_with_masks_before_its_last_block_runs_uncached():
    # one block and no prefix: nothing to cache, and the call is no slower for it (no fallback)
    assert new_prompt(Plan(T.NEW), has_prompt=False, block=True) == Plan(T.UNCACHED)
    assert new_prompt(Plan(T.NEW), has_prompt=True, block=True, block_not_last=True) == Plan(
        T.UNCACHED, fallback=Fallback.BLOCK_NOT_LAST
    )
    assert new_prompt(Plan(T.NEW), has_prompt=True, block=True) == Plan(T.NEW)
    # no mask in its last block: nothing would vote (a scoring call, or a wrong mask_token_id)
    assert new_prompt(Plan(T.NEW), has_prompt=True, block=True, block_without_masks=True) == Plan(
        T.UNCACHED, fallback=Fallback.BLOCK_NO_MASK
    )


def test_a_new_prompt_without_a_prompt_in_some_row_runs_uncached():
    plan = new_prompt(Plan(T.NEW, stale=(1,)), has_prompt=False)
    assert plan == Plan(T.UNCACHED, stale=(1,), fallback=Fallback.NO_PROMPT)
    assert new_prompt(Plan(T.NEW), has_prompt=True) == Plan(T.NEW)
    assert new_prompt(Plan(T.STEP, 0), has_prompt=False) == Plan(
        T.STEP, 0
    )  # only a new layout is judged


def test_transitions_are_counted_under_their_names_and_say_what_they_run():
    assert {t.value for t in T} == {
        "new",
        "restart",
        "refresh",
        "step",
        "block_refresh",
        "block_step",
        "extend",
        "uncached",
    }
    assert {t for t in T if t.is_prefill} == {T.NEW, T.RESTART, T.REFRESH, T.UNCACHED}
