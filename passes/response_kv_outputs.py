"""ResponseKVOutputsPass (step graph, only with ``block_length``): each layer's response K/V
become graph outputs.

After CachedAttentionPass, every ``maskkv::cached_attention(q, k, v, ...)`` node's ``k`` and
``v`` (B, Hkv, C, D) are the post-RoPE K/V of the computed rows. This pass appends them to
the graph's outputs, ``RESPONSE_KV_OUTPUTS_PER_LAYER`` per layer in layer order, after the
original outputs: the dual cache (``maskkv_compile/dual_cache.py``) stores them at a block's
first call. Without ``block_length`` the pass is not run and the step graph is unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, append_outputs, is_call

RESPONSE_KV_OUTPUTS_PER_LAYER = 2


class ResponseKVOutputsPass(GraphPass):
    name = "ResponseKVOutputsPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        sites = [n for n in gm.graph.nodes if is_call(n, torch.ops.maskkv.cached_attention.default)]
        extra = []
        for node in sites:  # graph order is layer order
            extra.append((node.args[1], node.args[2]))
        append_outputs(gm, "response_kv", extra)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
