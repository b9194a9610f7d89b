"""EvictKVPass (prefill graph): each layer decides and keeps its prompt entries right away.

Matches every canonical ``maskkv::attention`` node that CaptureVotesPass annotated; inserts
after it, for layer ``l`` with ``Hkv`` KV heads:

    scores  = maskkv::selection_scores(votes, prompt_valid, policy, pool_kernel, sink, seed,
                                       recent)
    budgets = maskkv::head_budgets(prompt_mass, scores, voter_valid, k_l, budget, policy, alpha,
                                   min_keep)
    kept    = maskkv::select_kv(k, v, scores, prompt_idx, budgets, slots_l)

The layer budgets ``k_l`` come from the policy's layer allocator at pass time (offline:
from the config's LayerProfile where the policy uses one), made integral per layer with
``layer_slot_totals`` so the whole model keeps exactly ``n_layers * Hkv * budget`` entries
when the prompt is long enough. They are constants of the graph: a graph built for one config is
never another's.

``slots_l`` bounds any row's total budget in the layer (``kept_slots``): the flat kept cache
has a static size, so the prefill graph has no data-dependent size.

Budgets and kept lengths are per row, (B, Hkv). The graph then also returns, per layer, ``(kept_k,
kept_v, kept_len, kept_pos, prompt_mass)`` after its original outputs (``PREFILL_OUTPUTS_PER_LAYER``
of them). Only the kept entries outlive the layer: its full K/V die after the attention, as before.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.fx as fx

from maskkv_compile import policy_ops  # noqa: F401  (registers the maskkv:: policy ops this pass inserts)
from maskkv_compile.budgets import layer_slot_totals, uniform_layer_budgets
from maskkv_compile.config import MaskKVConfig

from .base import GraphPass, PassResult, append_outputs, placeholder
from .find_attention import attention_sites

PREFILL_OUTPUTS_PER_LAYER = 5


def layer_budgets(config, kv_heads: list[int]) -> list[float]:
    """Average per-KV-head budget of every layer, as the policy's layer allocator splits it."""
    policy = config.eviction
    n_layers = len(kv_heads)
    if policy.needs_profile and config.profile is None:
        # a UserWarning is shown once per process by Python's default filter
        warnings.warn(
            f"policy {policy.name!r} has no layer profile: uniform layer budgets (run "
            "maskkv_compile.calibrate)",
            stacklevel=2,
        )
        budgets = uniform_layer_budgets(n_layers, config.budget)
    else:
        importance = config.profile.importance if config.profile is not None else None
        options = {"beta": config.beta} if policy.layer_allocator == "maskkv" else {}
        budgets = policy.layer_budgets(n_layers, config.budget, importance, **options)
    # integral slots per layer, exact in total; spread back to a per-head average
    totals = [layer_slot_totals(budgets, heads)[layer] for layer, heads in enumerate(kv_heads)]
    return [total / heads for total, heads in zip(totals, kv_heads)]


def kept_slots(config, kv_heads: int, layer_budget: float) -> int:
    """A bound on one row's kept entries in a layer of ``kv_heads`` KV heads: the layer's slot
    total, ``Hkv * budget`` (a prompt no longer than the budget is kept whole in every layer) or
    ``Hkv * min_keep``, whichever is largest."""
    return max(
        math.floor(kv_heads * layer_budget + 0.5),
        kv_heads * config.budget,
        kv_heads * config.min_keep,
    )


class EvictKVPass(GraphPass):
    name = "EvictKVPass"

    def __init__(self, config: MaskKVConfig):
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        prompt_idx = placeholder(gm, "prompt_idx")
        prompt_valid = placeholder(gm, "prompt_valid")
        voter_valid = placeholder(gm, "voter_valid")
        sites = attention_sites(gm)
        per_layer = layer_budgets(cfg, [site.kv_heads for _, site in sites])
        extra: list[tuple[fx.Node, ...]] = []
        for (node, site), layer_budget in zip(sites, per_layer):
            if "maskkv_votes" not in node.meta:
                raise RuntimeError(
                    f"EvictKVPass needs CaptureVotesPass first (layer {site.layer} has no votes)"
                )
            votes, prompt_mass = node.meta["maskkv_votes"]
            k, v = node.args[1], node.args[2]
            call = gm.graph.call_function
            with gm.graph.inserting_before(prompt_mass.next):
                scores = call(
                    torch.ops.maskkv.selection_scores.default,
                    (
                        votes,
                        prompt_valid,
                        cfg.policy,
                        cfg.pool_kernel,
                        cfg.sink,
                        cfg.seed,
                        cfg.recent,
                    ),
                )
                budgets = call(
                    torch.ops.maskkv.head_budgets.default,
                    (
                        prompt_mass,
                        scores,
                        voter_valid,
                        float(layer_budget),
                        cfg.budget,
                        cfg.policy,
                        float(cfg.alpha),
                        cfg.min_keep,
                    ),
                )
                slots = kept_slots(cfg, site.kv_heads, layer_budget)
                select = call(
                    torch.ops.maskkv.select_kv.default, (k, v, scores, prompt_idx, budgets, slots)
                )
                kept = [call(operator.getitem, (select, i)) for i in range(4)]
            extra.append((*kept, prompt_mass))
        append_outputs(gm, "kept", extra)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
