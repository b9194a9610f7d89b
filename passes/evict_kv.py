"""EvictKVPass (prefill graph): budgeted eviction right where each layer's K/V are made.

Matches every canonical ``maskkv::attention`` node that CaptureVotesPass annotated; inserts
``maskkv::select_kv(k, v, votes, prompt_idx, budget_<layer>)`` after it, where
``budget_<layer>`` is a new (Hkv,) int64 graph input (the per-head budgets of that layer).

The graph then also returns, per layer, ``(kept_k, kept_v, kept_len, kept_pos,
prompt_mass)`` after its original outputs (``PREFILL_OUTPUTS_PER_LAYER`` of them). Only the
kept entries outlive the layer: its full K/V die after the attention, as before.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, graph_outputs, placeholder, set_outputs
from .find_attention import attention_sites

PREFILL_OUTPUTS_PER_LAYER = 5


class EvictKVPass(GraphPass):
    name = "EvictKVPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        prompt_idx = placeholder(gm, "prompt_idx")
        extra: list[fx.Node] = []
        sites = attention_sites(gm)
        for node, site in sites:
            if "maskkv_votes" not in node.meta:
                raise RuntimeError(f"EvictKVPass needs CaptureVotesPass first (layer {site.layer} has no votes)")
            scores, prompt_mass = node.meta["maskkv_votes"]
            budget = placeholder(gm, f"budget_{site.layer}")
            k, v = node.args[1], node.args[2]
            anchor = prompt_mass.next
            with gm.graph.inserting_before(anchor):
                select = gm.graph.call_function(torch.ops.maskkv.select_kv.default, (k, v, scores, prompt_idx, budget))
                kept = [gm.graph.call_function(operator.getitem, (select, i)) for i in range(4)]
            extra += [*kept, prompt_mass]
        set_outputs(gm, graph_outputs(gm) + tuple(extra))
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
