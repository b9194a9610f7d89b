"""Why MaskKV loses quality on rxnfp at a budget of 5 prompt KV pairs per head: measurements.

On the quality suite's rxnfp samples (``load_bundle("rxnfp", samples)``: ``--samples`` reactions
per task, tasks product_span and suffix; 8 -> 16 samples), with the suite's greedy infill loop
(``maskkv_compile.evaluation.suite.infill``) and score:

1. **Retention** (100 * sum of task scores / sum of the full prompt cache's, as the suite's
   tables) of library configurations at budget ``--budget`` (B, default 5), each built with
   ``maskkv_compile.optimize(..., backend="eager")``:
   ``maskkv`` as the suite runs it (layer profile from ``calibrate`` on the bundle's calibration
   prompts), the same with ``revote=1``, ``mask_voting_uniform``, ``MaskKV()`` without a profile
   (uniform layers), ``MaskKV(alpha=1)`` (uniform heads); "evict one layer" (B in layer l, the
   whole prompt in the others) and "spare one layer" (the whole prompt in layer l, B in the
   others), one run per layer; and a layer allocation measured on the calibration prompts
   (``coverage``, same total as B everywhere, see 3.), with and without ``revote=1``. The
   per-layer budgets are a :class:`~maskkv_compile.policies.MaskKV` subclass whose
   ``layer_budgets`` returns a fixed list (the policy extension point; heads: MaskKV's
   prompt-preference allocation).
2. **Attention** of the unoptimized model (eager attention, forward hooks) along the full prompt
   cache's own trajectory: hooks on every layer's key / value projections replace the prompt
   rows of later steps with those of step 0, which is what the prompt cache computes (checked:
   same fills as the library's full cache). Per layer and head, for the queries of the
   still-masked positions at step 0 (the prefill, whose votes choose the kept entries), step 1
   (the first cached step) and steps >= 2: the share of their attention on prompt keys; the
   fraction of that prompt mass on the entries the library's ``maskkv`` at B keeps (its
   ``kept_pos`` after the prefill); the fraction the best set of the same size *at that step*
   would hold (the step's own top-k: 1 minus it is what no selection of that size can hold, it
   minus the kept fraction is vote drift); the entries needed for 90% of the prompt mass; the
   mass share and kept rate of [CLS] and [SEP]. Also checked: masking the evicted keys in the
   eager model (per layer and head) reproduces the library's ``maskkv`` fills.
3. **Coverage allocation**: on the calibration reactions (disjoint from the evaluated ones,
   masked as the two tasks mask), the mean over cached steps of the attention mass that the
   top-k entries by the step-0 votes hold (weighted by the head's prompt share), for every
   layer, head and k; slots go greedily to the (layer, head) with the largest marginal gain
   until ``n_layers * n_heads * B`` are given out; a layer's budget is its heads' mean.

Writes one JSON to ``--out``. Run (about 4 minutes on one CPU thread):

    OMP_NUM_THREADS=1 python scripts/rxnfp_budget_analysis.py --out docs/rxnfp_budget_analysis.json

Needs ``pip install --no-deps rxnfp==0.1.0`` (the weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
import warnings
from typing import Optional

import torch
import transformers

import maskkv_compile
from maskkv_compile import MaskKV, MaskVotingUniform
from maskkv_compile.evaluation.models import Sample, load_bundle
from maskkv_compile.evaluation.suite import FULL_BUDGET, agreement, infill

FULL_LAYER = 1024  # a layer budget above every prompt: the layer keeps its whole prompt
BINS = ("step0", "step1", "later")  # the prefill, the first cached step, steps >= 2


# ------------------------------------------------------------------ library configurations


def _fixed_layer_budgets(self, n_layers, budget, importance=None, **options):
    if len(self.fixed) != n_layers:
        raise ValueError(f"{len(self.fixed)} layer budgets for {n_layers} layers")
    return [float(k) for k in self.fixed]


def fixed_layers(tag: str, budgets: list[float], alpha: float = 0.1) -> MaskKV:
    """MaskKV (mask voting, prompt-preference heads with ``alpha``) with the per-layer budgets
    ``budgets`` (average kept entries per KV head; >= the prompt: the layer keeps it whole)."""
    cls = type(
        f"FixedLayers_{tag}",
        (MaskKV,),
        {
            "__module__": __name__,
            "name": f"rxnfp_probe_{tag}",
            "layer_allocator": "uniform",  # no profile needed: layer_budgets is overridden
            "fixed": tuple(float(k) for k in budgets),
            "layer_budgets": _fixed_layer_budgets,
            "description": f"mask voting, fixed layer budgets {tag}",
        },
    )
    return cls(alpha=alpha)


class _KeptAtPrefill:
    """Calls an optimized model; after the first call (the prefill) records the kept absolute
    prompt positions of every layer and KV head (first row)."""

    def __init__(self, net):
        self.net, self.kept = net, None

    def __call__(self, *args, **kwargs):
        out = self.net(*args, **kwargs)
        if self.kept is None:
            self.kept = [
                [[int(p) for p in head if p >= 0] for head in cache.kept_pos[0].tolist()]
                for cache in self.net.runtime.last_session.layers
            ]
        return out


@torch.no_grad()
def run_library(bundle, policy, budget: int, revote: Optional[int] = None) -> dict:
    """Per sample: the fill, its score, the kept positions after the prefill."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = maskkv_compile.optimize(
            bundle.model,
            budget=budget,
            mask_token_id=bundle.mask_id,
            backend="eager",
            policy=policy,
            revote=revote,
        )
        cells = {}
        for sample in bundle.samples:
            net.reset()
            probe = _KeptAtPrefill(net)
            tokens, _, _ = infill(probe, sample, bundle.mask_id)
            cells[sample.id] = {
                "tokens": tokens,
                "score": agreement(tokens, sample.truth()),
                "kept": probe.kept,
            }
    del net
    torch._dynamo.reset()
    return cells


