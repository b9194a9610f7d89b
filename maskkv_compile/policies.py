"""Eviction policies: who votes, how votes become scores, how the budget is split.

A policy is one frozen class whose constructor arguments are its options, validated at
construction: :class:`MaskKV` (alpha, beta, profile), :class:`MaskVotingUniform`,
:class:`SnapKV` (window, kernel), :class:`PromptVoting`, :class:`AllVoting`,
:class:`StreamingLLM` (sinks), :class:`Random` (seed), and the baselines that select as SnapKV
does, :class:`PyramidKV`, :class:`SqueezeAttention` (profile) and :class:`AdaKV`, each taking
a ``SnapKV(...)``. A class's ``name`` is its string spelling (``POLICIES`` maps each name to
the object with default options); its class attributes name the mechanisms the runtime runs
(voters, vote transform, layer and head allocators), whose math is below and in
:mod:`maskkv_compile.budgets`. Adding a policy is adding one subclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkv_compile.budgets import (
    adakv_head_budgets,
    coverage_layer_budgets,
    maskkv_head_budgets,
    maskkv_head_budgets_rows,
    maskkv_layer_budgets,
    pyramid_layer_budgets,
    squeeze_layer_budgets,
    uniform_head_budgets,
    uniform_head_budgets_rows,
    uniform_layer_budgets,
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


def streaming_votes(
    P: int,
    sink: int = 4,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """StreamingLLM as scores ``(P,)``: sink positions ``i < sink`` score ``2P - i`` (all above
    every other score, earliest first), the rest score their position (most recent first), so the
    top-k is the ``min(k, sink)`` first tokens plus the ``k - sink`` most recent ones."""
    pos = torch.arange(P, device=device, dtype=torch.float64)
    return torch.where(pos < sink, 2 * P - pos, pos).to(dtype)


def streaming_votes_rows(
    prompt_len: Tensor, width: int, sink: int = 4, dtype: torch.dtype = torch.float32
) -> Tensor:
    """:func:`streaming_votes` of each row's ``prompt_len`` (B,) at once, on its device without
    reading it: (B, width), row b's first ``prompt_len[b]`` entries its scores (the rest are
    filler for the caller to drop)."""
    pos = torch.arange(width, device=prompt_len.device, dtype=torch.float64)[None, :]  # (1, width)
    return torch.where(pos < sink, 2 * prompt_len.to(torch.float64)[:, None] - pos, pos).to(dtype)


def random_votes(
    B: int, Hkv: int, P: int, seed: int = 0, device: Union[str, torch.device, None] = None
) -> Tensor:
    """Uniform random scores ``(B, Hkv, P)`` from a CPU generator seeded with ``seed``: the same on
    every call and every device."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand((B, Hkv, P), generator=gen).to(device)


def _as_index(idx) -> Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.dim() > 1:
        raise ValueError(
            f"positions must be 1-D (shared by the batch), got shape {tuple(idx.shape)}"
        )
    return idx.flatten()


def _mask_voters(prompt_idx: Tensor, resp_idx: Tensor, window: int, shift: int) -> Tensor:
    last = (
        int(torch.cat([prompt_idx, resp_idx]).max()) if prompt_idx.numel() + resp_idx.numel() else 0
    )
    return (resp_idx + shift).clamp(0, last)


_VOTERS: dict[str, Callable[[Tensor, Tensor, int, int], Tensor]] = {
    "mask": _mask_voters,
    "window": lambda prompt_idx, resp_idx, window, shift: prompt_idx[
        max(prompt_idx.numel() - window, 0) :
    ],
    "prompt": lambda prompt_idx, resp_idx, window, shift: prompt_idx,
    "all": lambda prompt_idx, resp_idx, window, shift: (
        torch.sort(torch.cat([prompt_idx, resp_idx])).values
    ),
    "none": lambda prompt_idx, resp_idx, window, shift: prompt_idx[:0],
}


