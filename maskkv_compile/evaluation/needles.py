"""RULER-style needle retrieval: the task the project's own tiny diffusion LM is trained on.

One sequence is ``BOS haystack SEP (QUERY key value)*queries``:

* the haystack holds ``haystack`` tokens: filler with ``needles`` needles ``key value`` at
  random depths (each needle has a distinct one-token key and a ``value_len``-token value).
  The filler is a walk on a fixed Markov chain (:func:`filler_successors`), a stand-in for
  RULER's essay text: it has local structure to learn, as language has, and carries no answer;
* every query group asks for one needle by its key; its value is the answer, the masked span
  of a retrieval sample. The *last* group asks for needle 0, whose depth can be set (for the
  depth x length heatmap); earlier groups ask for other needles, so no answer is given away.

:func:`copy_task` is a training companion: a random segment repeated at a random place in
random tokens, the second copy to be filled in. It asks for the circuit retrieval needs (find
where my neighbours occur elsewhere, copy what follows there) in its densest form.

Everything is drawn from a ``torch.Generator``: the same seed gives the same sequences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

KEYS = range(0, 24)
VALUES = range(24, 48)
SYMBOLS = range(0, 48)  # keys and values: what the copy task draws from
FILLER = range(48, 58)
BOS, SEP, QUERY = 58, 59, 60
VOCAB = 64
MASK = VOCAB - 1  # the last id, as in LLaDA
VALUE_LEN = 2


@dataclass(frozen=True)
class Needles:
    """One sequence and the ``[start, stop)`` of every answer (the last one asks for needle 0)."""

    ids: list[int]
    answers: list[tuple[int, int]]
    depth: int  # index in ``ids`` of needle 0's key


def _randint(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=gen))


SUCCESSOR_P = (0.7, 0.3)  # probability of a filler token's first and second successor


@functools.cache
def filler_successors(filler: range = FILLER) -> tuple[tuple[int, int], ...]:
    """The fixed Markov chain of a filler vocabulary: each token's two possible successors
    (this suite's ``FILLER`` by default; the RULER-style suite passes its own)."""
    gen = torch.Generator().manual_seed(2510_09309)
    return tuple(
        tuple(torch.randperm(len(filler), generator=gen)[:2].add(filler[0]).tolist())
        for _ in filler
    )


def filler_walk(
    gen: torch.Generator, n: int, filler: range = FILLER, p_first: float = SUCCESSOR_P[0]
) -> list[int]:
    """``n`` filler tokens: a uniform first token, then each token's first successor with
    probability ``p_first``, else its second."""
    if n <= 0:
        return []
    successors = filler_successors(filler)
    u = torch.rand(n, generator=gen).tolist()
    out = [filler[0] + min(int(u[0] * len(filler)), len(filler) - 1)]
    for r in u[1:]:
        out.append(successors[out[-1] - filler[0]][r >= p_first])
    return out


def needle_task(
    gen: torch.Generator,
    haystack: int,
    needles: int,
    queries: int = 1,
    depth: Optional[float] = None,
    value_len: int = VALUE_LEN,
    keys: int = len(KEYS),
) -> Needles:
    """One sequence; ``depth`` in [0, 1] puts needle 0 at that relative depth of the haystack,
    otherwise every needle goes to a random depth. Keys are drawn from the first ``keys`` key
    ids."""
    if not 1 <= queries <= needles <= keys <= len(KEYS):
        raise ValueError(
            f"need 1 <= queries <= needles <= keys <= {len(KEYS)}, got {queries} queries, "
            f"{needles} needles, {keys} keys"
        )
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    width = 1 + value_len
    n_filler = haystack - width * needles
    if n_filler < 0:
        raise ValueError(
            f"a haystack of {haystack} tokens cannot hold {needles} needles of {width} tokens"
        )
    keys = torch.randperm(keys, generator=gen)[:needles].add(KEYS[0]).tolist()
    values = torch.randint(len(VALUES), (needles, value_len), generator=gen).add(VALUES[0]).tolist()
    filler = filler_walk(gen, n_filler)
    # one insertion point into the filler per needle; equal points keep the needle order
    points = [_randint(gen, n_filler + 1) for _ in keys]
    if depth is not None:
        points[0] = round(depth * n_filler)
    ids, prev, where = [BOS], 0, 0
    for i in sorted(range(needles), key=lambda i: (points[i], i)):
        ids += filler[prev : points[i]]
        if i == 0:
            where = len(ids)
        ids += [keys[i], *values[i]]
        prev = points[i]
    ids += filler[prev:] + [SEP]
    asked = (torch.randperm(needles - 1, generator=gen) + 1).tolist()[: queries - 1] + [0]
    answers = []
    for i in asked:
        ids += [QUERY, keys[i]]
        answers.append((len(ids), len(ids) + value_len))
        ids += values[i]
    return Needles(ids, answers, where)


def copy_task(
    gen: torch.Generator, batch: int, length: int, segment: tuple[int, int] = (4, 12)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, answer)`` of ``batch`` rows ``BOS`` + ``length`` random tokens in which one random
    segment of symbols appears twice at random places; ``answer`` marks the second copy. The
    background is random too, so the only way to fill the copy is to find the first one by
    content (an induction circuit), not by counting from a boundary."""
    n = min(segment[0] + _randint(gen, segment[1] - segment[0] + 1), length // 2)
    x = torch.randint(len(SYMBOLS) + len(FILLER), (batch, length + 1), generator=gen)
    x[:, 0] = BOS
    answer = torch.zeros_like(x, dtype=torch.bool)
    rows = torch.arange(batch)[:, None]
    seg = torch.randint(len(SYMBOLS), (batch, n), generator=gen).add(SYMBOLS[0])
    first = torch.randint(
        1, length + 2 - 2 * n, (batch, 1), generator=gen
    )  # first copy at [first, first + n)
    second = first + n + (torch.rand(batch, 1, generator=gen) * (length + 2 - 2 * n - first)).long()
    cols = torch.arange(n)
    x[rows, first + cols] = seg
    x[rows, second + cols] = seg
    answer[rows, second + cols] = True
    return x, answer
