"""MaskOnlyHeadPass (prefill graph): the vocabulary projection on the response rows only.

Matches the logits output (see ``graph_info.find_logits``) when it is produced by a
``linear``/``matmul`` whose input is (B, S, hidden), possibly through a row slice
(Hugging Face's ``logits_to_keep``), dtype casts and per-element ops with constants after the
head (Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma 2's soft-cap
``tanh(logits / c) * c``, ESM's vocabulary bias): each acts on every logit alone, so selecting
rows before the head gives the same numbers (``logits_head``). Inserts
``index_select(hidden, 1, resp_idx)`` on that input, so the logits come out (B, R, V).

If the head is not recognised the pass changes nothing and says why in ``skipped``; the
runtime then gathers the response rows after the full projection (same numbers, more work).
"""

from __future__ import annotations

import operator
from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from maskkv_compile._torch_private import example_value
from maskkv_compile.naming import readable_code  # messages name nodes by module path

from .base import GraphPass, PassResult, graph_outputs, is_call, is_method, placeholder
from .graph_info import GraphInfo

HEAD_TARGETS = (torch._C._nn.linear, F.linear, torch.matmul)
PASS_THROUGH_METHODS = ("to", "float", "contiguous", "tanh")
PASS_THROUGH_FUNCTIONS = (torch.tanh,)
COMMUTATIVE = (operator.mul, torch.mul, operator.add, torch.add)
BROADCAST_BINARY = (*COMMUTATIVE, operator.truediv, torch.div, operator.sub, torch.sub)


def _per_element_source(node: fx.Node):
    """The tensor ``node`` maps element by element, or None: a cast or ``tanh``, or a sum,
    difference, product or quotient with a Python number or a tensor of at most one dim (a
    vocabulary bias such as ESM's ``decoder(x) + bias``, a 0-d scale), which every row shares."""
    if is_method(node, *PASS_THROUGH_METHODS) or is_call(node, *PASS_THROUGH_FUNCTIONS):
        return node.args[0]
    if not (is_call(node, *BROADCAST_BINARY) and len(node.args) == 2 and not node.kwargs):
        return None
    a, b = node.args
    if _shared_by_rows(b) and isinstance(a, fx.Node):
        return a
    if _shared_by_rows(a) and isinstance(b, fx.Node) and node.target in COMMUTATIVE:
        return b
    return None


def _shared_by_rows(operand) -> bool:
    if isinstance(operand, (int, float)):
        return True
    value = example_value(operand) if isinstance(operand, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() <= 1


def logits_head(gm: fx.GraphModule, logits_index: int) -> Union[fx.Node, str]:
    """The vocabulary projection (a ``HEAD_TARGETS`` call) the logits output comes from, through
    per-element ops used by nothing else; or a sentence saying what the logits come from."""
    node = graph_outputs(gm)[logits_index]
    while isinstance(node, fx.Node) and len(node.users) == 1:
        source = _per_element_source(node)
        if not isinstance(source, fx.Node):
            break
        node = source
    if is_call(node, *HEAD_TARGETS):
        return node
    source = node.format_node() if isinstance(node, fx.Node) else repr(node)
    return f"logits come from {readable_code(source, None)}, not a linear head"


class MaskOnlyHeadPass(GraphPass):
    name = "MaskOnlyHeadPass"

    def __init__(self, info: GraphInfo):
        self.info = info

    def run(self, gm: fx.GraphModule) -> PassResult:
        node = logits_head(gm, self.info.logits_index)
        if isinstance(node, str):
            return PassResult(self.name, 0, False, skipped=(node,))
        resp_idx = placeholder(gm, "resp_idx")
        hidden = node.args[0]
        with gm.graph.inserting_before(node):
            rows = gm.graph.call_function(torch.index_select, (hidden, 1, resp_idx))
        node.replace_input_with(hidden, rows)
        return PassResult(self.name, matches=1, changed=True)