def summarize(cells: dict, full: dict, samples: list[Sample]) -> dict:
    """Retention (all samples and per task), agreement with the full cache's fill, kept entries
    per KV head per layer (mean over samples and heads)."""
    out = {}
    for task in ["all", *sorted({s.task for s in samples})]:
        ids = [s.id for s in samples if task in ("all", s.task)]
        full_score = sum(full[i]["score"] for i in ids)
        out[f"retention_{task}"] = round(100 * sum(cells[i]["score"] for i in ids) / full_score, 2)
    out["agree_full"] = round(
        sum(agreement(cells[i]["tokens"], full[i]["tokens"]) for i in cells) / len(cells), 4
    )
    n_layers = len(next(iter(cells.values()))["kept"])
    out["kept_per_layer"] = [
        round(
            sum(sum(map(len, c["kept"][layer])) / len(c["kept"][layer]) for c in cells.values())
            / len(cells),
            2,
        )
        for layer in range(n_layers)
    ]
    out["scores"] = {i: round(c["score"], 4) for i, c in cells.items()}
    return out


def add_intervals(runs: dict, full: dict, ids: list, base: str = "maskkv", n: int = 1000) -> None:
    """95% percentile bootstrap intervals (``n`` resamples of the samples, seed 0, the same
    resamples for every run): of each run's retention, and of its difference to ``base``'s
    (paired: both on the same resample)."""
    idx = torch.randint(len(ids), (n, len(ids)), generator=torch.Generator().manual_seed(0))
    full_scores = torch.tensor([full[i]["score"] for i in ids], dtype=torch.float64)[idx].sum(1)

    def retention(run: dict) -> torch.Tensor:
        scores = torch.tensor([run["scores"][i] for i in ids], dtype=torch.float64)
        return 100 * scores[idx].sum(1) / full_scores

    reference = retention(runs[base])
    for run in runs.values():
        r = retention(run)
        run["retention_ci95"] = r.quantile(torch.tensor([0.025, 0.975], dtype=r.dtype)).tolist()
        d = r - reference
        run[f"minus_{base}_ci95"] = d.quantile(torch.tensor([0.025, 0.975], dtype=d.dtype)).tolist()


# ------------------------------------------------------------------ the eager model, hooked


def rxnfp_folder() -> str:
    spec = importlib.util.find_spec("rxnfp")
    if spec is None or spec.origin is None:
        raise SystemExit("rxnfp is not installed: pip install --no-deps rxnfp==0.1.0")
    root = os.path.dirname(spec.origin)
    return os.path.join(root, "models", "transformers", "bert_pretrained")


