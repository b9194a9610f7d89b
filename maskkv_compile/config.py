"""The one configuration object of maskkv_compile, validated at construction.

``optimize(model, ...)`` and ``torch.compile(model, backend="maskkv", options={...})`` both
build a :class:`MaskKVConfig`; every option of either surface is a field here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

BACKENDS = ("inductor", "eager")
SECOND_TIERS = ("device", "host")  # where revote keeps the full prompt K/V (see MaskKVConfig.second_tier)
REVOTE_VOTERS = ("response", "masked")  # which response rows vote at a re-vote (MaskKVConfig.revote_voters)
FAMILIES = {"llada": 0, "dream": 1}  # family -> how many rows before a token its logits live


class MaskKVConfigError(ValueError):
    """An invalid maskkv_compile option; the message names the option and what to do."""


def _require_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise MaskKVConfigError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise MaskKVConfigError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class MaskKVConfig:
    """How MaskKV rewrites and runs a model.

    budget: average number of prompt KV pairs kept per KV head per layer. A prompt no
        longer than the budget is kept whole, which makes the cache exact.
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
        from the model (``config.model_type == "Dream"``), else "llada".
    vote_chunk: voter query rows processed at once by ``maskkv::mask_votes`` on CPU (keys go
        16x that at a time), which bounds its memory by chunk x P, not L x P.
    reuse_logits: the drop-in call's (B, S, V) logits live in one buffer per prompt, of
        which each call rewrites only the rows it computed (the prompt rows stay zero).
        Saves allocating and zeroing B x S x V floats every step (4 GB in fp32 at LLaDA's
        vocabulary and an 8k prompt); the catch: a logits tensor returned by an earlier call
        changes when the model is called again. Off by default; ``response_logits_only()``
        avoids the (B, S, V) tensor altogether.
    max_sessions: prompts whose caches are kept at once (2 lets classifier-free guidance
        alternate a conditional and an unconditional prompt without re-prefilling).
    policy: eviction policy, a name from ``maskkv_compile.policies.POLICIES``: "maskkv"
        (Mask-Voting, boundary-aware layer budgets, prompt-preference head budgets) or a
        baseline (snapkv, prompt_voting, all_voting, streaming, random, pyramidkv,
        squeezeattention, adakv, mask_voting_uniform).
    profile: offline :class:`~maskkv_compile.profile.LayerProfile` for policies that split the
        budget across layers by importance (maskkv, squeezeattention). Without one they fall
        back to uniform layer budgets (with a warning).
    alpha: base rate of the prompt-preference head allocation (paper: 0.1).
    beta: base rate of the boundary-aware layer allocation (paper: 0.4).
    min_keep: fewest prompt entries any KV head keeps.
    window: voter window of SnapKV and the baselines built on it (paper: 32).
    pool_kernel: SnapKV's average-pooling kernel over positions (5).
    sink: StreamingLLM's sink tokens (4).
    seed: seed of the ``random`` policy.
    block_length: dual cache (Fast-dLLM's, for semi-autoregressive loops such as LLaDA's
        ``generate(..., block_length=...)``). Each row's response positions, in order, are cut
        into blocks of this many; at a block's first call the step graph computes every
        response row and caches their K/V, and the block's later calls compute only that
        block's rows, attending to [kept prompt K/V ; cached K/V of the other response rows ;
        the block's own]. Needs the same number of response positions in every row (else the
        session runs plain steps and ``cache_stats()["block_cache"]`` says why). ``None``
        (default): every step computes every response row, as without this option. See
        ``maskkv_compile/blocks.py``.
    revote: re-selection while decoding (``maskkv_compile/revote.py``). The prefill also keeps
        every layer's prompt K/V (the *second tier*, outside the hot cache, reported apart in
        ``cache_stats()["second_tier"]``); at a re-vote step the step's own queries of the
        response rows vote over the whole prompt at each layer, layer by layer inside the step,
        the policy ranks the votes and the top-k per KV head under the prefill's per-head
        budgets replaces the hot cache (positions stay absolute; no prompt row is recomputed).
        ``None`` (default): never, exactly as without this option. An int ``k``: every k-th
        step call after a prefill or prompt refresh (1 = every step). ``"block"``: at every
        block refresh of the dual cache (needs ``block_length``; an int with ``block_length``
        is refused, since a re-vote must see every response row).
    second_tier: where ``revote`` keeps the second tier. ``"device"`` (default): on the model's
        device. ``"host"``: in host memory (page-locked when the model is on CUDA, so the copies
        run asynchronously), copied to the device at each re-vote and dropped there after it:
        between re-votes the device holds only the hot cache. On a CPU model both are the same
        memory. Needs ``revote``.
    revote_voters: which rows vote at a re-vote. ``"response"`` (default): every response row
        (Dream: the row before each), decoded or not. ``"masked"``: only those whose position is
        still the mask token in the call, as at the prefill, where every response position is;
        a row with no mask left votes with all its response rows. Needs ``revote``.
    """

    budget: int = 256
    mask_token_id: Optional[int] = None
    backend: str = "inductor"
    prompt_refresh: Optional[int] = None
    family: Optional[str] = None
    vote_chunk: int = 64
    reuse_logits: bool = False
    max_sessions: int = 2
    policy: str = "maskkv"
    profile: Optional[Any] = None
    alpha: float = 0.1
    beta: float = 0.4
    min_keep: int = 1
    window: int = 32
    pool_kernel: int = 5
    sink: int = 4
    seed: int = 0
    block_length: Optional[int] = None
    revote: Optional[Any] = None
    second_tier: str = "device"
    revote_voters: str = "response"

    def __post_init__(self) -> None:
        _require_int("budget", self.budget, minimum=1)
        _require_int("mask_token_id", self.mask_token_id, minimum=0, allow_none=True)
        if self.backend not in BACKENDS:
            raise MaskKVConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _require_int("prompt_refresh", self.prompt_refresh, minimum=1, allow_none=True)
        if self.family is not None and self.family not in FAMILIES:
            raise MaskKVConfigError(f"family must be one of {sorted(FAMILIES)} (or None to detect), got {self.family!r}")
        _require_int("vote_chunk", self.vote_chunk, minimum=1)
        _require_int("max_sessions", self.max_sessions, minimum=1)
        _require_int("block_length", self.block_length, minimum=1, allow_none=True)
        if self.revote is not None:
            if self.revote == "block":
                if self.block_length is None:
                    raise MaskKVConfigError('revote="block" re-selects at dual-cache block refreshes: set block_length too, '
                                            "or give revote an int (every k steps)")
            elif isinstance(self.revote, bool) or not isinstance(self.revote, int) or self.revote < 1:
                raise MaskKVConfigError(f'revote must be None, an int >= 1 (every k steps) or "block", got {self.revote!r}')
            elif self.block_length is not None:
                raise MaskKVConfigError(f'revote={self.revote} with block_length: a block step does not compute every '
                                        'response row; use revote="block" (re-select at every block refresh)')
        if self.second_tier not in SECOND_TIERS:
            raise MaskKVConfigError(f"second_tier must be one of {SECOND_TIERS}, got {self.second_tier!r}")
        if self.second_tier != "device" and self.revote is None:
            raise MaskKVConfigError(f"second_tier={self.second_tier!r} places revote's second tier: set revote too "
                                    "(an int k or \"block\"), or leave second_tier at \"device\"")
        if self.revote_voters not in REVOTE_VOTERS:
            raise MaskKVConfigError(f"revote_voters must be one of {REVOTE_VOTERS}, got {self.revote_voters!r}")
        if self.revote_voters != "response" and self.revote is None:
            raise MaskKVConfigError(f"revote_voters={self.revote_voters!r} chooses who votes at a re-vote: set revote too "
                                    "(an int k or \"block\"), or leave revote_voters at \"response\"")
        if not isinstance(self.reuse_logits, bool):
            raise MaskKVConfigError(f"reuse_logits must be True or False, got {self.reuse_logits!r}")
        from maskkv_compile.policies import get_policy
        from maskkv_compile.profile import LayerProfile

        try:
            get_policy(self.policy)
        except ValueError as error:
            raise MaskKVConfigError(f"policy: {error}") from None
        if self.profile is not None and not isinstance(self.profile, LayerProfile):
            raise MaskKVConfigError(f"profile must be a LayerProfile (see maskkv_compile.calibrate), got {type(self.profile).__name__}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise MaskKVConfigError(f"{name} must be a number in [0, 1], got {value!r}")
        for name in ("min_keep", "window", "pool_kernel", "sink", "seed"):
            _require_int(name, getattr(self, name), minimum=0 if name in ("sink", "seed") else 1)

    @property
    def logits_shift(self) -> int:
        """How many rows before a token its logits live (0 LLaDA, 1 Dream)."""
        return FAMILIES[self.family or "llada"]

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, base: Optional["MaskKVConfig"] = None) -> "MaskKVConfig":
        """Build a config from a dict of options (``torch.compile(..., options=...)``),
        on top of ``base``; an unknown key is an error that names it."""
        options = dict(options or {})
        unknown = {k: options.pop(k) for k in list(options) if k not in cls.option_names()}
        if unknown:
            raise MaskKVConfigError(f"unknown option(s) {sorted(unknown)}; valid options: {cls.option_names()}")
        return dataclasses.replace(base or cls(), **options)

    def to_dict(self) -> dict[str, Any]:
        options = {name: getattr(self, name) for name in self.option_names()}
        if self.profile is not None:
            options["profile"] = self.profile.to_dict()
        return options

    def fingerprint(self) -> str:
        """Stable hash of every option (folded into each pass's ``uuid()``)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