def voter_positions(
    policy: Union[str, "Policy"], prompt_idx, resp_idx, window: int = 32, shift: int = 0
) -> Tensor:
    """Sequence positions (int64, 1-D) of the queries that vote under ``policy``:
    mask voters (maskkv, mask_voting_uniform) = response positions ``+ shift`` clamped to the
    sequence (Dream: shift -1); window voters (snapkv and the allocation baselines built on it) =
    the last ``window`` prompt positions; prompt_voting = all prompt positions; all_voting = every
    position; streaming / random use no voters (empty)."""
    kind = get_policy(policy).voters
    return _VOTERS[kind](_as_index(prompt_idx), _as_index(resp_idx), int(window), int(shift))


# ---------------------------------------------------------------- policy registry


def _need_importance(
    importance: Optional[Sequence[float]], n_layers: int, policy: str
) -> Sequence[float]:
    if importance is None:
        raise ValueError(
            f"policy {policy!r} needs a layer-importance profile (LayerProfile.importance); "
            "measure one on calibration prompts first"
        )
    if len(importance) != n_layers:
        raise ValueError(
            f"importance has {len(importance)} values but the model has {n_layers} layers"
        )
    return importance


_LAYER_ALLOCATORS: dict[str, Callable[..., list[float]]] = {
    "uniform": lambda pol, n, b, imp, **kw: uniform_layer_budgets(n, b),
    "maskkv": lambda pol, n, b, imp, **kw: maskkv_layer_budgets(
        _need_importance(imp, n, pol), b, **kw
    ),
    "pyramid": lambda pol, n, b, imp, **kw: pyramid_layer_budgets(n, b, **kw),
    "squeeze": lambda pol, n, b, imp, **kw: squeeze_layer_budgets(
        _need_importance(imp, n, pol), b, **kw
    ),
}


def _need(value, what: str, policy: str):
    if value is None:
        raise ValueError(f"policy {policy!r} needs {what}")
    return value


_HEAD_ALLOCATORS: dict[str, Callable[..., Tensor]] = {
    "uniform": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: uniform_head_budgets(
        n_kv, k_l, p, mk
    ),
    "maskkv": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: maskkv_head_budgets(
        _need(pm, "prompt_mass", pol),
        _need(nv, "n_voters", pol),
        k_l,
        min_keep=mk,
        prompt_len=p,
        n_kv_heads=n_kv,
        **kw,
    ),
    "adakv": lambda pol, k_l, n_kv, p, mk, pm, nv, votes, **kw: adakv_head_budgets(
        _need(votes, "votes", pol), k_l, min_keep=mk, prompt_len=p, **kw
    ),
}

# the allocators that do every row of a batch at once on the device, without reading it
_ROW_HEAD_ALLOCATORS: dict[str, Callable[..., Tensor]] = {
    "uniform": lambda k_l, n_kv, p, mk, pm, nv, **kw: uniform_head_budgets_rows(n_kv, k_l, p, mk),
    "maskkv": lambda k_l, n_kv, p, mk, pm, nv, **kw: maskkv_head_budgets_rows(
        pm, nv, k_l, p, n_kv, min_keep=mk, **kw
    ),
}

_VOTE_TRANSFORMS: dict[str, Callable[..., Tensor]] = {
    "none": lambda pol, votes, shape, device, kw: _need(votes, "votes", pol),
    "snapkv_pool": lambda pol, votes, shape, device, kw: snapkv_pool(
        _need(votes, "votes", pol), kw.get("kernel", 5)
    ),
    "streaming": lambda pol, votes, shape, device, kw: streaming_votes(
        shape[-1], kw.get("sink", 4), device
    ).expand(shape),
    "random": lambda pol, votes, shape, device, kw: random_votes(
        *shape, seed=kw.get("seed", 0), device=device
    ),
}


class MaskKVConfigError(ValueError):
    """An invalid maskkv_compile option; the message names the option and what to do.
    (Defined here, under every option object; ``maskkv_compile.config`` re-exports it.)"""


