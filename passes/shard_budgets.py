"""ShardBudgetsPass (prefill graph, tensor parallelism): single-device head budgets on every rank.

Matches every ``maskkv::head_budgets`` node (inserted by EvictKVPass) whose attention site
holds a shard of the heads (``maskkv_compile.tensor_parallel.head_sharding``: the site's output
reaches a row-wise projection that is all-reduced over a process group of ``world`` ranks).
Rewrites, for a rank holding ``h`` query and ``hkv`` KV heads of a layer:

    prompt_mass (B, h)        -> maskkv::gather_heads(prompt_mass, group, world)    (B, world*h)
    scores (B, hkv, P)        -> maskkv::gather_heads(scores, group, world)         (adakv only: it
                                 ranks the votes of the whole layer jointly)
                              -> scores[:, :1].expand(B, world*hkv, P)              (the other
                                 allocators read only the head count and the valid prompt
                                 columns)
    budgets = head_budgets(..., k_l, ...)                                           (B, world*hkv),
                                 the single-device allocation, the same on every rank; k_l is
                                 recomputed from every layer's global KV head count (the
                                 model-wide integral layer totals depend on it)
    budgets[:, rank*hkv : rank*hkv + hkv]                                           this rank's
                                                                                    share
    select_kv(..., slots)     -> the slots bound of the whole layer (a rank's share may take
                                 any part of it)

Invariants: every rank's budgets are its block of the allocation the unsharded model makes
(the gathered statistics are the unsharded ones, in global head order); the only new
communication is one all-gather of B x H numbers per layer per prefill (plus B x Hkv x P
for adakv); no collective of the model moves. Sites with every head (no sharding) and
graphs without collectives are left as they are.
"""

from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from maskkv_compile.config import MaskKVConfig
from maskkv_compile.policies import get_policy
from maskkv_compile.tensor_parallel import check_divides, head_sharding

from .base import GraphPass, PassResult
from .evict_kv import kept_slots, layer_budgets
from .find_attention import attention_sites


class ShardBudgetsPass(GraphPass):
    name = "ShardBudgetsPass"

    def __init__(self, config: MaskKVConfig):
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        by_mass = {
            node.meta["maskkv_votes"][1]: (node, site)
            for node, site in attention_sites(gm)
            if "maskkv_votes" in node.meta
        }
        joint = get_policy(self.config.policy).head_allocator == "adakv"
        nodes = [n for n in gm.graph.nodes if n.target is torch.ops.maskkv.head_budgets.default]
        shards = [head_sharding(by_mass[n.args[0]][0]) for n in nodes]
        if all(shard is None or shard.world == 1 for shard in shards):
            return PassResult(self.name, matches=0, changed=False)
        # the layer totals are made integral over the model's KV heads: all of them, not this rank's
        every_kv = [
            by_mass[n.args[0]][1].kv_heads * (shard.world if shard else 1)
            for n, shard in zip(nodes, shards)
        ]
        with warnings.catch_warnings():  # EvictKVPass has already warned about a missing profile
            warnings.simplefilter("ignore")
            per_layer = layer_budgets(self.config, every_kv)
        rewritten = 0
        for budgets, shard, layer_budget in zip(nodes, shards, per_layer):
            prompt_mass, scores = budgets.args[:2]
            site_node, site = by_mass[prompt_mass]
            if shard is None or shard.world == 1:
                continue
            check_divides(site_node, site.heads, site.kv_heads, shard)
            group, world, hkv = shard.group_name, shard.world, site.kv_heads
            call = gm.graph.call_function
            with gm.graph.inserting_before(budgets):
                every_mass = call(
                    torch.ops.maskkv.gather_heads.default, (prompt_mass, group, world)
                )  # (B, world*h)
                if joint:
                    every_scores = call(
                        torch.ops.maskkv.gather_heads.default, (scores, group, world)
                    )  # (B, world*hkv, P)
                else:
                    first = call(
                        operator.getitem, (scores, (slice(None), slice(0, 1)))
                    )  # (B, 1, P)
                    every_scores = gm.graph.call_method(
                        "expand", (first, -1, world * hkv, -1)
                    )  # (B, world*hkv, P)
            budgets.args = (
                every_mass,
                every_scores,
                budgets.args[2],
                float(layer_budget),
                *budgets.args[4:],
            )
            with gm.graph.inserting_after(budgets):
                share = call(
                    operator.getitem,
                    (budgets, (slice(None), slice(shard.rank * hkv, (shard.rank + 1) * hkv))),
                )
            budgets.replace_all_uses_with(share, delete_user_cb=lambda user: user is not share)  # noqa: B023 (called here)
            for select in list(
                share.users
            ):  # a rank's share may take any part of the layer's total
                if select.target is torch.ops.maskkv.select_kv.default:
                    select.args = (
                        *select.args[:5],
                        kept_slots(self.config, world * hkv, layer_budget),
                    )
            rewritten += 1
        return PassResult(self.name, matches=rewritten, changed=rewritten > 0)
