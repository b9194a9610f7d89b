"""How many prompt KV pairs each layer and KV head keeps: MaskKV's allocators and its baselines'
(maskkv.md §4).

The policies that combine them with voters are in :mod:`maskkv_compile.policies`.

Pure torch / Python, no graph code. Vocabulary:

* ``B`` (``budget``): average number of prompt KV pairs kept per KV head per layer.
* ``k_l`` (layer budget): the average per KV head in layer ``l``. Every layer allocator returns
  a list of floats with ``sum_l k_l == n_layers * B`` (up to float rounding).
  :func:`layer_slot_totals` turns them into integers that sum exactly.
* ``k_{l,h}`` (head budget): an int64 tensor ``(Hkv,)``. Every head allocator guarantees
  ``sum_h k_{l,h} == round(Hkv * k_l)`` (round half up) and ``lo <= k_{l,h} <= hi`` with
  ``hi = prompt_len`` and ``lo = min(min_keep, prompt_len)``; when ``Hkv * k_l`` lies outside
  ``[Hkv*lo, Hkv*hi]`` the total is clamped into that range (e.g. a prompt shorter than the budget
  is kept whole). Ties are broken towards the lower head index.
* Head allocators compute in float64 (a few numbers per layer). The ``_rows`` variants (uniform,
  maskkv) do every row of a batch at once on the device of their inputs without reading it, so
  the prefill graph needs no host synchronisation; the others run on the CPU and return the
  budgets on the device of their input statistics.
"""

from __future__ import annotations

import bisect
import heapq
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

# ---------------------------------------------------------------- layer level (offline)


def _check_budget(budget: float) -> float:
    if (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or budget <= 0
    ):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    return float(budget)


def _check_n_layers(n_layers: int) -> int:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    return n_layers


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def _importance(importance: Sequence[float]) -> list[float]:
    """Validated per-layer importance; tiny negatives (float noise in 1 - cos) become 0."""
    values = [float(v) for v in importance]
    if not values:
        raise ValueError("importance is empty: need one value per layer")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"importance must be finite, got {values}")
    return [max(v, 0.0) for v in values]


def uniform_layer_budgets(n_layers: int, budget: float) -> list[float]:
    """``k_l = B`` for every layer."""
    return [_check_budget(budget)] * _check_n_layers(n_layers)


def maskkv_layer_budgets(
    importance: Sequence[float], budget: float, beta: float = 0.4
) -> list[float]:
    """MaskKV's boundary-aware layer budgets.

    Groups: boundary = {first, last layer}, middle = the rest. With ``N`` layers::

        k_base = beta * B                                  (every layer)
        k_imp  = (1 - beta) * B * N                        (shared by importance)
        k_l    = k_base + k_imp * I_group(l) / (I_boundary + I_middle) / |group(l)|

    ``I_group`` is the sum of the layer importances ``I_l = 1 - mean cos(h_in, h_out)`` in the
    group; inside a group the share is split evenly. ``N`` = 1 or 2 has no middle group, so
    every layer gets ``B``; all-zero importance falls back to uniform. ``beta = 1`` is uniform.
    Invariant: ``sum(k_l) == N * B``.
    """
    imp, budget, beta = (
        _importance(importance),
        _check_budget(budget),
        _check_fraction("beta", beta),
    )
    n = len(imp)
    total_imp = sum(imp)
    if total_imp <= 0.0:
        return uniform_layer_budgets(n, budget)
    boundary, middle = sorted({0, n - 1}), list(range(1, n - 1))
    k_imp = (1.0 - beta) * budget * n
    out = [0.0] * n
    for group in (boundary, middle):
        if group:
            per_layer = k_imp * sum(imp[l] for l in group) / total_imp / len(group)
            for l in group:
                out[l] = beta * budget + per_layer
    return out


