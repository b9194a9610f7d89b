"""A RULER-style long-context task suite over a small synthetic vocabulary, seeded.

Every sequence is ``BOS context SEP query ANSWER answer``: the answer is the last span (the
masked ``[MASK]*L`` a diffusion LM fills), the rest is the prompt. The context is filler with
the task's items inserted at random depths. The filler is a walk on a fixed Markov chain
(each filler token has two successors, p = 0.7 / 0.3): local structure, as essay text has in
RULER, and no answer in it.

Tasks (after RULER's categories; the answer lengths make the step graph run many times):

* ``single``: one needle ``KEY v1..v4``; ``Q_KEY key`` asks for its 4-token value.
* ``multikey``: four needles with distinct keys, one asked.
* ``multivalue``: one key in three needles (plus two distractor needles); the answer is its
  three values in order of appearance (12 tokens).
* ``multiquery``: four needles, two asked (``Q_KEY k1 k2``); the answer is both values (8).
* ``vartrack``: chains of assignments ``LET x v``, ``LET y x``, ... (2-4 variables; two chains,
  one a distractor); ``Q_VAR v`` asks for every variable that holds ``v``, in chain order.
* ``freqword``: words scattered through the filler with Zipf(2) counts over 16 words;
  ``Q_FREQ`` asks for the three most frequent, most frequent first (aggregation over the
  whole context; counts are exact, so the top three are never tied).
* ``copy``: three passages ``PASSAGE key p1..pm`` (m in 8-32, symbols distinct within a
  passage; below 256 tokens one passage, m <= (length - 16) / 2); ``Q_COPY key`` asks for one
  passage's m symbols.

:func:`ruler_task` builds one sequence of exactly ``length`` tokens; everything is drawn from
the ``torch.Generator`` passed in, so the same seed gives the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from maskkv_compile.evaluation import needles

KEYS = range(0, 32)  # needle keys, passage keys and variable names
VALUES = range(32, 80)  # needle values, passage symbols, tracked values
WORDS = range(80, 96)  # the frequent-word task's words
FILLER = range(96, 112)
BOS, SEP, Q_KEY, Q_VAR, Q_FREQ, Q_COPY, LET, PASSAGE, ANSWER = range(112, 121)
VOCAB = 128
MASK = VOCAB - 1  # the last id, as in LLaDA

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqword", "copy")
VALUE_LEN = 4
SUCCESSOR_P = 0.7  # probability of a filler token's first successor
ZIPF = 2.0


@dataclass(frozen=True)
class RulerSequence:
    """One sequence; the answer is ``ids[start:]`` (it ends the sequence)."""

    task: str
    ids: tuple[int, ...]
    start: int

    @property
    def answer(self) -> tuple[int, ...]:
        return self.ids[self.start :]


def filler_successors() -> tuple[tuple[int, int], ...]:
    """The fixed Markov chain of the filler: each filler token's two possible successors."""
    return needles.filler_successors(FILLER)


def filler_walk(gen: torch.Generator, n: int) -> list[int]:
    """``n`` filler tokens: a uniform first token, then each token's first successor with
    probability ``SUCCESSOR_P``, else its second (the needle suite's chain over this suite's
    filler tokens)."""
    return needles.filler_walk(gen, n, FILLER, SUCCESSOR_P)


def _pick(gen: torch.Generator, pool: range, k: int) -> list[int]:
    """``k`` distinct tokens of ``pool``."""
    return torch.randperm(len(pool), generator=gen)[:k].add(pool[0]).tolist()


def _value(gen: torch.Generator) -> list[int]:
    return torch.randint(len(VALUES), (VALUE_LEN,), generator=gen).add(VALUES[0]).tolist()


def _place(
    gen: torch.Generator, n_context: int, items: list[list[int]], groups: list[int]
) -> tuple[list[int], list[int]]:
    """Insert ``items`` into a filler walk so that the context has ``n_context`` tokens.

    Items of the same ``group`` (>= 0) keep their list order (an assignment chain); the others
    land in random order. Returns (context, the context index of every item's first token)."""
    n_filler = n_context - sum(map(len, items))
    if n_filler < 0:
        raise ValueError(f"a context of {n_context} tokens cannot hold {sum(map(len, items))}")
    filler = filler_walk(gen, n_filler)
    points = sorted(int(p) for p in torch.randint(n_filler + 1, (len(items),), generator=gen))
    slot_of = torch.randperm(len(items), generator=gen).tolist()  # item i -> slot_of[i]
    for g in set(groups) - {-1}:  # a chain takes its slots in order
        members = [i for i in range(len(items)) if groups[i] == g]
        for i, s in zip(members, sorted(slot_of[i] for i in members)):
            slot_of[i] = s
    item_at = {s: i for i, s in enumerate(slot_of)}
    context, where, prev = [], [0] * len(items), 0
    for s, p in enumerate(points):
        context += filler[prev:p]
        where[item_at[s]] = len(context)
        context += items[item_at[s]]
        prev = p
    return context + filler[prev:], where


def _needles(gen: torch.Generator, n: int) -> tuple[list[int], list[list[int]]]:
    keys = _pick(gen, KEYS, n)
    return keys, [_value(gen) for _ in keys]


