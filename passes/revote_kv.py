"""RevoteKVPass (the re-vote graph, only with ``revote``): each layer re-selects its hot cache
from the second tier with the step's own queries, then attends to what it chose.

Runs on a copy of the step graph after CachedAttentionPass (and ResponseKVOutputsPass). Matches
every ``maskkv::cached_attention(q, k, v, kept_k_<l>, kept_v_<l>, kept_len_<l>, resp_valid,
row_end, scale, softmax_dtype)`` node; inserts before it

    new = maskkv::revote_kv(q, k, prompt_k_<l>, prompt_v_<l>, prompt_pos_<l>, prompt_valid_<l>,
                            resp_valid, row_end, revoter_idx, revoter_valid, kept_k_<l>,
                            kept_len_<l>, scale, chunk, policy, pool_kernel, sink, seed, recent)

and makes the attention read ``new``'s K/V and lengths instead of the old hot cache. New graph
inputs: per layer the candidates ``prompt_k_<l>`` / ``prompt_v_<l>`` (B, Hkv, P, D), their
positions ``prompt_pos_<l>`` and validity ``prompt_valid_<l>`` ((P,) and (B, P) for the second
tier, the same tensors in every layer; (B, Hkv, P) each for block diffusion's per-head
candidates, ``block_diffusion.BlockReselect``), and ``revoter_idx`` (Rv,) indices into the
computed rows of the voting queries and ``revoter_valid`` (B, Rv). The graph returns, after its
other outputs, per layer in layer order ``(kept_k, kept_v, kept_len, kept_pos)``
(``REVOTE_OUTPUTS_PER_LAYER``): the new hot cache.

Invariant: layer l's queries are computed from layers < l that already attended to their new
selections, so every layer votes with exactly the queries this step computes (what a prefill
does with its own queries), and no prompt row is recomputed.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from maskkv_compile import policy_ops  # noqa: F401  (registers the maskkv:: policy ops this pass inserts)
from maskkv_compile.config import MaskKVConfig

from .base import GraphPass, PassResult, append_outputs, is_call, placeholder

REVOTE_OUTPUTS_PER_LAYER = 4
REVOTE_INPUTS_PER_LAYER = ("prompt_k", "prompt_v", "prompt_pos", "prompt_valid")


class RevoteKVPass(GraphPass):
    name = "RevoteKVPass"

    def __init__(self, config: MaskKVConfig):
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        sites = [n for n in gm.graph.nodes if is_call(n, torch.ops.maskkv.cached_attention.default)]
        revoter_idx, revoter_valid = (placeholder(gm, n) for n in ("revoter_idx", "revoter_valid"))
        extra = []
        for layer, node in enumerate(sites):  # graph order is layer order
            q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale = node.args[:9]
            prompt_k, prompt_v, prompt_pos, prompt_valid = (
                placeholder(gm, f"{kind}_{layer}") for kind in REVOTE_INPUTS_PER_LAYER
            )
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.maskkv.revote_kv.default,
                    (
                        q,
                        k,
                        prompt_k,
                        prompt_v,
                        prompt_pos,
                        prompt_valid,
                        resp_valid,
                        row_end,
                        revoter_idx,
                        revoter_valid,
                        kept_k,
                        kept_len,
                        scale,
                        cfg.vote_chunk,
                        cfg.policy,
                        cfg.pool_kernel,
                        cfg.sink,
                        cfg.seed,
                        cfg.recent,
                    ),
                )
                fresh = [
                    gm.graph.call_function(operator.getitem, (new, i))
                    for i in range(REVOTE_OUTPUTS_PER_LAYER)
                ]
            node.args = (q, k, v, fresh[0], fresh[1], fresh[2], *node.args[6:])
            extra.append(tuple(fresh))
        append_outputs(gm, "reselected", extra)
        return PassResult(self.name, matches=len(sites), changed=bool(sites))