def coverage_layer_budgets(
    coverage: Sequence[Sequence[float]], coverage_k: Sequence[int], budget: float, beta: float = 0.4
) -> list[float]:
    """Layer budgets that maximise the calibrated attention coverage (the rxnfp analysis,
    docs/rxnfp_budget_analysis.md).

    ``coverage[l]`` is layer ``l``'s curve: the share of the mask queries' attention held by
    each KV head's top-k prompt entries at ``k = coverage_k`` (linear between the points).
    Every layer gets ``beta * B`` first; the other ``(1 - beta) * B * N`` per-head entries go
    one at a time to the layer whose curve rises most over its next entry. The curves are
    cumulative sums of sorted shares, so they are concave and the greedy split is the one that
    maximises the summed coverage. Invariant: ``sum(k_l) == N * B``.
    """
    budget, beta = _check_budget(budget), _check_fraction("beta", beta)
    ks = [int(k) for k in coverage_k]
    curves = [[float(v) for v in curve] for curve in coverage]
    if not curves or any(len(c) != len(ks) for c in curves) or ks[0] != 0:
        raise ValueError("coverage needs one curve per layer, each with one value per coverage_k")
    n = len(curves)

    def slope(layer: int, at: float) -> float:
        # the curve's rise per entry on the segment holding `at` (0 beyond the last point)
        i = bisect.bisect_right(ks, at) - 1
        if i >= len(ks) - 1:
            return 0.0
        return (curves[layer][i + 1] - curves[layer][i]) / (ks[i + 1] - ks[i])

    out = [beta * budget] * n
    spare = budget * n - sum(out)
    # ties (flat curves past their last point) go to the layer holding the least
    heap = [(-slope(layer, out[layer]), out[layer], layer) for layer in range(n)]
    heapq.heapify(heap)
    while spare > 1e-9:
        *_, layer = heapq.heappop(heap)
        step = min(1.0, spare)
        out[layer] += step
        spare -= step
        heapq.heappush(heap, (-slope(layer, out[layer]), out[layer], layer))
    return out


def pyramid_layer_budgets(n_layers: int, budget: float, beta: float = 20.0) -> list[float]:
    """PyramidKV: budgets decrease arithmetically with depth.

    With total ``T = N * B``: top (last) layer ``k_top = T / (beta * N) = B / beta``, bottom (first)
    layer ``k_bottom = 2 * T / N - k_top``, and layer ``l`` interpolates linearly:
    ``k_l = k_bottom - (k_bottom - k_top) * l / (N - 1)``. The mean of an arithmetic sequence is
    the mean of its ends, ``B``, so ``sum(k_l) == N * B``. ``beta >= 1`` (1 = uniform).
    """
    n, budget = _check_n_layers(n_layers), _check_budget(budget)
    if beta < 1.0:
        raise ValueError(f"PyramidKV beta must be >= 1 (1 = uniform), got {beta!r}")
    if n == 1:
        return [budget]
    top = budget / beta
    bottom = 2.0 * budget - top
    step = (bottom - top) / (n - 1)
    return [bottom - step * l for l in range(n)]


