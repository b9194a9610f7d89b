"""CachedAttentionPass (step graph): attention over [kept prompt K/V ; response K/V].

Matches every canonical ``maskkv::attention`` node (after SliceSequencePass its q/k/v are
the computed rows); replaces it with ``maskkv::cached_attention(q, k, v, kept_k_<l>,
kept_v_<l>, kept_len_<l>, resp_valid, row_end, scale, softmax_dtype)`` where the three
cache tensors of layer ``l`` are new graph inputs, in layer order (``STEP_INPUTS_PER_LAYER``
per layer), ``resp_valid`` (B, C), shared by the layers, says which computed rows are each
row's response keys (a row computed for a batch mate, or Dream's query-only read row, is not),
and ``row_end`` (C,) how many of the computed rows each computed row sees (all of them but for
block diffusion's shifted families, whose row before the block must not see the block).

Invariant: the response K/V are recomputed every step from the current tokens; only the
prompt side comes from the cache, already rotated at its absolute positions.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, placeholder
from .find_attention import attention_sites

STEP_INPUTS_PER_LAYER = 3


class CachedAttentionPass(GraphPass):
    name = "CachedAttentionPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        sites = attention_sites(gm)
        resp_valid = placeholder(gm, "resp_valid")
        row_end = placeholder(gm, "row_end")
        for node, site in sites:
            cache = [
                placeholder(gm, f"{kind}_{site.layer}") for kind in ("kept_k", "kept_v", "kept_len")
            ]
            q, k, v, scale, softmax_dtype = node.args[:5]
            with gm.graph.inserting_before(node):
                cached = gm.graph.call_function(
                    torch.ops.maskkv.cached_attention.default,
                    (q, k, v, *cache, resp_valid, row_end, scale, softmax_dtype),
                )
            cached.meta.update(node.meta)
            node.replace_all_uses_with(cached)
            gm.graph.erase_node(node)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