PolicyError = MaskKVConfigError


# the flat options of the runtime's view (``MaskKVConfig.window`` ...) and their values where a
# policy has no such option: the ops take every one of them as an argument, used or not
FLAT_DEFAULTS: dict[str, Any] = {
    "alpha": 0.1,
    "beta": 0.4,
    "profile": None,
    "window": 32,
    "pool_kernel": 5,
    "sink": 4,
    "seed": 0,
}

_CLASSES: dict[str, type] = {}  # name -> policy class (every subclass of Policy with a name)


def _check_int(owner: str, name: str, value: Any, minimum: int, odd: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (odd and value % 2 == 0)
    ):
        what = f"an odd int >= {minimum}" if odd else f"an int >= {minimum}"
        raise PolicyError(f"{owner}({name}=...) must be {what}, got {value!r}")


def _check_fraction_option(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{owner}({name}=...) must be a number in [0, 1], got {value!r}")


def _check_profile(owner: str, value: Any) -> None:
    from maskkv_compile.profile import LayerProfile

    if value is not None and not isinstance(value, LayerProfile):
        raise PolicyError(
            f"{owner}(profile=...) must be a LayerProfile (from maskkv_compile.calibrate(model, "
            f"prompts) or LayerProfile.load(path)) or None, got {type(value).__name__}"
        )


@dataclass(frozen=True)
class Policy:
    """An eviction policy: who votes, how votes become scores, and how the budget is split.

    Every policy is one frozen class; its constructor arguments are its options, validated at
    construction (an option of another policy cannot be written). The class attributes say how
    the runtime runs it:

    name: the string spelling (``optimize(model, policy="snapkv")`` = ``policy=SnapKV()``).
    voters: "mask" | "window" | "prompt" | "all" | "none" (see :func:`voter_positions`).
    vote_transform: "none" | "snapkv_pool" | "streaming" | "random".
    layer_allocator: "uniform" | "maskkv" | "pyramid" | "squeeze".
    head_allocator: "uniform" | "maskkv" | "adakv".

    Adding a policy is adding one subclass with these attributes (it registers itself by name).
    """

    name: ClassVar[str] = ""
    voters: ClassVar[str] = "none"
    vote_transform: ClassVar[str] = "none"
    layer_allocator: ClassVar[str] = "uniform"
    head_allocator: ClassVar[str] = "uniform"
    description: ClassVar[str] = ""
    opt_in: ClassVar[bool] = False  # left out of POLICIES (the default sweeps); found by name
    # flat option name (the runtime's view, MaskKVConfig.<name>) -> this class's field
    _FLAT: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            _CLASSES[cls.name] = cls

    # ---- options

    @property
    def needs_profile(self) -> bool:
        """Whether the layer allocator needs a layer-importance profile (and has none yet)."""
        return (
            self.layer_allocator in ("maskkv", "squeeze") and getattr(self, "profile", None) is None
        )

    @property
    def uses_profile(self) -> bool:
        """Whether the layer allocator splits the budget by a layer-importance profile."""
        return self.layer_allocator in ("maskkv", "squeeze")

    def flat_options(self) -> dict[str, Any]:
        """The runtime's view: every flat option (window, pool_kernel, sink, seed, alpha, beta,
        profile), this policy's value where it has the option, else :data:`FLAT_DEFAULTS`'."""
        out = dict(FLAT_DEFAULTS)
        for flat, attribute in self._flat_fields().items():
            out[flat] = self._get(attribute)
        return out

    def _flat_fields(self) -> dict[str, str]:
        return dict(self._FLAT)

    def takes(self, flat: str) -> bool:
        """Whether this policy has the flat option ``flat`` (e.g. "window": SnapKV and the policies
        built on it)."""
        return flat in self._flat_fields()

    def _get(self, attribute: str) -> Any:
        obj = self
        for part in attribute.split("."):
            obj = getattr(obj, part)
        return obj

    def with_flat(self, flat: str, value: Any) -> "Policy":
        """This policy with the flat option ``flat`` (e.g. ``window``) set to ``value``; an error
        naming the policies that take it when this one does not (a default value passes)."""
        fields = self._flat_fields()
        if flat not in fields:
            if (
                flat in FLAT_DEFAULTS
                and value == FLAT_DEFAULTS[flat]
                and not isinstance(value, bool)
            ):
                return self  # the default: nothing is ignored
            takers = sorted(name for name, cls in _CLASSES.items() if flat in cls()._flat_fields())
            raise PolicyError(
                f"option {flat}={_short(value)} does not apply to policy {self!r}: it is an option "
                f"of {', '.join(takers) or 'no policy'}. Drop it, or choose a policy that has it "
                f"(e.g. policy={_example(flat, value)})"
            )
        return _replace_path(self, fields[flat].split("."), value)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <option>: value, ...}``, JSON-ready (a profile as its dict)."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={_short(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def layer_allocation(self) -> str:
        """What the layer allocator runs, in words (stated by ``MaskKVConfig.describe()``)."""
        if self.layer_allocator == "uniform":
            return "uniform"
        if self.layer_allocator == "pyramid":
            return "pyramid (decreasing with depth)"
        profile = getattr(self, "profile", None)
        kind = self._layer_kind()
        if profile is None:
            return (
                f"uniform: {type(self).__name__} has no layer profile, so its {kind} layer "
                "allocation is NOT run (pass profile=maskkv_compile.calibrate(model, prompts))"
            )
        return (
            f"{kind} from a profile of {profile.meta.get('n_prompts', '?')} calibration prompt(s)"
        )

    # ---- what the runtime calls (the mechanism tags above choose the math)

    def layer_budgets(
        self, n_layers: int, budget: float, importance: Optional[Sequence[float]] = None, **options
    ) -> list[float]:
        """Per-layer budgets ``k_l`` (``importance``: default this policy's profile; ``options``:
        the allocator's hyper-parameters, default this policy's)."""
        if importance is None and getattr(self, "profile", None) is not None:
            importance = self.profile.importance
        return _LAYER_ALLOCATORS[self.layer_allocator](
            self.name, n_layers, budget, importance, **{**self._layer_options(), **options}
        )

    def _layer_options(self) -> dict[str, Any]:
        return {}

    def _layer_kind(self) -> str:
        """The profile-driven layer allocation, in words."""
        return (
            "boundary-aware"
            if self.layer_allocator == "maskkv"
            else "squeeze (3 groups by importance)"
        )

    def _head_options(self) -> dict[str, Any]:
        return {}

    def head_budgets(
        self,
        layer_budget: float,
        *,
        n_kv_heads: int,
        prompt_len: int,
        min_keep: int = 1,
        prompt_mass: Optional[Tensor] = None,
        n_voters=None,
        votes: Optional[Tensor] = None,
        **options,
    ) -> Tensor:
        """int64 ``(Hkv,)`` budgets of one layer; passes what the head allocator needs
        (maskkv: prompt_mass + n_voters; adakv: votes ``(B, Hkv, P)``)."""
        return _HEAD_ALLOCATORS[self.head_allocator](
            self.name,
            layer_budget,
            n_kv_heads,
            prompt_len,
            min_keep,
            prompt_mass,
            n_voters,
            votes,
            **{**self._head_options(), **options},
        )

    @property
    def allocates_rows(self) -> bool:
        """Whether :meth:`head_budgets_rows` serves this policy (uniform and maskkv heads; AdaKV's
        joint ranking runs row by row on the CPU)."""
        return self.head_allocator in _ROW_HEAD_ALLOCATORS

    def head_budgets_rows(
        self,
        layer_budget: float,
        *,
        n_kv_heads: int,
        prompt_len: Tensor,
        min_keep: int,
        prompt_mass: Tensor,
        n_voters: Tensor,
        **options,
    ) -> Tensor:
        """int64 ``(B, Hkv)``: :meth:`head_budgets` of every row alone (``prompt_len``,
        ``n_voters`` (B,), ``prompt_mass`` (B, H)), all at once on their device, reading nothing."""
        return _ROW_HEAD_ALLOCATORS[self.head_allocator](
            layer_budget,
            n_kv_heads,
            prompt_len,
            min_keep,
            prompt_mass,
            n_voters,
            **{**self._head_options(), **options},
        )

    def selection_scores(
        self,
        votes: Optional[Tensor],
        shape: tuple[int, int, int],
        device: Union[str, torch.device, None] = None,
        **options,
    ) -> Tensor:
        """Scores ``(B, Hkv, P)`` whose per-head top-k is kept (options: kernel, sink, seed;
        default this policy's)."""
        flat = self.flat_options()
        mine = {"kernel": flat["pool_kernel"], "sink": flat["sink"], "seed": flat["seed"]}
        return _VOTE_TRANSFORMS[self.vote_transform](
            self.name, votes, tuple(shape), device, {**mine, **options}
        )


