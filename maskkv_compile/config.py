"""The one configuration object of maskkv_compile, validated at construction.

``optimize(model, ...)``, ``torch.compile(model, backend="maskkv", options={...})`` and the
CLI all build a :class:`MaskKVConfig`; every option of either surface is accepted here, and
this module is the one place that validates them.

Options that belong to one policy live on that policy's object (``policy=MaskKV(alpha=0.2)``,
``policy=SnapKV(window=16)``, see :mod:`maskkv_compile.policies`); re-selection's options live
on :class:`Revote`. The string spellings (``policy="snapkv"``, ``revote=2``) and the flat
options of earlier versions (``window=16``, ``revote_voters="masked"``) are still accepted and
mapped onto those objects; a flat option the chosen policy does not have is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from maskkv_compile.policies import FLAT_DEFAULTS, MaskKV, MaskKVConfigError, Policy, get_policy

BACKENDS = ("inductor", "eager")
SECOND_TIERS = ("device", "host")  # where revote keeps the full prompt K/V (see Revote.second_tier)
REVOTE_VOTERS = ("response", "masked")  # which response rows vote at a re-vote (Revote.voters)
FAMILIES = {"llada": 0, "dream": 1}  # family -> how many rows before a token its logits live

_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()


def _require_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise MaskKVConfigError(
            f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise MaskKVConfigError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Revote:
    """Re-selection while decoding (``maskkv_compile/revote.py``):
    ``MaskKVConfig(revote=Revote(...))``.

    The prefill also keeps every layer's prompt K/V (the *second tier*, outside the hot cache,
    reported apart in ``cache_stats()["second_tier"]``); at a re-vote step the step's own queries
    of the response rows vote over the whole prompt at each layer, the policy ranks the votes and
    the top-k per KV head under the prefill's per-head budgets replaces the hot cache.

    every: an int ``k``: every k-th step call after a prefill or prompt refresh (1 = every step);
        ``"block"``: at every block refresh of the dual cache (needs ``MaskKVConfig.block_length``;
        an int with ``block_length`` is refused, since a re-vote must see every response row).
    voters: which rows vote. ``"response"`` (default): every response row (Dream: the row before
        each), decoded or not. ``"masked"``: only those still the mask token in the call, as at
        the prefill; a row with no mask left votes with all its response rows.
    second_tier: where the second tier lives. ``"device"`` (default): on the model's device.
        ``"host"``: in host memory (page-locked on CUDA, copied in asynchronously at each re-vote
        and dropped after it): between re-votes the device holds only the hot cache.
    """

    every: Union[int, str] = 1
    voters: str = "response"
    second_tier: str = "device"

    def __post_init__(self) -> None:
        if self.every != "block" and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise MaskKVConfigError(
                "revote must be an int >= 1 (Revote(every=k): re-vote every k "
                'steps) or "block" (at '
                f"every dual-cache block refresh), got {self.every!r}"
            )
        if self.voters not in REVOTE_VOTERS:
            raise MaskKVConfigError(
                f"revote_voters must be one of {REVOTE_VOTERS} (Revote(voters=...): who votes at a "
                f"re-vote), got {self.voters!r}"
            )
        if self.second_tier not in SECOND_TIERS:
            raise MaskKVConfigError(
                f"second_tier must be one of {SECOND_TIERS} (Revote(second_tier=...): where the "
                f"full prompt K/V waits between re-votes), got {self.second_tier!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _as_revote(value: Any, base: Optional[Revote]) -> Optional[Revote]:
    """``revote=`` as given (None, an int, "block" or a Revote) -> a Revote or None; an int or
    "block" keeps ``base``'s voters and second tier."""
    if value is None or isinstance(value, Revote):
        return value
    if value == "block" or (isinstance(value, int) and not isinstance(value, bool)):
        if base is not None:
            return dataclasses.replace(base, every=value)
        return Revote(every=value)
    raise MaskKVConfigError(
        f'revote must be None, an int >= 1 (every k steps), "block" or a '
        f"maskkv_compile.Revote(every=..., voters=..., second_tier=...), got {value!r}"
    )


def _as_policy(value: Any, base: Optional[Policy]) -> Policy:
    """``policy=`` as given (a name or a Policy) -> a Policy; the name of ``base``'s policy keeps
    its options (``replace(config, policy="maskkv")`` on a MaskKV(alpha=0.2) stays so)."""
    if isinstance(value, Policy):
        return value
    if isinstance(value, str):
        if base is not None and base.name == value:
            return base
        try:
            return type(get_policy(value))()
        except ValueError as error:
            raise MaskKVConfigError(f"policy: {error}") from None
    raise MaskKVConfigError(
        f"policy must be a policy name or object (maskkv_compile.MaskKV(...), SnapKV(...), ...), "
        f"got {value!r} ({type(value).__name__})"
    )