def _zipf_counts(total: int) -> list[int]:
    weights = [1.0 / (r + 1) ** ZIPF for r in range(len(WORDS))]
    scale = total / sum(weights)
    return [max(1, round(w * scale)) for w in weights]


def ruler_task(gen: torch.Generator, task: str, length: int) -> RulerSequence:
    """One ``task`` sequence of exactly ``length`` tokens (context sized to fit)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    groups: list[int] = []
    if task in ("single", "multikey", "multiquery"):
        n = {"single": 1, "multikey": 4, "multiquery": 4}[task]
        keys, values = _needles(gen, n)
        items = [[k, *v] for k, v in zip(keys, values)]
        asked = _pick(gen, range(n), 2 if task == "multiquery" else 1)
        query = [Q_KEY] + [keys[i] for i in asked]
        answer = [t for i in asked for t in values[i]]
    elif task == "multivalue":
        keys, values = _needles(gen, 3)  # key 0 gets three values, keys 1-2 are distractors
        extra = [_value(gen) for _ in range(2)]
        items = [[keys[0], *v] for v in (values[0], *extra)]
        items += [[k, *v] for k, v in zip(keys[1:], values[1:])]
        query = [Q_KEY, keys[0]]
    elif task == "vartrack":
        hops = [2 + int(torch.randint(3, (1,), generator=gen)) for _ in range(2)]
        names = _pick(gen, KEYS, sum(hops))
        tracked = _pick(gen, VALUES, 2)
        items, chains = [], []
        for c, h in enumerate(hops):
            chain = names[sum(hops[:c]) : sum(hops[: c + 1])]
            chains.append(chain)
            items += [[LET, chain[0], tracked[c]]] + [
                [LET, chain[j], chain[j - 1]] for j in range(1, h)
            ]
            groups += [c] * h
        query, answer = [Q_VAR, tracked[0]], chains[0]
    elif task == "freqword":
        n_context = length - 3 - 1 - 3  # BOS, SEP, Q_FREQ, ANSWER, 3 answer tokens
        counts = _zipf_counts(max(len(WORDS) * 2, n_context // 6))
        order = _pick(gen, WORDS, len(WORDS))  # order[r] is the word of rank r
        items = [[order[r]] for r, c in enumerate(counts) for _ in range(c)]
        query, answer = [Q_FREQ], order[:3]
    else:  # copy (a short context, as in a curriculum's first stages, holds one passage)
        keys = _pick(gen, KEYS, 3 if length >= 256 else 1)
        longest = min(32, (length - 16) // 2)  # 32 from 80 tokens up
        if longest < 8:
            raise ValueError(f"a copy sequence cannot hold an 8-token passage in {length} tokens")
        sizes = [8 + int(torch.randint(longest - 7, (1,), generator=gen)) for _ in keys]
        passages = [_pick(gen, VALUES, m) for m in sizes]
        items = [[PASSAGE, k, *p] for k, p in zip(keys, passages)]
        query, answer = [Q_COPY, keys[0]], passages[0]
    if not groups:
        groups = [-1] * len(items)
    if task == "multivalue":
        answer_len = 3 * VALUE_LEN
    else:
        answer_len = len(answer)
    n_context = length - 2 - len(query) - 1 - answer_len  # BOS ... SEP query ANSWER answer
    context, where = _place(gen, n_context, items, groups)
    if task == "multivalue":  # the asked key's values, in order of appearance
        answer = [t for i in sorted(range(3), key=lambda i: where[i]) for t in items[i][1:]]
    ids = [BOS, *context, SEP, *query, ANSWER, *answer]
    assert len(ids) == length, (task, len(ids), length)
    return RulerSequence(task, tuple(ids), length - len(answer))


def batch(
    gen: torch.Generator, tasks: tuple[str, ...], rows: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, answer)``: ``rows`` sequences of ``length`` tokens, tasks drawn uniformly from
    ``tasks``; ``answer`` marks each row's answer span."""
    seqs = [
        ruler_task(gen, tasks[int(torch.randint(len(tasks), (1,), generator=gen))], length)
        for _ in range(rows)
    ]
    x = torch.tensor([s.ids for s in seqs])
    starts = torch.tensor([s.start for s in seqs])[:, None]
    return x, torch.arange(length)[None, :] >= starts


def block_mask(length: int, block: int) -> torch.Tensor:
    """(1, 1, T, T) bool, True = attend: blocks of ``block`` tokens from position 0, each seeing
    itself and every earlier block (what the block-diffusion model is trained and run with)."""
    b = torch.arange(length) // block
    return (b[:, None] >= b[None, :])[None, None]


def token_name(token: int) -> str:
    """``k3`` (key), ``v7`` (value), ``w2`` (word), ``.`` (filler), ``<q_key>`` ..."""
    for prefix, pool in (("k", KEYS), ("v", VALUES), ("w", WORDS)):
        if token in pool:
            return f"{prefix}{token - pool[0]}"
    if token in FILLER:
        return "."
    names = ("bos", "sep", "q_key", "q_var", "q_freq", "q_copy", "let", "passage", "answer")
    if BOS <= token <= ANSWER:
        return f"<{names[token - BOS]}>"
    return "<mask>" if token == MASK else f"<{token}>"
