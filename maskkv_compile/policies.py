"""Eviction policies: who votes, how votes become scores, how the budget is split.

One registry (``POLICIES``) of small frozen records, each naming its voters, its vote
transform, its layer allocator and its head allocator; the allocators' math lives in
:mod:`maskkv_compile.budgets`. Dispatch goes through lookup tables, not an if-chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkv_compile.budgets import (
    adakv_head_budgets, maskkv_head_budgets, maskkv_head_budgets_rows, maskkv_layer_budgets, pyramid_layer_budgets,
    squeeze_layer_budgets, uniform_head_budgets, uniform_head_budgets_rows, uniform_layer_budgets,
)

# ---------------------------------------------------------------- voters and vote post-processing


def snapkv_pool(votes: Tensor, kernel: int = 5) -> Tensor:
    """SnapKV's 1-D average pooling over the last (position) dim, same length:
    ``out[p] = sum_{|q - p| <= kernel // 2, 0 <= q < P} votes[q] / kernel`` (zero padding counted in
    the mean, as ``avg_pool1d``'s default). ``kernel`` must be odd; votes must be finite. Pooling
    spreads votes onto padded positions: the selection must still exclude padding."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
    if kernel == 1:
        return votes
    flat = votes.reshape(-1, 1, votes.shape[-1]).float()
    pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(votes.shape).to(votes.dtype)


def streaming_votes(P: int, sink: int = 4, device: Union[str, torch.device, None] = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """StreamingLLM as scores ``(P,)``: sink positions ``i < sink`` score ``2P - i`` (all above
    every other score, earliest first), the rest score their position (most recent first), so the
    top-k is the ``min(k, sink)`` first tokens plus the ``k - sink`` most recent ones."""
    pos = torch.arange(P, device=device, dtype=torch.float64)
    return torch.where(pos < sink, 2 * P - pos, pos).to(dtype)


def streaming_votes_rows(prompt_len: Tensor, width: int, sink: int = 4, dtype: torch.dtype = torch.float32) -> Tensor:
    """:func:`streaming_votes` of each row's ``prompt_len`` (B,) at once, on its device without
    reading it: (B, width), row b's first ``prompt_len[b]`` entries its scores (the rest are
    filler for the caller to drop)."""
    pos = torch.arange(width, device=prompt_len.device, dtype=torch.float64)[None, :]  # (1, width)
    return torch.where(pos < sink, 2 * prompt_len.to(torch.float64)[:, None] - pos, pos).to(dtype)


def random_votes(B: int, Hkv: int, P: int, seed: int = 0, device: Union[str, torch.device, None] = None) -> Tensor:
    """Uniform random scores ``(B, Hkv, P)`` from a CPU generator seeded with ``seed``: the same on
    every call and every device."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand((B, Hkv, P), generator=gen).to(device)


def _as_index(idx) -> Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.dim() > 1:
        raise ValueError(f"positions must be 1-D (shared by the batch), got shape {tuple(idx.shape)}")
    return idx.flatten()


def _mask_voters(prompt_idx: Tensor, resp_idx: Tensor, window: int, shift: int) -> Tensor:
    last = int(torch.cat([prompt_idx, resp_idx]).max()) if prompt_idx.numel() + resp_idx.numel() else 0
    return (resp_idx + shift).clamp(0, last)


_VOTERS: dict[str, Callable[[Tensor, Tensor, int, int], Tensor]] = {
    "mask": _mask_voters,
    "window": lambda prompt_idx, resp_idx, window, shift: prompt_idx[max(prompt_idx.numel() - window, 0):],
    "prompt": lambda prompt_idx, resp_idx, window, shift: prompt_idx,
    "all": lambda prompt_idx, resp_idx, window, shift: torch.sort(torch.cat([prompt_idx, resp_idx])).values,
    "none": lambda prompt_idx, resp_idx, window, shift: prompt_idx[:0],
}


def voter_positions(policy: Union[str, "Policy"], prompt_idx, resp_idx, window: int = 32, shift: int = 0) -> Tensor:
    """Sequence positions (int64, 1-D) of the queries that vote under ``policy``:
    mask voters (maskkv, mask_voting_uniform) = response positions ``+ shift`` clamped to the
    sequence (Dream: shift -1); window voters (snapkv and the allocation baselines built on it) =
    the last ``window`` prompt positions; prompt_voting = all prompt positions; all_voting = every
    position; streaming / random use no voters (empty)."""
    kind = get_policy(policy).voters
    return _VOTERS[kind](_as_index(prompt_idx), _as_index(resp_idx), int(window), int(shift))


# ---------------------------------------------------------------- policy registry


def _need_importance(importance: Optional[Sequence[float]], n_layers: int, policy: str) -> Sequence[float]:
    if importance is None:
        raise ValueError(f"policy {policy!r} needs a layer-importance profile (LayerProfile.importance); "
                         "measure one on calibration prompts first")
    if len(importance) != n_layers:
        raise ValueError(f"importance has {len(importance)} values but the model has {n_layers} layers")
    return importance


_LAYER_ALLOCATORS: dict[str, Callable[..., list[float]]] = {
    "uniform": lambda pol, n, b, imp, **kw: uniform_layer_budgets(n, b),
    "maskkv": lambda pol, n, b, imp, **kw: maskkv_layer_budgets(_need_importance(imp, n, pol), b, **kw),
    "pyramid": lambda pol, n, b, imp, **kw: pyramid_layer_budgets(n, b, **kw),
    "squeeze": lambda pol, n, b, imp, **kw: squeeze_layer_budgets(_need_importance(imp, n, pol), b, **kw),
}


def _need(value, what: str, policy: str):
    if value is None:
        raise ValueError(f"policy {policy!r} needs {what}")
    return value


_HEAD_ALLOCATORS: dict[str, Callable[..., Tensor]] = {
    "uniform": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: uniform_head_budgets(n_kv, k_l, p, mk),
    "maskkv": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: maskkv_head_budgets(
        _need(pm, "prompt_mass", pol), _need(nv, "n_voters", pol), k_l, min_keep=mk, prompt_len=p, n_kv_heads=n_kv, **kw),
    "adakv": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: adakv_head_budgets(
        _need(votes, "votes", pol), k_l, min_keep=mk, prompt_len=p, **kw),
}

# the allocators that do every row of a batch at once on the device, without reading it
_ROW_HEAD_ALLOCATORS: dict[str, Callable[..., Tensor]] = {
    "uniform": lambda k_l, n_kv, p, mk, pm, nv, **kw: uniform_head_budgets_rows(n_kv, k_l, p, mk),
    "maskkv": lambda k_l, n_kv, p, mk, pm, nv, **kw: maskkv_head_budgets_rows(pm, nv, k_l, p, n_kv, min_keep=mk, **kw),
}

_VOTE_TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "none": lambda pol, votes, shape, device, kw: _need(votes, "votes", pol),
    "snapkv_pool": lambda pol, votes, shape, device, kw: snapkv_pool(_need(votes, "votes", pol), kw.get("kernel", 5)),
    "streaming": lambda pol, votes, shape, device, kw: streaming_votes(shape[-1], kw.get("sink", 4), device).expand(shape),
    "random": lambda pol, votes, shape, device, kw: random_votes(*shape, seed=kw.get("seed", 0), device=device),
}


@dataclass(frozen=True)
class Policy:
    """An eviction policy: who votes, how votes become scores, and how the budget is split.

    voters: "mask" | "window" | "prompt" | "all" | "none" (see :func:`voter_positions`).
    vote_transform: "none" | "snapkv_pool" | "streaming" | "random".
    layer_allocator: "uniform" | "maskkv" | "pyramid" | "squeeze".
    head_allocator: "uniform" | "maskkv" | "adakv".
    """

    name: str
    voters: str
    vote_transform: str
    layer_allocator: str
    head_allocator: str
    description: str = ""

    @property
    def needs_profile(self) -> bool:
        """Whether the layer allocator needs a layer-importance profile."""
        return self.layer_allocator in ("maskkv", "squeeze")

    def layer_budgets(self, n_layers: int, budget: float, importance: Optional[Sequence[float]] = None,
                      **options) -> list[float]:
        """Per-layer budgets ``k_l`` (``options``: the allocator's hyper-parameters, e.g. beta)."""
        return _LAYER_ALLOCATORS[self.layer_allocator](self.name, n_layers, budget, importance, **options)

    def head_budgets(self, layer_budget: float, *, n_kv_heads: int, prompt_len: int, min_keep: int = 1,
                     prompt_mass: Optional[Tensor] = None, n_voters=None, votes: Optional[Tensor] = None,
                     **options) -> Tensor:
        """int64 ``(Hkv,)`` budgets of one layer; passes what the head allocator needs
        (maskkv: prompt_mass + n_voters; adakv: votes ``(B, Hkv, P)``)."""
        return _HEAD_ALLOCATORS[self.head_allocator](self.name, layer_budget, n_kv_heads, prompt_len, min_keep,
                                                     prompt_mass, n_voters, votes, **options)

    @property
    def allocates_rows(self) -> bool:
        """Whether :meth:`head_budgets_rows` serves this policy (uniform and maskkv heads; AdaKV's
        joint ranking runs row by row on the CPU)."""
        return self.head_allocator in _ROW_HEAD_ALLOCATORS

    def head_budgets_rows(self, layer_budget: float, *, n_kv_heads: int, prompt_len: Tensor, min_keep: int,
                          prompt_mass: Tensor, n_voters: Tensor, **options) -> Tensor:
        """int64 ``(B, Hkv)``: :meth:`head_budgets` of every row alone (``prompt_len``,
        ``n_voters`` (B,), ``prompt_mass`` (B, H)), all at once on their device, reading nothing."""
        return _ROW_HEAD_ALLOCATORS[self.head_allocator](layer_budget, n_kv_heads, prompt_len, min_keep, prompt_mass,
                                                         n_voters, **options)

    def selection_scores(self, votes: Optional[Tensor], shape: tuple[int, int, int],
                         device: Union[str, torch.device, None] = None, **options) -> Tensor:
        """Scores ``(B, Hkv, P)`` whose per-head top-k is kept (options: kernel, sink, seed)."""
        return _VOTE_TRANSFORMS[self.vote_transform](self.name, votes, tuple(shape), device, options)


POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("maskkv", "mask", "none", "maskkv", "maskkv", "Mask-Voting + boundary-aware layers + prompt-preference heads"),
    Policy("mask_voting_uniform", "mask", "none", "uniform", "uniform", "Mask-Voting with uniform budgets"),
    Policy("snapkv", "window", "snapkv_pool", "uniform", "uniform", "last-window prompt queries vote, pooled"),
    Policy("prompt_voting", "prompt", "none", "uniform", "uniform", "all prompt queries vote"),
    Policy("all_voting", "all", "none", "uniform", "uniform", "every query votes"),
    Policy("streaming", "none", "streaming", "uniform", "uniform", "StreamingLLM: sink + most recent"),
    Policy("random", "none", "random", "uniform", "uniform", "seeded random subset"),
    Policy("pyramidkv", "window", "snapkv_pool", "pyramid", "uniform", "SnapKV selection, PyramidKV layer budgets"),
    Policy("squeezeattention", "window", "snapkv_pool", "squeeze", "uniform", "SnapKV selection, SqueezeAttention layers"),
    Policy("adakv", "window", "snapkv_pool", "uniform", "adakv", "SnapKV selection, AdaKV head budgets"),
)}


def get_policy(name: Union[str, Policy]) -> Policy:
    """The registered policy called ``name`` (a :class:`Policy` passes through)."""
    if isinstance(name, Policy):
        return name
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}") from None


# ---------------------------------------------------------------- reporting


def format_budget_table(table: Sequence[Tensor]) -> str:
    """Layers x KV heads budget table (plus each layer's total) as text, via ``tabulate``."""
    n_heads = max((int(t.numel()) for t in table), default=0)
    headers = ["layer", *(f"kv{h}" for h in range(n_heads)), "total"]
    rows = []
    for layer, t in enumerate(table):
        vals = [int(v) for v in t.flatten().tolist()]
        rows.append([layer, *vals, *([""] * (n_heads - len(vals))), sum(vals)])
    try:
        from tabulate import tabulate
    except ImportError:  # tabulate is an optional (test) dependency
        return "\n".join("  ".join(str(c) for c in row) for row in [headers, *rows])
    return tabulate(rows, headers=headers, tablefmt="simple")
