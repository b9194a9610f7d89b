"""MaskPaddingPass (prefill graph): padding keys, and later blocks, out of every attention.

Matches every canonical ``maskkv::attention`` node; sets its ``key_valid`` argument to a new
graph input ``key_valid`` (B, S) bool, False at padding, and its ``key_end`` argument to a new
graph input ``key_end`` (S,) int64, one past the last key each query's block lets it see (a
block-causal call: block diffusion), empty (0,) for a bidirectional one. The caller's attention
mask is not traced (the optimized model reads it and passes the padding here), so this is the
one place where padding reaches the prefill's attention: a padding key gets no weight from any
query, which is what the original model's padding mask does.

Invariant: with no padding (``key_valid`` all True) and no blocks (``key_end`` empty) every
site computes exactly what it did before the pass (the op drops an all-True mask).
"""

from __future__ import annotations

import torch.fx as fx

from .base import GraphPass, PassResult, placeholder
from .find_attention import attention_sites


class MaskPaddingPass(GraphPass):
    name = "MaskPaddingPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        key_valid = placeholder(gm, "key_valid")
        key_end = placeholder(gm, "key_end")
        sites = attention_sites(gm)
        for node, _ in sites:
            q, k, v, scale, softmax_dtype = node.args[:5]
            node.args = (q, k, v, scale, softmax_dtype, key_valid, key_end)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
