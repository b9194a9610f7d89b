"""The quality suite: every sample x (policy, budget), the same greedy infilling loop, metrics.

Loop (LLaDA's ``low_confidence`` remasking with ``steps == span length``): each step calls
``net(x).logits`` -- the drop-in contract, token ids only -- and fixes the one masked position
whose most likely token is the most probable (the mask token itself is never predicted).

Configurations (rows of the JSON's ``cells``):

* ``uncached``: the plain model in the same loop (reference);
* ``full_cache``: ``optimize(budget=FULL_BUDGET)``: the whole prompt is kept; the prompt K/V
  are computed once at step 0 and reused (reference);
* ``full_cache+refresh``: the same with ``prompt_refresh=1`` (a prefill every step; equals
  ``uncached`` up to float rounding);
* ``<policy>@<budget>``: ``optimize(model, budget=B, mask_token_id=..., backend="eager",
  policy=P, profile=profile)``; ``<policy>@full`` uses ``FULL_BUDGET``.
* ``<policy>@<budget>+revote<k>`` (``revotes=[k, ...]``): the same with ``revote=k`` (re-selection
  with the step's queries every k steps, ``maskkv_compile/revote.py``), and
  ``<policy>@<budget>+refresh<k>`` (``refreshes=[k, ...]``): with ``prompt_refresh=k``, the
  expensive way to the same end. Both only at budgets below ``full``. Policies whose layer
  allocator needs a layer profile (maskkv, squeezeattention) get one from
  :func:`maskkv_compile.calibrate` on the bundle's calibration prompts, never on evaluated ones.

Per cell (one sample, one configuration): ``tokens`` (the fill), ``score`` (fraction equal to
the true tokens; for a retrieval bundle, 1 if all of them are, else 0), ``agree_uncached`` /
``agree_full`` (fraction equal to the uncached / full-cache fill), ``kl`` (mean over still-masked
positions of KL(uncached || cached) of the softmaxed logits at step 1, the first step-graph call,
both models fed the same ``x``), ``kept`` (mean kept prompt entries per KV head), ``seconds`` (the
whole cell, the KL reference included), ``net_seconds`` (the calls of the configuration's model
alone: its cost per token), ``step_ms`` (mean of its calls after the first: the per-step cost),
``revotes`` (re-votes run), ``transitions`` (the runtime's routing counts: which path ran).

A bundle with ``block_length`` (a block-diffusion model) runs the block loop of :func:`infill`
instead: the same one-token-per-step rule inside the current block, the window growing by one
block, the block-causal mask passed with every call.

``semi_ar=B`` (full-attention models) runs LLaDA's semi-autoregressive loop instead, for every
configuration: the span is cut into blocks of ``B`` from its first position and each step fixes
the most confident masked position of the lowest block that still holds one. ``dual=True`` then
adds ``<policy>@<budget>+dual`` and ``full_cache+dual``: the same with Fast-dLLM's dual cache
(``optimize(block_length=B)``, ``maskkv_compile/dual_cache.py``), whose block steps compute the
current block's rows only. The dual cache needs a span that is a multiple of ``B`` (the
runtime's grid rule); a shorter or ragged span runs plain steps there, and its cell's
``transitions`` show it (no ``block_step``).

``recent=R`` runs every cached configuration with ``optimize(recent=R)`` (at most the cell's
budget): each head keeps the R prompt entries nearest the answer (block loops: just before the
current block) first. A JSON run with one ``recent`` refuses to resume with another.

Resumable: the JSON is rewritten after every configuration; with ``resume=True`` the cells
already in it are not recomputed (and a configuration whose cells are all present is not even
optimized), the layer profile is read back from it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from maskkv_compile.evaluation.models import Bundle, Sample

FULL = "full"
FULL_BUDGET = 1 << 16  # >= every prompt, even for maskkv's smallest layer share (beta * B)
UNCACHED, FULL_CACHE, FULL_REFRESH = "uncached", "full_cache", "full_cache+refresh"
FULL_DUAL = "full_cache+dual"
REFERENCES = (UNCACHED, FULL_CACHE, FULL_REFRESH, FULL_DUAL)
FORMAT = "maskkv-quality"
VERSION = 1

Budget = Union[int, str]


@dataclass(frozen=True)
class Config:
    key: str
    policy: Optional[str] = None  # None: the plain model
    budget: Optional[Budget] = None
    refresh: Optional[int] = None
    revote: Optional[Union[int, str]] = None
    revote_voters: str = "response"
    dual: bool = False

    @property
    def int_budget(self) -> int:
        return FULL_BUDGET if self.budget == FULL else int(self.budget)


def config_key(
    policy: str,
    budget: Budget,
    *,
    revote: Optional[Union[int, str]] = None,
    refresh: Optional[int] = None,
    revote_voters: str = "response",
    dual: bool = False,
) -> str:
    key = f"{policy}@{budget}"
    if revote is not None:
        key += f"+revote{revote}" + ("" if revote_voters == "response" else f"+{revote_voters}")
    if refresh is not None:
        key += f"+refresh{refresh}"
    if dual:
        key += "+dual"
    return key


def parse_budget(value: Union[str, int]) -> Budget:
    if isinstance(value, str) and value.lower() == FULL:
        return FULL
    budget = int(value)
    if budget < 1:
        raise ValueError(f"budgets must be >= 1 or 'full', got {value!r}")
    return budget


def configurations(
    policies: Sequence[str],
    budgets: Sequence[Budget],
    revotes: Sequence[Union[int, str]] = (),
    refreshes: Sequence[int] = (),
    revote_voters: str = "response",
    dual: bool = False,
) -> list[Config]:
    """References first (the others' agreement is measured against them), then policy x budget,
    then (``dual``) policy x budget with the dual cache, then policy x budget (below full) x each
    re-vote interval, and x each prompt refresh interval."""
    refs = [
        Config(UNCACHED),
        Config(FULL_CACHE, "mask_voting_uniform", FULL),
        Config(FULL_REFRESH, "mask_voting_uniform", FULL, refresh=1),
    ]
    if dual:
        refs.append(Config(FULL_DUAL, "mask_voting_uniform", FULL, dual=True))
    out = refs + [Config(config_key(p, b), p, b) for p in policies for b in budgets]
    if dual:
        out += [
            Config(config_key(p, b, dual=True), p, b, dual=True) for p in policies for b in budgets
        ]
    for p in policies:
        for b in budgets:
            if b == FULL:
                continue
            out += [
                Config(
                    config_key(p, b, revote=r, revote_voters=revote_voters),
                    p,
                    b,
                    revote=r,
                    revote_voters=revote_voters,
                )
                for r in revotes
            ]
            out += [Config(config_key(p, b, refresh=r), p, b, refresh=r) for r in refreshes]
    return out


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), in float64."""
    log_p = torch.log_softmax(p_logits.double(), -1)
    log_q = torch.log_softmax(q_logits.double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(int(x == y) for x, y in zip(a, b)) / max(len(a), 1)


def optimized(
    model: torch.nn.Module,
    mask_id: int,
    policy: str,
    budget: int,
    *,
    profile=None,
    refresh: Optional[int] = None,
    seed: int = 0,
    revote: Optional[Union[int, str]] = None,
    revote_voters: str = "response",
    block_length: Optional[int] = None,
    recent: int = 0,
):
    """``model`` as every configuration of the suite runs it: ``optimize`` on the eager backend.
    ``profile`` is required by the policies whose layer allocator needs one, ignored by the rest;
    ``block_length`` turns the dual cache on; ``recent`` is ``MaskKVConfig.recent``, at most
    the budget (a full-budget cell keeps everything anyway)."""
    import maskkv_compile
    from maskkv_compile.policies import get_policy

    if get_policy(policy).needs_profile and profile is None:
        raise ValueError(
            f"policy {policy!r} needs a layer profile: pass profile=maskkv_compile.calibrate(...)"
        )
    chosen = (
        get_policy(policy).with_flat("seed", seed)
        if get_policy(policy).takes("seed")
        else get_policy(policy)
    )
    return maskkv_compile.optimize(
        model,
        budget=budget,
        mask_token_id=mask_id,
        backend="eager",
        policy=chosen,
        profile=profile if get_policy(policy).needs_profile else None,
        prompt_refresh=refresh,
        revote=revote,
        revote_voters=revote_voters if revote is not None else None,
        block_length=block_length,
        recent=min(recent, budget),
    )


@torch.no_grad()
def infill(
    net,
    sample: Sample,
    mask_id: int,
    reference: Optional[torch.nn.Module] = None,
    block_length: Optional[int] = None,
    semi_ar: Optional[int] = None,
):
    """The greedy loop; returns (filled tokens, KL at step 1 against ``reference`` or None,
    calls). With ``block_length`` (a block-diffusion model) it is the block loop: the window is
    ``x[:, :end]`` with ``end`` the end of the current block (blocks of ``block_length`` from
    position 0, the last one cut at the sequence's end), called with the block-causal mask; a
    step fixes one masked position of the current block, and the window grows by one block when
    the block has none left. With ``semi_ar`` (a full-attention model) the whole sequence is
    called, and a step fixes one masked position of the span's lowest block of ``semi_ar``
    positions that still holds one (LLaDA's semi-autoregressive loop)."""
    if block_length is not None and semi_ar is not None:
        raise ValueError(
            "semi_ar is the loop of a full-attention model; a block-diffusion model "
            f"(block_length={block_length}) runs its own block loop"
        )
    x = sample.masked(mask_id)
    n = x.shape[1]
    positions = torch.arange(n)
    kwargs: dict = {}
    end = n
    if block_length is not None:
        from maskkv_compile.evaluation.ruler import block_mask

        full_mask = block_mask(n, block_length)
        end = min(n, (sample.start // block_length + 1) * block_length)
    kl = None
    for step in range(sample.span_len):
        while not bool((x[0, :end] == mask_id).any()):  # the block is finished: grow the window
            end = min(n, end + block_length)
        if block_length is not None:
            kwargs = {"attention_mask": full_mask[:, :, :end, :end]}
        window = x[:, :end]
        masked = window[0] == mask_id
        logits = net(window, **kwargs).logits[0].float()
        if step == 1 and reference is not None:
            ref = reference(window, **kwargs).logits[0].float()
            kl = kl_divergence(ref[masked], logits[masked])
        logits[:, mask_id] = float("-inf")
        confidence, tokens = torch.softmax(logits, -1).max(-1)
        eligible = masked
        if semi_ar is not None:  # the lowest block of the span that still holds a mask
            lo = sample.start + (int(masked.nonzero()[0]) - sample.start) // semi_ar * semi_ar
            eligible = masked & (positions[:end] >= lo) & (positions[:end] < lo + semi_ar)
        confidence = torch.where(eligible, confidence, float("-inf"))
        pick = int(confidence.argmax())
        x[0, pick] = tokens[pick]
    assert not bool((x == mask_id).any())
    return x[0, sample.start : sample.stop].tolist(), kl, sample.span_len


class Suite:
    """Runs (or resumes) the suite for one :class:`Bundle`; ``results`` is the JSON document."""

    def __init__(
        self,
        bundle: Bundle,
        policies: Sequence[str],
        budgets: Sequence[Budget],
        *,
        json_path: Optional[Union[str, Path]] = None,
        resume: bool = False,
        progress: bool = True,
        seed: int = 0,
        revotes: Sequence[Union[int, str]] = (),
        refreshes: Sequence[int] = (),
        revote_voters: str = "response",
        semi_ar: Optional[int] = None,
        dual: bool = False,
        recent: int = 0,
    ):
        from maskkv_compile.policies import get_policy

        for policy in policies:
            get_policy(policy)  # unknown names fail before anything runs
        if semi_ar is not None and bundle.block_length is not None:
            raise ValueError(
                f"semi_ar is a full-attention model's loop; {bundle.name} is a block-diffusion "
                f"model and runs its own block loop (block {bundle.block_length})"
            )
        if semi_ar is not None and semi_ar < 1:
            raise ValueError(f"semi_ar must be a block length >= 1, got {semi_ar}")
        if dual and semi_ar is None:
            raise ValueError(
                "dual=True (the dual cache) needs semi_ar=B: the dual cache caches the response "
                "rows outside the current block of a semi-autoregressive loop"
            )
        if recent < 0:
            raise ValueError(f"recent must be >= 0, got {recent}")
        self.semi_ar, self.dual, self.recent = semi_ar, dual, recent
        self.bundle = bundle
        self.policies = list(policies)
        self.budgets = budgets_in_order([parse_budget(b) for b in budgets])
        self.revotes = [parse_revote(r) for r in revotes]
        self.refreshes = [int(r) for r in refreshes]
        self.revote_voters = revote_voters
        self.json_path = Path(json_path) if json_path else None
        self.progress = progress
        self.seed = seed
        self.optimize_calls = 0  # what a resumed run must not repeat
        self.model_calls = 0
        self.profile = None
        self.results = self._fresh()
        if resume and self.json_path and self.json_path.exists():
            self._merge(json.loads(self.json_path.read_text()))

    # -- the JSON document -------------------------------------------------------------------
    def _fresh(self) -> dict:
        b = self.bundle
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": b.name,
            "note": b.note,
            "seed": self.seed,
            "environment": {"torch": torch.__version__, **_versions()},
            "full_budget": FULL_BUDGET,
            "policies": self.policies,
            "budgets": self.budgets,
            "tasks": list(b.tasks),
            "revotes": self.revotes,
            "refreshes": self.refreshes,
            "revote_voters": [self.revote_voters] if self.revotes else [],
            "semi_ar": self.semi_ar,
            "dual": self.dual,
            "recent": self.recent,
            "samples": {s.id: {**s.to_dict(), "text": b.decode(s.truth())} for s in b.samples},
            "profile": None,
            "cells": {},
        }

    def _merge(self, old: dict) -> None:
        if old.get("format") != FORMAT or old.get("model") != self.bundle.name:
            raise ValueError(f"{self.json_path} is not a quality JSON of {self.bundle.name}")
        if old.get("semi_ar") != self.semi_ar:
            raise ValueError(
                f"{self.json_path} was run with semi_ar={old.get('semi_ar')} (the loop), not "
                f"{self.semi_ar}; use another --out"
            )
        if old.get("recent", 0) != self.recent:
            raise ValueError(
                f"{self.json_path} was run with recent={old.get('recent', 0)}, not "
                f"{self.recent}; use another --out"
            )
        self.results["dual"] = bool(old.get("dual")) or self.dual
        for sid, sample in self.results["samples"].items():
            prev = old["samples"].get(sid)
            if prev is not None and (prev["ids"], prev["start"], prev["stop"]) != (
                sample["ids"],
                sample["start"],
                sample["stop"],
            ):
                raise ValueError(
                    f"{self.json_path}: sample {sid} differs from the one evaluated "
                    "now; use another --out"
                )
        self.results["samples"] = {**old["samples"], **self.results["samples"]}
        self.results["cells"] = old.get("cells", {})
        self.results["policies"] = _union(old.get("policies", []), self.policies)
        self.results["budgets"] = budgets_in_order(_union(old.get("budgets", []), self.budgets))
        self.results["revotes"] = _union(old.get("revotes", []), self.revotes)
        self.results["refreshes"] = _union(old.get("refreshes", []), self.refreshes)
        self.results["revote_voters"] = _union(
            old.get("revote_voters", ["response"] if old.get("revotes") else []),
            self.results["revote_voters"],
        )
        self.results["tasks"] = _union(old.get("tasks", []), self.results["tasks"])
        if old.get("profile"):
            from maskkv_compile.profile import LayerProfile

            self.results["profile"] = old["profile"]
            self.profile = LayerProfile.from_dict(old["profile"])

    def save(self) -> None:
        self._agreements()
        if self.json_path is None:
            return
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, self.json_path)

    # -- running -----------------------------------------------------------------------------
    def _missing(self, config: Config) -> list[Sample]:
        done = self.results["cells"].get(config.key, {})
        return [s for s in self.bundle.samples if s.id not in done]

    def layer_profile(self, coverage: bool = False):
        """The layer profile, measured once on the bundle's calibration prompts (or read back).
        ``coverage``: it must hold coverage curves; a profile read back from a JSON written
        before they existed is measured again, and must have the same importances."""
        if self.profile is None or (coverage and not self.profile.has_coverage):
            b = self.bundle
            measured = b.calibrate()
            self.model_calls += len(b.calibration)
            old = self.profile
            if old is not None and not torch.allclose(
                torch.tensor(old.importance), torch.tensor(measured.importance), atol=1e-6
            ):
                raise ValueError(
                    f"{self.json_path}: the layer profile measured now differs from the one its "
                    "cells were computed with; use another --out"
                )
            self.profile = measured
            self.results["profile"] = self.profile.to_dict()
        return self.profile

    def _net(self, config: Config):
        if config.policy is None:
            return self.bundle.model
        from maskkv_compile.policies import get_policy

        policy = get_policy(config.policy)
        coverage = getattr(policy, "layers", None) == "coverage"
        profile = self.layer_profile(coverage) if policy.needs_profile else None
        self.optimize_calls += 1
        return optimized(
            self.bundle.model,
            self.bundle.mask_id,
            config.policy,
            config.int_budget,
            profile=profile,
            refresh=config.refresh,
            seed=self.seed,
            revote=config.revote,
            revote_voters=config.revote_voters,
            block_length=self.semi_ar if config.dual else None,
            recent=self.recent,
        )

    def run(self) -> dict:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            tqdm = None
        configs = configurations(
            self.policies,
            self.budgets,
            self.revotes,
            self.refreshes,
            self.revote_voters,
            dual=self.dual,
        )
        todo = [(c, self._missing(c)) for c in configs]
        total = sum(len(m) for _, m in todo)
        bar = (
            tqdm(
                total=total,
                desc=f"quality {self.bundle.name}",
                unit="cell",
                disable=not self.progress or total == 0,
            )
            if tqdm
            else None
        )
        torch.manual_seed(self.seed)
        for config, missing in todo:
            if not missing:
                continue
            if bar is not None:
                bar.set_postfix_str(config.key)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = self._net(config)
                if (
                    config.policy is not None
                ):  # warm-up, untimed: the first call traces and compiles
                    net.reset()
                    self._infill(net, missing[0])
                    self.model_calls += missing[0].span_len
                cells = self.results["cells"].setdefault(config.key, {})
                for sample in missing:
                    cells[sample.id] = self._cell(config, net, sample)
                    if bar is not None:
                        bar.update(1)
            del net
            self.save()
        if bar is not None:
            bar.close()
        self.save()
        return self.results

    def _infill(self, net, sample: Sample, reference=None):
        b = self.bundle
        return infill(net, sample, b.mask_id, reference, b.block_length, self.semi_ar)

    def _agreements(self) -> None:
        """``agree_uncached`` / ``agree_full`` of every cell, from the stored fills."""
        cells = self.results["cells"]
        for by_sample in cells.values():
            for sid, cell in by_sample.items():
                for name, ref in (("agree_uncached", UNCACHED), ("agree_full", FULL_CACHE)):
                    other = cells.get(ref, {}).get(sid)
                    cell[name] = (
                        None if other is None else agreement(cell["tokens"], other["tokens"])
                    )

    def _cell(self, config: Config, net, sample: Sample) -> dict:
        t0 = time.perf_counter()
        reference = None if config.policy is None else self.bundle.model
        if config.policy is not None:
            net.reset()
        timed = _Timed(net)
        tokens, kl, calls = self._infill(timed, sample, reference)
        seconds = time.perf_counter() - t0
        self.model_calls += calls + (reference is not None and sample.span_len > 1)
        kept = revotes = transitions = None
        if config.policy is not None:
            stats = net.cache_stats()
            layers = stats["layers"]
            kept = sum(
                sum(layer["kept_per_kv_head"]) / len(layer["kept_per_kv_head"]) for layer in layers
            ) / len(layers)
            revotes = stats.get("revotes", 0)
            transitions = stats["transitions"]
        steps = timed.times[1:]
        return {
            "tokens": tokens,
            "text": self.bundle.decode(tokens),
            "score": self._score(tokens, sample),
            "kl": 0.0 if config.key == UNCACHED else kl,
            "kept": kept,
            "seconds": round(seconds, 4),
            "net_seconds": round(sum(timed.times), 5),
            "step_ms": round(1e3 * sum(steps) / len(steps), 4) if steps else None,
            "revotes": revotes,
            "transitions": transitions,
        }

    def _score(self, tokens: list[int], sample: Sample) -> float:
        if self.bundle.exact:
            return float(tokens == sample.truth())
        return agreement(tokens, sample.truth())


class _Timed:
    """Calls ``net`` and records each call's wall time (the cost of the configuration alone)."""

    def __init__(self, net):
        self.net, self.times = net, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def parse_revote(value: Union[str, int]) -> Union[int, str]:
    if isinstance(value, str) and value == "block":
        raise ValueError(
            "revote='block' needs block_length, which the suite's one-token-per-step loop does not "
            "use; give an int (every k steps)"
        )
    revote = int(value)
    if revote < 1:
        raise ValueError(f"revote intervals must be >= 1, got {value!r}")
    return revote


def budgets_in_order(budgets: Sequence) -> list:
    """Budgets ascending, ``full`` last: the order of the JSON's columns, tables and plots (a
    resumed run may add budgets below the old ones)."""
    return sorted(b for b in budgets if b != FULL) + [b for b in budgets if b == FULL]


def _union(a: Sequence, b: Sequence) -> list:
    out = list(a)
    out += [x for x in b if x not in out]
    return out


def _versions() -> dict:
    out = {}
    for name in ("transformers", "antiberty", "rxnfp"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # not installed
            pass
    return out


def run_suite(
    model: str = "tiny-llama",
    policies: Optional[Sequence[str]] = None,
    budgets: Sequence[Budget] = (4, 8, FULL),
    *,
    samples: Optional[int] = None,
    tasks: Optional[Sequence[str]] = None,
    out: Optional[Union[str, Path]] = None,
    resume: bool = False,
    progress: bool = True,
    seed: int = 0,
    bundle: Optional[Bundle] = None,
    checkpoint: Optional[str] = None,
    context: Optional[int] = None,
    revotes: Sequence[Union[int, str]] = (),
    refreshes: Sequence[int] = (),
    revote_voters: str = "response",
    semi_ar: Optional[int] = None,
    dual: bool = False,
    recent: int = 0,
) -> Suite:
    """Load ``model`` (``checkpoint``: a folder of the project's own models; ``context``: the
    RULER tasks' length), run every missing cell, write ``<out>/quality_<model>.json``; returns
    the suite; ``semi_ar`` / ``dual``: the semi-autoregressive loop and the dual-cache cells
    (:class:`Suite`)."""
    from maskkv_compile.evaluation.models import load_bundle
    from maskkv_compile.policies import POLICIES

    bundle = bundle or load_bundle(
        model, samples, tasks, seed=seed, checkpoint=checkpoint, context=context
    )
    path = Path(out) / f"quality_{bundle.name.replace('-', '_')}.json" if out is not None else None
    suite = Suite(
        bundle,
        list(policies or POLICIES),
        budgets,
        json_path=path,
        resume=resume,
        progress=progress,
        seed=seed,
        revotes=revotes,
        refreshes=refreshes,
        revote_voters=revote_voters,
        semi_ar=semi_ar,
        dual=dual,
        recent=recent,
    )
    suite.run()
    return suite