def _least_important_group(values: list[float]) -> list[int]:
    """Exact 1-D 3-means (minimum within-group sum of squares; optimal groups are contiguous in
    sorted order): the layer indices of the group with the lowest importance. Deterministic: ties
    in value sort by layer index, ties in cost keep the first split found."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    xs = [values[i] for i in order]
    s1, s2 = [0.0], [0.0]
    for x in xs:
        s1.append(s1[-1] + x)
        s2.append(s2[-1] + x * x)

    def sse(a: int, b: int) -> float:
        t = s1[b] - s1[a]
        return (s2[b] - s2[a]) - t * t / (b - a)

    n = len(xs)
    best = min(
        ((sse(0, i) + sse(i, j) + sse(j, n), i) for i in range(1, n - 1) for j in range(i + 1, n)),
        key=lambda cost_split: cost_split[0],
    )
    return sorted(order[: best[1]])


def squeeze_layer_budgets(
    importance: Sequence[float], budget: float, low_fraction: float = 0.4
) -> list[float]:
    """SqueezeAttention: layers clustered into 3 groups by importance (``1 - cos`` similarity of
    the attention block's input and output; exact 1-D 3-means). Each layer of the least important
    group (lowest importance = highest cosine similarity) gets ``low_fraction * B`` (40% of the
    average budget); what it gives up is spread evenly over the other layers:
    ``k_other = (N * B - |low| * low_fraction * B) / (N - |low|)``. Fewer than 3 layers or equal
    importances (no groups to tell apart): uniform. Invariant: ``sum(k_l) == N * B``.
    """
    imp, budget = _importance(importance), _check_budget(budget)
    low_fraction = _check_fraction("low_fraction", low_fraction)
    n = len(imp)
    if n < 3 or max(imp) == min(imp):
        return uniform_layer_budgets(n, budget)
    low = set(_least_important_group(imp))
    k_low = low_fraction * budget
    k_other = (n * budget - len(low) * k_low) / (n - len(low))
    return [k_low if l in low else k_other for l in range(n)]


def layer_slot_totals(layer_budgets: Sequence[float], n_kv_heads: int) -> list[int]:
    """Integer slots per layer, ``T_l ~ n_kv_heads * k_l``, summing exactly to
    ``round(n_kv_heads * sum(k_l))`` (largest remainder). Pass ``T_l / n_kv_heads`` as the layer
    budget of a head allocator to make the model-wide total exact."""
    shares = torch.tensor([float(k) for k in layer_budgets], dtype=torch.float64) * n_kv_heads
    return largest_remainder(shares, math.floor(float(shares.sum()) + 0.5)).tolist()


# ---------------------------------------------------------------- integer rounding helpers
#
# The ``_rows`` functions work on a batch of independent rows (B, n) in float64 on any device,
# without reading the device: every branch is a ``where``, every loop a rank. The host
# functions below them validate their inputs and run one row.


def _round_rows(x: Tensor, total: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Integers in [lo, hi] summing to ``total`` per row, from ``floor(x)``: +1 to the largest
    remainders (ties: lower index first). ``x`` (B, n) float64 with ``lo <= x <= hi`` and
    ``total - 1 < sum(x) <= total + 1`` (so the floors never overshoot and one +1 per entry
    suffices); ``total`` (B,), ``lo``/``hi`` (B, 1) float64. Returns int64 (B, n)."""
    k = torch.floor(x).clamp(lo, hi)
    rem = torch.round((x - k) * 1e9) / 1e9  # quantized: float noise must not break exact ties
    deficit = total - k.sum(1)  # (B,)
    priority = torch.where(k < hi, rem, float("-inf"))  # a head at hi takes no more
    order = torch.sort(-priority, dim=1, stable=True).indices  # (B, n) best first, ties by index
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(x.shape[1], device=x.device).expand_as(order)
    )
    return (k + ((rank < deficit[:, None]) & (k < hi))).to(torch.int64)


def _scale_rows(q: Tensor, total: Tensor, lo: Tensor, hi: Tensor, active: Tensor) -> Tensor:
    """``x_i = clip(lam * q_i, lo, hi)`` over the ``active`` entries of each row with
    ``sum x == total``, solved exactly on the breakpoints of the monotone piecewise-linear
    ``f(lam) = sum clip(lam q, lo, hi)``; ``lo`` everywhere when ``total <= f(0)``. Needs
    ``total < f(max breakpoint)``; inactive entries are left at 0 (the caller ignores them)."""
    w = active.to(q.dtype)
    inv = torch.where(
        active & (q > 0), 1.0 / torch.where(q > 0, q, 1.0), 0.0
    )  # (B, n); 0 = a dummy breakpoint
    bps = torch.cat([torch.zeros_like(q[:, :1]), lo * inv, hi * inv], 1).sort(1).values  # (B, 2n+1)
    f = ((bps[:, :, None] * q[:, None, :]).clamp(lo[..., None], hi[..., None]) * w[:, None, :]).sum(
        -1
    )  # (B, 2n+1)
    i = torch.searchsorted(f, total[:, None])  # (B, 1): the first breakpoint with f >= total
    below, above = (i - 1).clamp(min=0), i.clamp(max=bps.shape[1] - 1)
    b0, b1, f0, f1 = (
        bps.gather(1, below),
        bps.gather(1, above),
        f.gather(1, below),
        f.gather(1, above),
    )
    lam = b0 + (total[:, None] - f0) * (b1 - b0) / (f1 - f0)  # f1 > f0 wherever i > 0
    return torch.where(i == 0, lo, (lam * q).clamp(lo, hi)) * w