# the flat options of earlier versions, now options of a policy or of Revote (still accepted)
_POLICY_FLAT = tuple(FLAT_DEFAULTS)  # alpha, beta, profile, window, pool_kernel, sink, seed
_REVOTE_FLAT = {"second_tier": "second_tier", "revote_voters": "voters"}


@dataclass(frozen=True, init=False, repr=False)
class MaskKVConfig:
    """How MaskKV rewrites and runs a model.

    budget: average number of prompt KV pairs kept per KV head per layer. A prompt no
        longer than the budget is kept whole, which makes the cache exact.
    policy: the eviction policy, an object of :mod:`maskkv_compile.policies` carrying its own
        options: ``MaskKV(alpha=, beta=, profile=)`` (default: the paper's method),
        ``MaskVotingUniform()``, ``SnapKV(window=, kernel=)``, ``PromptVoting()``,
        ``AllVoting()``, ``StreamingLLM(sinks=)``, ``Random(seed=)``, ``PyramidKV(SnapKV())``,
        ``SqueezeAttention(SnapKV(), profile=)``, ``AdaKV(SnapKV())``; or its name ("maskkv",
        "snapkv", ...), which means the object with default options. Read back as
        :attr:`eviction` (the object) and :attr:`policy` (its name).
        **Layer allocation**: MaskKV's boundary-aware layer budgets need a layer profile
        (``MaskKV(profile=maskkv_compile.calibrate(model, prompts))``); without one every layer
        gets ``budget`` (uniform), which :meth:`describe` states.
    mask_token_id: the [MASK] token id. ``None`` = read it from the model config
        (``mask_token_id``; LLaDA's is 126336). Required by the time the model runs.
    backend: "inductor" compiles the rewritten graphs with Inductor; "eager" runs them
        as plain FX code (debugging, fast tests).
    prompt_refresh: recompute the prompt (and re-select the kept entries) every this many
        steps after the prefill; ``None`` never refreshes.
    family: where a token's logits live. "llada": at the token's own row (LLaDA, most
        masked LMs); "dream": one row earlier (Dream, adapted from an autoregressive model,
        predicts token i at row i-1 and its loop shifts the logits). The voters, the prefill
        head, the step graph's rows and the returned logits all follow it. ``None`` = detect
        from the model (:func:`detect_family`: ``config.model_type == "Dream"``, or a Dream
        module in the graph), else "llada"; ``optimize`` and ``backend="maskkv"`` alike.
    vote_chunk: voter query rows processed at once by ``maskkv::mask_votes`` on CPU (keys go
        16x that at a time), which bounds its memory by chunk x P, not L x P.
    reuse_logits: the drop-in call's (B, S, V) logits live in one buffer per prompt, of
        which each call rewrites only the rows it computed, even while the caller still holds
        an earlier call's logits (which then change). Off by default: then a session's
        buffers (up to 256 MiB each) are reused only once nothing outside the runtime holds
        them (``logits_buffers.py``), which a loop that drops each step's logits gets anyway.
        ``response_logits_only()`` avoids the (B, S, V) tensor altogether.
    max_sessions: prompts whose caches are kept at once (2 lets classifier-free guidance
        alternate a conditional and an unconditional prompt without re-prefilling).
    min_keep: fewest prompt entries any KV head keeps (every policy).
    recent: prompt entries nearest the response that every KV head keeps whatever the policy
        ranks (block diffusion: the prefix entries just before the current block), at most
        ``budget``; they come out of the head's budget, nearest first where the budget is
        smaller. 0 (default): the policy alone chooses. Applies at the prefill, at every
        re-selection and at block diffusion's per-block re-selection
        (``maskkv::selection_scores``). A local window for what the voters see only faintly:
        on a block-diffusion checkpoint, items just before the block (``docs/ruler_models.md``).
    block_length: dual cache (Fast-dLLM's, for semi-autoregressive loops such as LLaDA's
        ``generate(..., block_length=...)``). Each row's response positions, in order, are cut
        into blocks of this many; at a block's first call the step graph computes every
        response row and caches their K/V, and the block's later calls compute only that
        block's rows. Needs the same number of response positions in every row (else the
        session runs plain steps and ``cache_stats()["block_cache"]`` says why). ``None``
        (default): every step computes every response row. See ``maskkv_compile/dual_cache.py``.
    prefill_chunk: tokens a causal prefill encodes at once (DiffusionGemma's encoder: its
        prompt goes in chunks onto the cache, exact since every row attends only to earlier
        ones). Bounds the prefill's activations by the chunk instead of the prompt, which on a
        CPU is also faster (``docs/bench.md``). ``None`` encodes the prompt in one call.
        Models whose prompt rows attend bidirectionally (LLaDA, Dream) have no causal prefill.
    token_modules: class names of submodules that map each token on their own but that dynamo
        cannot trace (an MoE block that dispatches on the host, as LLaDA2.0's released
        ``moe_infer``): each runs as one ``maskkv::token_module`` op, eagerly, on the rows the
        graph computes. Checked on a two-token probe at the first call (one tensor in, tensors
        shaped (batch, seq, ...) out, each row as if alone). ``optimize`` only: the backend
        gets what dynamo traced. See ``maskkv_compile/token_modules.py``.
    revote: re-selection while decoding: ``None`` (default: never) or a :class:`Revote`
        (``Revote(every=k | "block", voters=, second_tier=)``); an int ``k`` or ``"block"``
        means ``Revote(every=...)``. ``every="block"`` needs ``block_length``, an int refuses it.

    Flat options of earlier versions, still accepted and put where they belong: ``alpha``,
    ``beta``, ``profile`` (MaskKV; ``profile`` also SqueezeAttention), ``window``,
    ``pool_kernel`` (SnapKV and the policies built on it), ``sink`` (StreamingLLM), ``seed``
    (Random), ``second_tier``, ``revote_voters`` (Revote). One that the chosen policy (or no
    revote) does not have is an error, unless it is the default value.

    The runtime's view: ``config.policy`` is the policy's name; ``config.alpha``, ``beta``,
    ``profile``, ``window``, ``pool_kernel``, ``sink``, ``seed`` the policy's option (or its
    default where the policy has none); ``config.revote`` is ``None``, the int ``k`` or
    ``"block"``; ``config.second_tier`` / ``revote_voters`` the Revote's (or the defaults).
    """

    budget: int = 256
    mask_token_id: Optional[int] = None
    backend: str = "inductor"
    prompt_refresh: Optional[int] = None
    family: Optional[str] = None
    vote_chunk: int = 64
    reuse_logits: bool = False
    max_sessions: int = 2
    eviction: Policy = dataclasses.field(default_factory=MaskKV)
    min_keep: int = 1
    recent: int = 0
    block_length: Optional[int] = None
    prefill_chunk: Optional[int] = 1024
    token_modules: tuple[str, ...] = ()
    reselection: Optional[Revote] = None

    def __init__(
        self,
        budget: int = 256,
        *,
        policy: Any = _UNSET,
        mask_token_id: Optional[int] = None,
        backend: str = "inductor",
        prompt_refresh: Optional[int] = None,
        family: Optional[str] = None,
        vote_chunk: int = 64,
        reuse_logits: bool = False,
        max_sessions: int = 2,
        min_keep: int = 1,
        recent: int = 0,
        block_length: Optional[int] = None,
        prefill_chunk: Optional[int] = 1024,
        token_modules: Sequence[str] = (),
        revote: Any = _UNSET,
        eviction: Optional[Policy] = None,
        reselection: Optional[Revote] = None,
        **flat: Any,
    ) -> None:
        unknown = sorted(set(flat) - set(_POLICY_FLAT) - set(_REVOTE_FLAT))
        if unknown:
            raise MaskKVConfigError(
                f"unknown option(s) {unknown}; valid options: {self.option_names()}"
            )
        chosen = eviction if eviction is not None else MaskKV()
        if not isinstance(chosen, Policy):
            raise MaskKVConfigError(f"eviction must be a Policy, got {chosen!r}")
        if policy is not _UNSET:
            chosen = _as_policy(policy, eviction)
        for name in _POLICY_FLAT:  # flat options onto the policy (an error where it has none)
            if name in flat:
                chosen = chosen.with_flat(name, flat[name])
        again = reselection if revote is _UNSET else _as_revote(revote, reselection)
        if again is not None and not isinstance(again, Revote):
            raise MaskKVConfigError(f"reselection must be a Revote, got {again!r}")
        for name, attribute in _REVOTE_FLAT.items():
            if name not in flat:
                continue
            value = flat[name]
            if again is None:
                if value == (SECOND_TIERS[0] if name == "second_tier" else REVOTE_VOTERS[0]):
                    continue  # the default: nothing is ignored
                raise MaskKVConfigError(
                    f"{name}={value!r} is an option of re-selection: set revote too "
                    f"(revote=maskkv_compile.Revote(every=1, {attribute}={value!r}), or an int k "
                    f'or "block"), or drop {name}'
                )
            again = dataclasses.replace(again, **{attribute: value})
        values = dict(
            budget=budget,
            mask_token_id=mask_token_id,
            backend=backend,
            prompt_refresh=prompt_refresh,
            family=family,
            vote_chunk=vote_chunk,
            reuse_logits=reuse_logits,
            max_sessions=max_sessions,
            eviction=chosen,
            min_keep=min_keep,
            recent=recent,
            block_length=block_length,
            prefill_chunk=prefill_chunk,
            token_modules=_as_names(token_modules),
            reselection=again,
        )
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._validate()

    def _validate(self) -> None:
        _require_int("budget", self.budget, minimum=1)
        _require_int("mask_token_id", self.mask_token_id, minimum=0, allow_none=True)
        if self.backend not in BACKENDS:
            raise MaskKVConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _require_int("prompt_refresh", self.prompt_refresh, minimum=1, allow_none=True)
        if self.family is not None and self.family not in FAMILIES:
            raise MaskKVConfigError(
                f"family must be one of {sorted(FAMILIES)} (or None to detect), got {self.family!r}"
            )
        _require_int("vote_chunk", self.vote_chunk, minimum=1)
        _require_int("max_sessions", self.max_sessions, minimum=1)
        _require_int("min_keep", self.min_keep, minimum=1)
        _require_int("recent", self.recent, minimum=0)
        if self.recent > self.budget:
            raise MaskKVConfigError(
                f"recent={self.recent} exceeds budget={self.budget}: every head would keep only "
                f"recent entries; give recent at most the budget (a few entries, such as "
                f"budget // 16)"
            )
        _require_int("block_length", self.block_length, minimum=1, allow_none=True)
        _require_int("prefill_chunk", self.prefill_chunk, minimum=1, allow_none=True)
        if not isinstance(self.token_modules, tuple) or not all(
            isinstance(name, str) and name for name in self.token_modules
        ):
            raise MaskKVConfigError(
                "token_modules must be a tuple of module class names (such as "
                f'("LLaDA2MoeSparseMoeBlock",)), got {self.token_modules!r}'
            )
        if not isinstance(self.reuse_logits, bool):
            raise MaskKVConfigError(
                f"reuse_logits must be True or False, got {self.reuse_logits!r}"
            )
        again = self.reselection
        if again is not None and again.every == "block" and self.block_length is None:
            raise MaskKVConfigError(
                'revote="block" (Revote(every="block")) re-selects at dual-cache block refreshes: '
                "set block_length too, or give every an int (every k steps)"
            )
        if again is not None and again.every != "block" and self.block_length is not None:
            raise MaskKVConfigError(
                f"revote={again.every} with block_length: a block step does not compute every "
                'response row; use revote="block" (Revote(every="block"): re-select at every '
                "block refresh)"
            )

    # ---- the runtime's view (read-only; what the passes and the runtime read)

    @property
    def policy(self) -> str:
        """The runtime's view: the policy's name ("maskkv", "snapkv", ...); the object is
        :attr:`eviction`."""
        return self.eviction.name

    @property
    def alpha(self) -> float:
        """The runtime's view: ``MaskKV.alpha`` (0.1 under other policies)."""
        return self.eviction.flat_options()["alpha"]

    @property
    def beta(self) -> float:
        """The runtime's view: ``MaskKV.beta`` (0.4 under other policies)."""
        return self.eviction.flat_options()["beta"]

    @property
    def profile(self) -> Optional[Any]:
        """The runtime's view: the policy's layer profile (MaskKV, SqueezeAttention), else None."""
        return self.eviction.flat_options()["profile"]

    @property
    def window(self) -> int:
        """The runtime's view: ``SnapKV.window`` of a SnapKV-based policy (32 elsewhere)."""
        return self.eviction.flat_options()["window"]

    @property
    def pool_kernel(self) -> int:
        """The runtime's view: ``SnapKV.kernel`` of a SnapKV-based policy (5 elsewhere)."""
        return self.eviction.flat_options()["pool_kernel"]

    @property
    def sink(self) -> int:
        """The runtime's view: ``StreamingLLM.sinks`` (4 elsewhere)."""
        return self.eviction.flat_options()["sink"]

    @property
    def seed(self) -> int:
        """The runtime's view: ``Random.seed`` (0 elsewhere)."""
        return self.eviction.flat_options()["seed"]

    @property
    def revote(self) -> Union[None, int, str]:
        """The runtime's view: ``None`` (no re-selection), the int ``k`` or ``"block"``
        (``Revote.every``)."""
        return None if self.reselection is None else self.reselection.every

    @property
    def second_tier(self) -> str:
        """The runtime's view: ``Revote.second_tier`` ("device" without revote)."""
        return "device" if self.reselection is None else self.reselection.second_tier

    @property
    def revote_voters(self) -> str:
        """The runtime's view: ``Revote.voters`` ("response" without revote)."""
        return "response" if self.reselection is None else self.reselection.voters

    @property
    def logits_shift(self) -> int:
        """How many rows before a token its logits live (0 LLaDA, 1 Dream)."""
        return FAMILIES[self.family or "llada"]

    @property
    def layer_allocation(self) -> str:
        """How the budget is split across layers, in words (uniform when MaskKV has no profile)."""
        return self.eviction.layer_allocation()

    # ---- options, printing, hashing

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option ``from_options`` / ``optimize`` / the backend take, the flat ones of
        earlier versions included (each readable back as ``getattr(config, name)``)."""
        return [
            "budget",
            "mask_token_id",
            "backend",
            "prompt_refresh",
            "family",
            "vote_chunk",
            "reuse_logits",
            "max_sessions",
            "policy",
            "profile",
            "alpha",
            "beta",
            "min_keep",
            "recent",
            "window",
            "pool_kernel",
            "sink",
            "seed",
            "block_length",
            "prefill_chunk",
            "token_modules",
            "revote",
            "second_tier",
            "revote_voters",
        ]

    @classmethod
    def from_options(
        cls, options: Optional[Mapping[str, Any]] = None, base: Optional["MaskKVConfig"] = None
    ) -> "MaskKVConfig":
        """Build a config from a dict of options (``torch.compile(..., options=...)``),
        on top of ``base``; an unknown key is an error that names it."""
        options = dict(options or {})
        unknown = sorted(k for k in options if k not in cls.option_names())
        if unknown:
            raise MaskKVConfigError(
                f"unknown option(s) {unknown}; valid options: {cls.option_names()}"
            )
        return dataclasses.replace(base or cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready: the policy and revote as dicts (``{"name": ..., options}``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            key = {"eviction": "policy", "reselection": "revote"}.get(f.name, f.name)
            out[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    def fingerprint(self) -> str:
        """Stable hash of every option (folded into each pass's ``uuid()``)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The whole effective configuration, one line: every option with its value, the policy
        and revote as objects, and the layer allocation that will run."""
        parts = []
        for f in dataclasses.fields(self):
            key = {"eviction": "policy", "reselection": "revote"}.get(f.name, f.name)
            parts.append(f"{key}={getattr(self, f.name)!r}")
        parts.append(f"layers={self.layer_allocation!r}")
        return f"MaskKVConfig({', '.join(parts)})"

    __repr__ = describe


def _as_names(names: Any) -> Any:
    """A list of names as the tuple the config holds (anything else is validated as given)."""
    return tuple(names) if isinstance(names, list) else names


def detect_family(model: Any = None, graph: Any = None) -> str:
    """The model family (``MaskKVConfig.family``) when none is given; ``optimize`` and the
    ``backend="maskkv"`` both call this, so both give the same default.

    "dream" when the model's config says ``model_type == "Dream"``; for a graph (what the
    backend receives, without the model), when one of its modules is Dream's (a class named
    ``Dream...``, as Dream's ``DreamBaseModel`` / ``DreamDecoderLayer``) or the model's own
    ``forward`` (the outermost frame of the graph's stack traces) is defined in a file named
    after Dream (``modeling_dream.py``). Else "llada" (logits at the token's own row).
    """
    config = getattr(model, "config", None)
    if config is not None and str(getattr(config, "model_type", "")).lower() == "dream":
        return "dream"
    nodes = list(getattr(getattr(graph, "graph", graph), "nodes", ())) if graph is not None else []
    for node in nodes:
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            kind = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else entry
            name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", "")
            if name.rsplit(".", 1)[-1].lower().startswith("dream"):
                return "dream"
    for node in nodes:
        trace = node.meta.get("stack_trace")
        if trace:  # the first frame is the root module's forward
            match = re.search(r'File "([^"]+)", line \d+, in forward', trace)
            return (
                "dream"
                if match and "dream" in os.path.basename(match.group(1)).lower()
                else "llada"
            )
    return "llada"


def resolve(config: MaskKVConfig, *, model: Any = None, graph: Any = None) -> MaskKVConfig:
    """``config`` with what it leaves to the model filled in (today: the family, by
    :func:`detect_family`); the one step ``optimize`` and ``backend="maskkv"`` share."""
    if config.family is None:
        config = dataclasses.replace(config, family=detect_family(model, graph))
    return config
