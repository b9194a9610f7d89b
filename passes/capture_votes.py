"""CaptureVotesPass (prefill graph): Mask-Voting at every attention site.

Matches every canonical ``maskkv::attention`` node; inserts right after it
``maskkv::mask_votes(q, k, voter_idx, prompt_idx, scale, chunk, key_valid, voter_valid,
prompt_valid)`` where ``voter_idx`` / ``prompt_idx`` (positions along the sequence, shared
by the batch) and the per-row masks ``key_valid`` (B, S), ``voter_valid`` (B, V),
``prompt_valid`` (B, P) are new graph inputs (see ``maskkv_compile/layout.py``).

Invariants: q/k are the site's own post-RoPE, unrepeated tensors, so the votes see exactly
the scores the attention computed; the votes node is recorded in the site node's
``meta["maskkv_votes"]`` for EvictKVPass, which consumes it (so it is never dead code).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from maskkv_compile.config import MaskKVConfig

from .base import GraphPass, PassResult, placeholder
from .find_attention import attention_sites


class CaptureVotesPass(GraphPass):
    name = "CaptureVotesPass"
    dead_code_elimination = False  # the votes have no user until EvictKVPass runs

    def __init__(self, config: MaskKVConfig):
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        voter_idx, prompt_idx, key_valid, voter_valid, prompt_valid = (
            placeholder(gm, name)
            for name in ("voter_idx", "prompt_idx", "key_valid", "voter_valid", "prompt_valid")
        )
        sites = attention_sites(gm)
        for node, _ in sites:
            q, k, scale = node.args[0], node.args[1], node.args[3]
            with gm.graph.inserting_before(node.next):
                votes = gm.graph.call_function(
                    torch.ops.maskkv.mask_votes.default,
                    (
                        q,
                        k,
                        voter_idx,
                        prompt_idx,
                        scale,
                        self.config.vote_chunk,
                        key_valid,
                        voter_valid,
                        prompt_valid,
                    ),
                )
                scores = gm.graph.call_function(operator.getitem, (votes, 0))
                prompt_mass = gm.graph.call_function(operator.getitem, (votes, 1))
            node.meta["maskkv_votes"] = (scores, prompt_mass)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