def _fit_rows(q: Tensor, total: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Real budgets ``clip(lam * q_i, lo, hi)`` summing to ``total`` (``q >= 0``). Zero-quota
    entries stay at ``lo`` unless every positive one is at ``hi``; then they share what is
    left evenly. All-zero quotas count as equal ones."""
    none = ~(q > 0).any(1, keepdim=True)
    q = torch.where(none, 1.0, q)
    pos = q > 0
    n_pos = pos.sum(1).to(q.dtype)  # (B,)
    cap = n_pos * hi[:, 0] + (q.shape[1] - n_pos) * lo[:, 0]  # f at the largest breakpoint
    spread = _scale_rows(q, total, lo, hi, torch.ones_like(pos))
    rest = _scale_rows(
        torch.ones_like(q), total - n_pos * hi[:, 0], lo, hi, ~pos
    )  # the zero quotas' share
    filled = torch.where(pos, hi, torch.where((total > cap)[:, None], rest, lo))
    return torch.where((total >= cap)[:, None], filled, spread)


def clamp_and_redistribute_rows(quotas: Tensor, total: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """:func:`clamp_and_redistribute` for every row of ``quotas`` (B, n) at once, on their
    device and without reading it: ``total``, ``lo``, ``hi`` (B,) (``0 <= lo <= hi``).
    Returns int64 (B, n)."""
    q = quotas.to(torch.float64)
    n = q.shape[1]
    lo, hi = lo.to(q)[:, None], hi.to(q)[:, None]  # (B, 1)
    total = torch.minimum(
        torch.maximum(total.to(q), n * lo[:, 0]), n * hi[:, 0]
    )  # outside: infeasible
    as_is = ((q >= lo) & (q <= hi)).all(1) & ((q.sum(1) - total).abs() < 1.0)  # (B,)
    x = torch.where(as_is[:, None], q, _fit_rows(q.clamp_min(0.0), total, lo, hi))
    return _round_rows(x, total, lo, hi)


def _one_row(x: Tensor, total: int, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One row as the ``_rows`` functions take it: x (1, n); total, lo, hi (1,) float64."""
    return x[None], *(torch.tensor([float(v)], dtype=torch.float64) for v in (total, lo, hi))


def largest_remainder(shares: Tensor, total: int) -> Tensor:
    """Split the integer ``total`` proportionally to non-negative ``shares`` (Hamilton method):
    quotas ``q_i = total * s_i / sum(s)``, ``floor(q_i)``, then one more to the largest remainders
    (ties: lower index first). Returns int64 with ``sum == total`` and ``|k_i - q_i| < 1``.
    All-zero shares split evenly."""
    s = shares.detach().to("cpu", torch.float64).flatten()
    if isinstance(total, bool) or int(total) != total or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("shares must be finite and >= 0")
    if float(s.sum()) <= 0.0:
        s = torch.ones_like(s)
    x, t, lo, hi = _one_row(s / s.sum() * int(total), int(total), 0, int(total))
    return _round_rows(x, t, lo[:, None], hi[:, None])[0].to(shares.device)


def clamp_and_redistribute(quotas: Tensor, total: int, lo: int, hi: int) -> Tensor:
    """Integer budgets in ``[lo, hi]`` with ``sum == total`` that follow real ``quotas``.

    ``total`` is first clamped into ``[n*lo, n*hi]`` (outside it nothing else is feasible). If
    every quota is already within bounds and ``|sum(quotas) - total| < 1``, the result is
    ``floor(quota)`` plus largest-remainder rounding (so a head keeps at least ``floor(q_i)``).
    Otherwise the clamped heads sit at their bound and what a clamp frees (or takes) is shared
    by the other heads in proportion to their quotas -- ``x_i = clip(lam * q_i, lo, hi)`` with
    ``sum x == total`` -- then rounded by largest remainder (ties: lower index first).
    (One row of :func:`clamp_and_redistribute_rows`, with its inputs checked.)
    """
    q = quotas.detach().to("cpu", torch.float64).flatten()
    lo, hi, total = int(lo), int(hi), int(total)
    if lo < 0 or lo > hi:
        raise ValueError(f"need 0 <= lo <= hi, got lo={lo}, hi={hi}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError("quotas must be finite")
    return clamp_and_redistribute_rows(*_one_row(q, total, lo, hi))[0].to(quotas.device)


# ---------------------------------------------------------------- head level (online, per layer)


def _layer_total(n_kv_heads: int, layer_budget: float) -> int:
    return math.floor(n_kv_heads * float(layer_budget) + 0.5)


def _bounds(min_keep: int, prompt_len: Optional[int], total: int) -> tuple[int, int]:
    hi = total if prompt_len is None else int(prompt_len)
    if hi < 0 or min_keep < 0:
        raise ValueError(f"prompt_len and min_keep must be >= 0, got {prompt_len!r}, {min_keep!r}")
    return min(int(min_keep), hi), hi


def uniform_head_budgets(
    n_kv_heads: int,
    layer_budget: float,
    prompt_len: Optional[int],
    min_keep: int = 1,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """Every KV head gets ``k_l``; the ``round(Hkv * k_l)`` total is exact (extra slots to the
    lower head indices), clamped to ``[min(min_keep, prompt_len), prompt_len]``."""
    total = _layer_total(n_kv_heads, layer_budget)
    quotas = torch.full((n_kv_heads,), float(layer_budget), dtype=torch.float64)
    return clamp_and_redistribute(quotas, total, *_bounds(min_keep, prompt_len, total)).to(device)


def prompt_preference(
    prompt_mass: Tensor, n_voters: Union[int, float, Tensor], n_kv_heads: Optional[int] = None
) -> Tensor:
    """Per-KV-head prompt preference ``P_h = S_mp / (S_mp + S_mm)``, float64 ``(Hkv,)`` on CPU.

    ``prompt_mass`` is ``S_mp``, the attention mass the voting (mask) queries put on prompt keys,
    shape ``(H,)`` or ``(B, H)`` over query heads. Each voter's softmax row sums to 1 over all keys,
    so ``S_mp + S_mm = n_voters`` (a number, or per-example ``(B,)`` / ``(B, H)``). Reductions:
    the batch by its mean (budgets are shared across the batch), then the ``G = H // n_kv_heads``
    query heads of a KV head (heads ``j*G .. j*G+G-1``, as ``repeat_kv`` lays them out) by their
    sum, since the kept set is per KV head (sum and mean rank alike after normalization).
    """
    pm = prompt_mass.detach().to("cpu", torch.float64)
    pm = pm.unsqueeze(0) if pm.dim() == 1 else pm
    if pm.dim() != 2:
        raise ValueError(
            f"prompt_mass must be (H,) or (B, H), got shape {tuple(prompt_mass.shape)}"
        )
    nv = torch.as_tensor(n_voters, dtype=torch.float64).to("cpu")
    nv = nv.reshape(-1, 1) if nv.dim() == 1 else nv
    if bool((nv <= 0).any()):
        raise ValueError(f"n_voters must be > 0, got {n_voters!r}")
    pref = (pm / nv).mean(0)
    heads = pref.numel()
    n_kv = heads if n_kv_heads is None else int(n_kv_heads)
    if n_kv < 1 or heads % n_kv:
        raise ValueError(f"{heads} query heads cannot be grouped into {n_kv} KV heads")
    return pref.view(n_kv, heads // n_kv).sum(1).clamp_min(0.0)


def maskkv_head_budgets(
    prompt_mass: Tensor,
    n_voters: Union[int, float, Tensor],
    layer_budget: float,
    alpha: float = 0.1,
    min_keep: int = 1,
    prompt_len: Optional[int] = None,
    n_kv_heads: Optional[int] = None,
) -> Tensor:
    """MaskKV's prompt-preference head budgets for one layer (int64 ``(Hkv,)``).

    ``P^_h = P_h / sum_h P_h`` (see :func:`prompt_preference`; all-zero -> uniform) and::

        k_{l,h} = floor(alpha * k_l + (1 - alpha) * Hkv * k_l * P^_h)

    plus largest-remainder rounding so ``sum_h k_{l,h} == round(Hkv * k_l)``; then clamped to
    ``[min(min_keep, prompt_len), prompt_len]`` with redistribution
    (:func:`clamp_and_redistribute`). A head with no prompt preference gets ``floor(alpha * k_l)``
    (or one more by remainder, or ``min_keep`` if larger). ``alpha = 1`` is uniform.
    """
    alpha = _check_fraction("alpha", alpha)
    pref = prompt_preference(prompt_mass, n_voters, n_kv_heads)
    total = _layer_total(pref.numel(), layer_budget)
    quotas = _maskkv_quotas(pref[None], layer_budget, alpha)[0]
    return clamp_and_redistribute(quotas, total, *_bounds(min_keep, prompt_len, total)).to(
        prompt_mass.device
    )


def _maskkv_quotas(pref: Tensor, layer_budget: float, alpha: float) -> Tensor:
    """Real head budgets ``alpha * k_l + (1 - alpha) * Hkv * k_l * P^_h`` from the prompt
    preferences ``pref`` (B, Hkv) float64, ``P^`` each row's normalized (all zero: uniform)."""
    n_kv_heads = pref.shape[1]
    mass = pref.sum(1, keepdim=True)
    p_hat = torch.where(mass > 0, pref / torch.where(mass > 0, mass, 1.0), 1.0 / n_kv_heads)
    k_l = float(layer_budget)
    return alpha * k_l + (1.0 - alpha) * n_kv_heads * k_l * p_hat


def _rows_bounds(
    n_kv_heads: int, layer_budget: float, min_keep: int, prompt_len: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, lo, hi), each (B,): the layer total and each row's head bounds, as
    :func:`_bounds`."""
    hi = prompt_len.to(torch.float64)
    return (
        torch.full_like(hi, _layer_total(n_kv_heads, layer_budget)),
        hi.clamp(max=int(min_keep)),
        hi,
    )


def uniform_head_budgets_rows(
    n_kv_heads: int, layer_budget: float, prompt_len: Tensor, min_keep: int = 1
) -> Tensor:
    """:func:`uniform_head_budgets` for each row's ``prompt_len`` (B,): int64 (B, Hkv) on its
    device, without reading it."""
    quotas = torch.full(
        (prompt_len.shape[0], n_kv_heads),
        float(layer_budget),
        dtype=torch.float64,
        device=prompt_len.device,
    )
    return clamp_and_redistribute_rows(
        quotas, *_rows_bounds(n_kv_heads, layer_budget, min_keep, prompt_len)
    )


def maskkv_head_budgets_rows(
    prompt_mass: Tensor,
    n_voters: Tensor,
    layer_budget: float,
    prompt_len: Tensor,
    n_kv_heads: int,
    alpha: float = 0.1,
    min_keep: int = 1,
) -> Tensor:
    """:func:`maskkv_head_budgets` for every row alone, all rows at once: ``prompt_mass``
    (B, H), ``n_voters`` and ``prompt_len`` (B,). int64 (B, Hkv) on the device of
    ``prompt_mass``, computed there without reading it."""
    batch, heads = prompt_mass.shape
    pref = prompt_mass.to(torch.float64) / n_voters.to(torch.float64)[:, None]  # (B, H)
    pref = (
        pref.view(batch, n_kv_heads, heads // n_kv_heads).sum(2).clamp_min(0.0)
    )  # (B, Hkv), as prompt_preference
    quotas = _maskkv_quotas(pref, layer_budget, alpha)
    return clamp_and_redistribute_rows(
        quotas, *_rows_bounds(n_kv_heads, layer_budget, min_keep, prompt_len)
    )


def adakv_head_budgets(
    scores: Tensor,
    layer_budget: float,
    safeguard: float = 0.2,
    min_keep: int = 1,
    prompt_len: Optional[int] = None,
) -> Tensor:
    """AdaKV head budgets for one layer from its votes ``(Hkv, P)`` or ``(B, Hkv, P)`` (batch:
    mean).

    Of the layer total ``T = round(Hkv * k_l)``, ``round(safeguard * T)`` slots are spread evenly
    over the heads (the safeguard against starving sparse heads); the other ``R`` go to the
    ``R`` highest scores of the whole layer, chosen jointly across heads (ties: lower head, then
    lower position): a head gets as many as it wins. Then clamped to
    ``[min(min_keep, prompt_len), prompt_len]`` (``prompt_len`` defaults to ``P``) with
    redistribution. Every head keeps at least ``floor(safeguard * k_l)`` unless ``min_keep`` or
    ``prompt_len`` forces otherwise.
    """
    safeguard = _check_fraction("safeguard", safeguard)
    s = scores.detach().to("cpu", torch.float64)
    s = s.mean(0) if s.dim() == 3 else s
    if s.dim() != 2:
        raise ValueError(f"scores must be (Hkv, P) or (B, Hkv, P), got shape {tuple(scores.shape)}")
    n, p = s.shape
    total = _layer_total(n, layer_budget)
    lo, hi = _bounds(min_keep, p if prompt_len is None else prompt_len, total)
    total = min(max(total, n * lo), n * hi)
    guard = largest_remainder(torch.ones(n), math.floor(safeguard * total + 0.5))
    rest = min(total - int(guard.sum()), n * p)
    won = torch.sort(s.flatten(), descending=True, stable=True).indices[:rest]
    quotas = guard + torch.bincount(won // p, minlength=n)
    return clamp_and_redistribute(quotas.to(torch.float64), total, lo, hi).to(scores.device)