def eager_model() -> torch.nn.Module:
    """The same weights with eager attention (its probabilities are returned per layer)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.BertForMaskedLM.from_pretrained(
            rxnfp_folder(), attn_implementation="eager"
        ).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)


class CachedTrajectory:
    """The eager model called as the prompt cache computes: the first call runs the whole
    sequence and stores every layer's prompt K/V; later calls reuse them (forward hooks on the
    key / value projections overwrite the prompt rows), so the response rows see exactly the
    cached K/V. ``keep`` (per layer, per head: kept absolute prompt positions) masks the other
    prompt keys from the second call on (eviction). Records, per call and layer, the
    attention mass ``(H, P)`` that the still-masked queries put on each prompt key, and their
    number."""

    def __init__(self, model, sample: Sample, mask_id: int, keep=None):
        n = len(sample.ids)
        self.prompt = torch.ones(n, dtype=torch.bool)
        self.prompt[sample.start : sample.stop] = False
        self.prompt_pos = self.prompt.nonzero().flatten()
        self.model, self.mask_id, self.calls = model, mask_id, 0
        self.stored: dict = {}
        self.records: list[dict] = []  # per call: {"mass": [(H, P)] per layer, "n_q": int}
        self.masked = None
        self.attn: list = []
        layers = model.bert.encoder.layer
        heads = model.config.num_attention_heads
        self.bias = None
        if keep is not None:  # additive masks (1, H, T, T): evicted prompt keys -> -inf
            self.bias = []
            for layer in keep:
                allowed = (~self.prompt)[None].repeat(heads, 1)  # response keys always
                for h, positions in enumerate(layer):
                    allowed[h, positions] = True
                bias = torch.zeros(heads, n).masked_fill(~allowed, float("-inf"))
                self.bias.append(bias[None, :, None, :].expand(1, heads, n, n))
        self.handles = []
        for index, layer in enumerate(layers):
            attention = layer.attention.self
            for kind in ("key", "value"):
                self.handles.append(
                    getattr(attention, kind).register_forward_hook(self._kv_hook(index, kind))
                )
            self.handles.append(attention.register_forward_hook(self._attn_hook))
            if self.bias is not None:
                self.handles.append(
                    attention.register_forward_pre_hook(self._mask_hook(index), with_kwargs=True)
                )

    def _kv_hook(self, index: int, kind: str):
        def hook(module, args, output):
            if self.calls == 0:
                self.stored[index, kind] = output[:, self.prompt].clone()
                return output
            output = output.clone()
            output[:, self.prompt] = self.stored[index, kind]
            return output

        return hook

    def _mask_hook(self, index: int):
        def hook(module, args, kwargs):
            if self.calls > 0:
                kwargs["attention_mask"] = self.bias[index]
            return args, kwargs

        return hook

    def _attn_hook(self, module, args, output):
        probs = output[1][0]  # (H, T, T)
        rows = probs[:, self.masked]  # (H, q, T): the still-masked queries
        self.attn.append(rows[:, :, self.prompt].sum(1).double())  # (H, P)

    def __call__(self, x: torch.Tensor):
        self.masked = x[0] == self.mask_id
        self.attn = []
        out = self.model(input_ids=x)
        self.records.append({"mass": self.attn, "n_q": int(self.masked.sum())})
        self.calls += 1
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ------------------------------------------------------------------ attention statistics


def _top_fraction(col: torch.Tensor, k: int) -> float:
    return float(col.topk(min(k, col.numel())).values.sum() / col.sum())


def _n_for(col: torch.Tensor, fraction: float) -> int:
    cum = col.sort(descending=True).values.cumsum(0) / col.sum()
    return int((cum < fraction).sum()) + 1


def step_stats(record: dict, kept: list, prompt_pos: torch.Tensor, special: dict) -> dict:
    """Per layer and head, one call's numbers: prompt share, kept / oracle fractions of the
    prompt mass, n90, special-token mass share and kept flags."""
    index = {int(p): i for i, p in enumerate(prompt_pos.tolist())}
    out = {k: [] for k in ("prompt_share", "kept", "oracle", "n90", "removed")}
    out.update({f"mass_{name}": [] for name in special})
    out.update({f"kept_{name}": [] for name in special})
    for layer, mass in enumerate(record["mass"]):
        rows = {k: [] for k in out}
        for h in range(mass.shape[0]):
            col = mass[h]
            share = float(col.sum()) / record["n_q"]
            on_kept = [index[p] for p in kept[layer][h]]
            kept_frac = float(col[on_kept].sum() / col.sum())
            rows["prompt_share"].append(share)
            rows["kept"].append(kept_frac)
            rows["oracle"].append(_top_fraction(col, len(on_kept)))
            rows["n90"].append(_n_for(col, 0.9))
            rows["removed"].append(share * (1 - kept_frac))
            for name, pos in special.items():
                rows[f"mass_{name}"].append(float(col[index[pos]] / col.sum()))
                rows[f"kept_{name}"].append(float(pos in kept[layer][h]))
        for k in out:
            out[k].append(rows[k])
    return out


def _mean(tables: list) -> list:
    """Element-wise mean of equally shaped nested lists (layers x heads)."""
    t = torch.tensor(tables, dtype=torch.float64)
    return t.mean(0).tolist()


def trajectory_stats(model, sample: Sample, mask_id: int, kept: list, special_ids: dict) -> dict:
    """Runs the full cache's trajectory of ``sample``; returns its fill and, per bin (BINS),
    the mean over the bin's calls of :func:`step_stats`."""
    probe = CachedTrajectory(model, sample, mask_id)
    try:
        tokens, _, _ = infill(probe, sample, mask_id)
    finally:
        probe.close()
    special = {
        name: int(pos)
        for name, tok in special_ids.items()
        for pos in [sample.ids.index(tok) if tok in sample.ids else -1]
        if pos >= 0 and probe.prompt[pos]
    }
    per_call = [step_stats(r, kept, probe.prompt_pos, special) for r in probe.records]
    bins = {"step0": per_call[:1], "step1": per_call[1:2], "later": per_call[2:]}
    out = {"tokens": tokens}
    for name, calls in bins.items():
        if calls:
            out[name] = {k: _mean([c[k] for c in calls]) for k in calls[0]}
    return out