def _short(value: Any) -> str:
    from maskkv_compile.profile import LayerProfile

    if isinstance(value, LayerProfile):
        return f"LayerProfile({value.n_layers} layers, {value.meta.get('n_prompts', '?')} prompts)"
    return repr(value)


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(
        obj, **{path[0]: _replace_path(getattr(obj, path[0]), path[1:], value)}
    )


def _example(flat: str, value: Any) -> str:
    return {
        "alpha": f"MaskKV(alpha={value!r})",
        "beta": f"MaskKV(beta={value!r})",
        "profile": "MaskKV(profile=...)",
        "window": f"SnapKV(window={value!r})",
        "pool_kernel": f"SnapKV(kernel={value!r})",
        "sink": f"StreamingLLM(sinks={value!r})",
        "seed": f"Random(seed={value!r})",
    }.get(flat, "...")


@dataclass(frozen=True, repr=False)
class MaskKV(Policy):
    """The paper's method: Mask-Voting (the mask queries vote), boundary-aware layer budgets from
    a layer ``profile``, prompt-preference head budgets.

    alpha: base rate of the prompt-preference head allocation (paper: 0.1).
    beta: base rate of the boundary-aware layer allocation (paper: 0.4).
    profile: the offline :class:`~maskkv_compile.profile.LayerProfile` the layer allocation
        splits by (``maskkv_compile.calibrate``). ``None``: uniform layer budgets, said so by
        ``MaskKVConfig.describe()`` and with a warning when the model is rewritten.
    layers: "boundary" (the paper's boundary-aware split by layer importance) or "coverage"
        (``beta * B`` per layer, the rest where the profile's attention-coverage curves rise
        most: :func:`~maskkv_compile.budgets.coverage_layer_budgets`; needs a profile from
        ``calibrate``, which measures the curves).
    """

    alpha: float = 0.1
    beta: float = 0.4
    profile: Optional[Any] = None
    layers: str = "boundary"

    name: ClassVar[str] = "maskkv"
    voters: ClassVar[str] = "mask"
    layer_allocator: ClassVar[str] = "maskkv"
    head_allocator: ClassVar[str] = "maskkv"
    description: ClassVar[str] = "Mask-Voting + boundary-aware layers + prompt-preference heads"
    _FLAT: ClassVar[dict[str, str]] = {"alpha": "alpha", "beta": "beta", "profile": "profile"}

    def __post_init__(self) -> None:
        _check_fraction_option("MaskKV", "alpha", self.alpha)
        _check_fraction_option("MaskKV", "beta", self.beta)
        _check_profile("MaskKV", self.profile)
        if self.layers not in ("boundary", "coverage"):
            raise PolicyError(
                f"MaskKV(layers={self.layers!r}) is not a layer allocation; valid: 'boundary' "
                "(the paper's), 'coverage' (by calibrated attention coverage)"
            )
        if self.layers == "coverage" and self.profile is not None and not self.profile.has_coverage:
            raise PolicyError(
                "MaskKV(layers='coverage') needs a profile with attention-coverage curves, and "
                "this one has none (it was saved by an older maskkv_compile): measure it again "
                "with maskkv_compile.calibrate(model, prompts)"
            )

    def layer_budgets(
        self, n_layers: int, budget: float, importance: Optional[Sequence[float]] = None, **options
    ) -> list[float]:
        if self.layers == "coverage" and self.profile is not None:
            if len(self.profile.coverage) != n_layers:
                raise ValueError(
                    f"the profile's coverage has {len(self.profile.coverage)} layers, the "
                    f"model {n_layers}"
                )
            beta = options.get("beta", self.beta)
            return coverage_layer_budgets(
                self.profile.coverage, self.profile.coverage_k, budget, beta
            )
        return super().layer_budgets(n_layers, budget, importance, **options)

    def _layer_kind(self) -> str:
        return "coverage-greedy" if self.layers == "coverage" else "boundary-aware"

    def _layer_options(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def _head_options(self) -> dict[str, Any]:
        return {"alpha": self.alpha}


@dataclass(frozen=True, repr=False)
class MaskKVCoverage(MaskKV):
    """MaskKV with ``layers="coverage"``: the layer budgets that maximise the calibrated
    attention coverage (docs/rxnfp_budget_analysis.md). Opt-in by name: not in the default
    sweep of :data:`POLICIES`, since the paper's method is MaskKV's boundary-aware split."""

    layers: str = "coverage"

    name: ClassVar[str] = "maskkv_coverage"
    description: ClassVar[str] = "Mask-Voting + coverage-greedy layers + prompt-preference heads"
    opt_in: ClassVar[bool] = True


@dataclass(frozen=True, repr=False)
class MaskVotingUniform(Policy):
    """Mask-Voting with uniform layer and head budgets (the paper's allocation ablation)."""

    name: ClassVar[str] = "mask_voting_uniform"
    voters: ClassVar[str] = "mask"
    description: ClassVar[str] = "Mask-Voting with uniform budgets"


@dataclass(frozen=True, repr=False)
class SnapKV(Policy):
    """SnapKV: the last ``window`` prompt queries vote (paper: 32); the votes are average-pooled
    over positions with an odd ``kernel`` (5; 1 = no pooling). Uniform budgets. Also the
    selection of :class:`PyramidKV`, :class:`SqueezeAttention` and :class:`AdaKV`."""

    window: int = 32
    kernel: int = 5

    name: ClassVar[str] = "snapkv"
    voters: ClassVar[str] = "window"
    vote_transform: ClassVar[str] = "snapkv_pool"
    description: ClassVar[str] = "last-window prompt queries vote, pooled"
    _FLAT: ClassVar[dict[str, str]] = {"window": "window", "pool_kernel": "kernel"}

    def __post_init__(self) -> None:
        _check_int("SnapKV", "window", self.window, 1)
        _check_int("SnapKV", "kernel", self.kernel, 1, odd=True)


@dataclass(frozen=True, repr=False)
class PromptVoting(Policy):
    """Every prompt query votes (the paper's "prompt voting" ablation). Uniform budgets."""

    name: ClassVar[str] = "prompt_voting"
    voters: ClassVar[str] = "prompt"
    description: ClassVar[str] = "all prompt queries vote"


@dataclass(frozen=True, repr=False)
class AllVoting(Policy):
    """Every query (prompt and mask) votes. Uniform budgets."""

    name: ClassVar[str] = "all_voting"
    voters: ClassVar[str] = "all"
    description: ClassVar[str] = "every query votes"


@dataclass(frozen=True, repr=False)
class StreamingLLM(Policy):
    """StreamingLLM: keep the first ``sinks`` prompt tokens (attention sinks, 4) and the most
    recent ones. No voting. Uniform budgets."""

    sinks: int = 4

    name: ClassVar[str] = "streaming"
    vote_transform: ClassVar[str] = "streaming"
    description: ClassVar[str] = "StreamingLLM: sink + most recent"
    _FLAT: ClassVar[dict[str, str]] = {"sink": "sinks"}

    def __post_init__(self) -> None:
        _check_int("StreamingLLM", "sinks", self.sinks, 0)


@dataclass(frozen=True, repr=False)
class Random(Policy):
    """A uniformly random subset, the same for every call (scores from a CPU generator seeded
    with ``seed``). Uniform budgets."""

    seed: int = 0

    name: ClassVar[str] = "random"
    vote_transform: ClassVar[str] = "random"
    description: ClassVar[str] = "seeded random subset"
    _FLAT: ClassVar[dict[str, str]] = {"seed": "seed"}

    def __post_init__(self) -> None:
        _check_int("Random", "seed", self.seed, 0)


@dataclass(frozen=True, repr=False)
class _OnSnapKV(Policy):
    """A baseline that selects as SnapKV does (``selection``) and allocates its own way."""

    selection: SnapKV = dataclasses.field(default_factory=SnapKV)

    voters: ClassVar[str] = "window"
    vote_transform: ClassVar[str] = "snapkv_pool"

    def __post_init__(self) -> None:
        if not isinstance(self.selection, SnapKV):
            raise PolicyError(
                f"{type(self).__name__}(selection=...) must be a SnapKV(window=..., kernel=...), "
                f"got {self.selection!r}"
            )

    def _flat_fields(self) -> dict[str, str]:
        return {**{flat: f"selection.{attr}" for flat, attr in SnapKV._FLAT.items()}, **self._FLAT}


@dataclass(frozen=True, repr=False)
class PyramidKV(_OnSnapKV):
    """SnapKV selection, PyramidKV layer budgets: decreasing arithmetically with depth, the last
    layer getting ``B / 20`` (PyramidKV's beta, fixed at the paper's 20)."""

    name: ClassVar[str] = "pyramidkv"
    layer_allocator: ClassVar[str] = "pyramid"
    description: ClassVar[str] = "SnapKV selection, PyramidKV layer budgets"


@dataclass(frozen=True, repr=False)
class SqueezeAttention(_OnSnapKV):
    """SnapKV selection, SqueezeAttention layer budgets: the layers clustered into 3 groups by a
    layer ``profile`` (as MaskKV's), the least important group at 40% of the budget."""

    profile: Optional[Any] = None

    name: ClassVar[str] = "squeezeattention"
    layer_allocator: ClassVar[str] = "squeeze"
    description: ClassVar[str] = "SnapKV selection, SqueezeAttention layers"
    _FLAT: ClassVar[dict[str, str]] = {"profile": "profile"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_profile("SqueezeAttention", self.profile)


@dataclass(frozen=True, repr=False)
class AdaKV(_OnSnapKV):
    """SnapKV selection, AdaKV head budgets: each layer's budget split across its KV heads by
    the scores ranked jointly, 20% spread evenly as a safeguard."""

    name: ClassVar[str] = "adakv"
    head_allocator: ClassVar[str] = "adakv"
    description: ClassVar[str] = "SnapKV selection, AdaKV head budgets"


POLICIES: dict[str, Policy] = {
    name: cls() for name, cls in _CLASSES.items() if not cls.opt_in
}  # the defaults, by name (``get_policy`` also finds the opt-in ones)


def get_policy(name: Union[str, Policy]) -> Policy:
    """The policy called ``name`` with its default options (a :class:`Policy` passes through)."""
    if isinstance(name, Policy):
        return name
    if isinstance(name, str) and name in POLICIES:
        return POLICIES[name]
    if isinstance(name, str) and name in _CLASSES:  # a policy class defined after this module
        return _CLASSES[name]()
    raise PolicyError(
        f"unknown policy {name!r}; valid policies: {', '.join(sorted(_CLASSES))} "
        "(or a policy object: maskkv_compile.MaskKV(...), SnapKV(...), ...)"
    )


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
