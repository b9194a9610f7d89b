"""MaskOnlyHeadPass (prefill graph): the vocabulary projection on the response rows only.

Matches the logits output (see ``graph_info.find_logits``) when it is produced by a
``linear``/``matmul`` whose input is (B, S, hidden), possibly through a row slice
(Hugging Face's ``logits_to_keep``) and dtype casts. Inserts
``index_select(hidden, 1, resp_idx)`` on that input, so the logits come out (B, R, V).

If the head is not recognised the pass changes nothing and says why in ``skipped``; the
runtime then gathers the response rows after the full projection (same numbers, more work).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from maskkv_compile.naming import readable_code  # messages name nodes by module path

from .base import GraphPass, PassResult, graph_outputs, is_call, is_method, placeholder
from .graph_info import GraphInfo

HEAD_TARGETS = (torch._C._nn.linear, F.linear, torch.matmul)
PASS_THROUGH_METHODS = ("to", "float", "contiguous")


class MaskOnlyHeadPass(GraphPass):
    name = "MaskOnlyHeadPass"

    def __init__(self, info: GraphInfo):
        self.info = info

    def run(self, gm: fx.GraphModule) -> PassResult:
        node = graph_outputs(gm)[self.info.logits_index]
        while is_method(node, *PASS_THROUGH_METHODS) and len(node.users) == 1:
            node = node.args[0]
        if not is_call(node, *HEAD_TARGETS):
            source = readable_code(node.format_node(), None)
            return PassResult(
                self.name, 0, False, skipped=(f"logits come from {source}, not a linear head",)
            )
        resp_idx = placeholder(gm, "resp_idx")
        hidden = node.args[0]
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(torch.index_select, (hidden, 1, resp_idx))
        node.replace_input_with(hidden, rows)
        return PassResult(self.name, matches=1, changed=True)