def eviction_check(model, sample: Sample, mask_id: int, kept: list) -> list[int]:
    """The fill of the eager model with the prompt cache and ``kept`` as the only prompt keys."""
    probe = CachedTrajectory(model, sample, mask_id, keep=kept)
    try:
        tokens, _, _ = infill(probe, sample, mask_id)
    finally:
        probe.close()
    return tokens


# ------------------------------------------------------------------ coverage allocation


def calibration_samples(bundle, vocab: dict, span_len: int = 12, suffix_len: int = 20) -> list:
    """The calibration reactions masked as the two tasks mask the evaluated ones."""
    out = []
    arrow = vocab[">>"]
    for i, ids in enumerate(bundle.calibration):
        ids = tuple(int(t) for t in ids[0])
        product = ids.index(arrow) + 1, len(ids) - 1
        start = product[0] + max(0, (product[1] - product[0] - span_len) // 2)
        out.append(
            Sample(
                f"calib{i}/product_span",
                "product_span",
                ids,
                start,
                min(start + span_len, product[1]),
            )
        )
        out.append(Sample(f"calib{i}/suffix", "suffix", ids, product[1] - suffix_len, product[1]))
    return out


def coverage_curves(model, samples: list, mask_id: int, max_k: int) -> torch.Tensor:
    """(layers, heads, max_k + 1): mean over samples and cached calls of the attention share
    (of all of the masked queries' attention) on the top-k prompt entries by the step-0 votes,
    for k = 0..max_k, along the full cache's trajectory."""
    total, count = None, 0
    for sample in samples:
        probe = CachedTrajectory(model, sample, mask_id)
        try:
            infill(probe, sample, mask_id)
        finally:
            probe.close()
        votes = probe.records[0]["mass"]
        for record in probe.records[1:]:
            curves = []
            for layer, mass in enumerate(record["mass"]):
                order = votes[layer].argsort(-1, descending=True)  # (H, P)
                share = mass.gather(1, order) / record["n_q"]
                cum = torch.cat(
                    [torch.zeros(share.shape[0], 1, dtype=share.dtype), share.cumsum(1)], 1
                )
                if cum.shape[1] < max_k + 1:
                    pad = cum[:, -1:].expand(-1, max_k + 1 - cum.shape[1])
                    cum = torch.cat([cum, pad], 1)
                curves.append(cum[:, : max_k + 1])
            curves = torch.stack(curves)
            total = curves if total is None else total + curves
            count += 1
    return total / count


def greedy_allocation(curves: torch.Tensor, slots: int, min_keep: int = 1) -> torch.Tensor:
    """Integer (layers, heads) budgets summing to ``slots``, each >= ``min_keep``: every slot
    goes to the (layer, head) whose next entry adds the most attention share."""
    layers, heads, _ = curves.shape
    alloc = torch.full((layers, heads), min_keep, dtype=torch.long)
    for _ in range(slots - int(alloc.sum())):
        nxt = curves.gather(2, (alloc + 1).clamp(max=curves.shape[2] - 1)[..., None])[..., 0]
        now = curves.gather(2, alloc[..., None])[..., 0]
        gain = torch.where(alloc + 1 < curves.shape[2], nxt - now, float("-inf"))
        flat = int(gain.flatten().argmax())
        alloc[flat // heads, flat % heads] += 1
    return alloc


# ------------------------------------------------------------------ main


def _rounded(x, digits: int = 4):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="reactions per task (default 8)")
    parser.add_argument("--budget", type=int, default=5, help="prompt KV pairs per head (5)")
    parser.add_argument("--out", required=True, help="where to write the JSON")
    parser.add_argument(
        "--library-only",
        action="store_true",
        help="only the library runs: maskkv, and MaskKV(layers='coverage') from calibrate's curves",
    )
    parser.add_argument(
        "--skip-layer-runs",
        action="store_true",
        help="skip the 2 x n_layers per-layer library runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    B = args.budget

    bundle = load_bundle("rxnfp", args.samples)
    samples = bundle.samples
    vocab = {}
    with open(os.path.join(rxnfp_folder(), "vocab.txt")) as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    profile = maskkv_compile.calibrate(
        bundle.model,
        bundle.calibration,
        gen_length=bundle.calibration_gen_length,
        mask_token_id=bundle.mask_id,
        progress=False,
    )
    n_layers = len(profile.importance)
    n_heads = bundle.model.config.num_attention_heads
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    log(f"{len(samples)} samples, profile {[round(v, 3) for v in profile.importance]}")

    runs: dict[str, dict] = {}
    full = run_library(bundle, MaskVotingUniform(), FULL_BUDGET)

    def record(key: str, policy, budget: int = B, revote: Optional[int] = None) -> dict:
        cells = run_library(bundle, policy, budget, revote)
        runs[key] = summarize(cells, full, samples)
        log(f"{key}: retention {runs[key]['retention_all']}")
        return cells

    runs["full_cache"] = summarize(full, full, samples)
    maskkv_cells = record("maskkv", MaskKV(profile=profile))
    record("maskkv+revote1", MaskKV(profile=profile), revote=1)
    uniform_cells = record("mask_voting_uniform", MaskVotingUniform())
    record("maskkv_no_profile (uniform layers)", MaskKV())
    record("maskkv_alpha1 (uniform heads)", MaskKV(profile=profile, alpha=1.0))
    record(f"maskkv@{2 * B}", MaskKV(profile=profile), budget=2 * B)
    # the library's coverage allocator (calibrate's step-0 curves, beta * B floor per layer)
    for beta in (0.4, 0.1):
        coverage = MaskKV(profile=profile, layers="coverage", beta=beta)
        record(f"maskkv_layers=coverage beta={beta}", coverage)
        record(f"maskkv_layers=coverage beta={beta}+revote1", coverage, revote=1)
    if args.library_only:
        add_intervals(runs, full, [s.id for s in samples])
        write(
            args.out,
            {
                "what": "rxnfp at B: the library's MaskKV(layers='coverage') next to maskkv",
                "command": "OMP_NUM_THREADS=1 python scripts/rxnfp_budget_analysis.py "
                f"--library-only --samples {args.samples} --budget {B} --out {args.out}",
                "budget": B,
                "n_samples": len(samples),
                "coverage_layer_budgets": {
                    str(beta): MaskKV(profile=profile, layers="coverage", beta=beta).layer_budgets(
                        n_layers, B
                    )
                    for beta in (0.4, 0.1)
                },
                "maskkv_layer_budgets": MaskKV(profile=profile).layer_budgets(n_layers, B),
                "runs": runs,
                "seconds": time.perf_counter() - t0,
            },
        )
        log(f"wrote {args.out}")
        return

    # 2. attention along the full cache's trajectory, with the library's kept sets
    eager = eager_model()
    special_ids = {"cls": vocab["[CLS]"], "sep": vocab["[SEP]"], "arrow": vocab[">>"]}
    per_sample, emulated_full, emulated_evict = {}, [], []
    with torch.no_grad():
        for sample in samples:
            kept = maskkv_cells[sample.id]["kept"]
            stats = trajectory_stats(eager, sample, bundle.mask_id, kept, special_ids)
            emulated_full.append(agreement(stats.pop("tokens"), full[sample.id]["tokens"]))
            stats["kept_uniform"] = trajectory_stats(
                eager, sample, bundle.mask_id, uniform_cells[sample.id]["kept"], special_ids
            )
            stats["kept_uniform"].pop("tokens")
            per_sample[sample.id] = stats
            tokens = eviction_check(eager, sample, bundle.mask_id, kept)
            emulated_evict.append(agreement(tokens, maskkv_cells[sample.id]["tokens"]))
    log("attention statistics done")
    attention = {}
    for which, getter in (
        ("maskkv", lambda s: s),
        ("mask_voting_uniform", lambda s: s["kept_uniform"]),
    ):
        attention[which] = {
            b: {
                k: _mean([getter(s)[b][k] for s in per_sample.values()])
                for k in getter(next(iter(per_sample.values())))[b]
            }
            for b in BINS
        }

    # 3. coverage allocation from the calibration reactions
    calib = calibration_samples(bundle, vocab)
    with torch.no_grad():
        curves = coverage_curves(eager, calib, bundle.mask_id, max_k=8 * B)
    alloc = greedy_allocation(curves, n_layers * n_heads * B)
    coverage_layers = (alloc.double().mean(1)).tolist()
    log(f"coverage allocation per layer {[round(v, 2) for v in coverage_layers]}")
    record("coverage_layers", fixed_layers("coverage", coverage_layers))
    record("coverage_layers+revote1", fixed_layers("coverage", coverage_layers), revote=1)
    record("coverage_layers_alpha1", fixed_layers("coverage_a1", coverage_layers, alpha=1.0))

    # 1b. which layers matter: evict one layer / spare one layer
    if not args.skip_layer_runs:
        for layer in range(n_layers):
            only = [FULL_LAYER] * n_layers
            only[layer] = B
            record(f"evict_only_layer{layer}", fixed_layers(f"only{layer}", only))
        for layer in range(n_layers):
            spare = [B] * n_layers
            spare[layer] = FULL_LAYER
            record(f"spare_layer{layer}", fixed_layers(f"spare{layer}", spare))

    add_intervals(runs, full, [s.id for s in samples])
    result = {
        "what": __doc__.split("\n\n")[0],
        "command": "OMP_NUM_THREADS=1 python scripts/rxnfp_budget_analysis.py "
        f"--samples {args.samples} --budget {B} --out {args.out}",
        "budget": B,
        "n_samples": len(samples),
        "mean_prompt_len": sum(s.prompt_len for s in samples) / len(samples),
        "profile_importance": profile.importance,
        "maskkv_layer_budgets": MaskKV(profile=profile).layer_budgets(n_layers, B),
        "checks": {
            "eager_full_cache_agreement_with_library_full_cache": sum(emulated_full)
            / len(emulated_full),
            "eager_eviction_agreement_with_library_maskkv": sum(emulated_evict)
            / len(emulated_evict),
        },
        "runs": runs,
        "attention": attention,
        "coverage": {
            "calibration_samples": len(calib),
            "head_budgets": alloc.tolist(),
            "layer_budgets": coverage_layers,
            "curve_at_B_uniform": curves[:, :, B].tolist(),
            "curve_at_max_k": curves[:, :, -1].tolist(),
        },
        "seconds": time.perf_counter() - t0,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write(args.out, result)
    log(f"wrote {args.out}")


def write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_rounded(result), f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
