"""KeepPromptKVPass (prefill graph, only with ``revote``): each layer's prompt K/V become outputs.

Matches every canonical ``maskkv::attention`` node; inserts after it ``maskkv::prompt_kv(k, v,
prompt_idx)``, the layer's post-RoPE K/V at the prompt positions (B, Hkv, P, D), and appends
them to the graph's outputs, ``PROMPT_KV_OUTPUTS_PER_LAYER`` per layer in layer order, after
every other output (the original ones, then EvictKVPass's caches). They are the *second tier*
a re-vote chooses from (``maskkv_compile/revote.py``); the hot cache is still the kept top-k.
Without ``revote`` the pass is not run and the prefill graph is unchanged.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, append_outputs, placeholder
from .find_attention import attention_sites

PROMPT_KV_OUTPUTS_PER_LAYER = 2


class KeepPromptKVPass(GraphPass):
    name = "KeepPromptKVPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        prompt_idx = placeholder(gm, "prompt_idx")
        sites = attention_sites(gm)
        extra = []
        for node, _ in sites:  # graph order is layer order
            k, v = node.args[1], node.args[2]
            with gm.graph.inserting_before(node.next):
                pair = gm.graph.call_function(
                    torch.ops.maskkv.prompt_kv.default, (k, v, prompt_idx)
                )
                extra.append(
                    tuple(gm.graph.call_function(operator.getitem, (pair, i)) for i in range(2))
                )
        append_outputs(gm, "prompt_kv", extra)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
