"""SpecializeScalarsPass (backend, first): dynamo's float inputs back to the constants they are.

Under ``torch.compile(..., dynamic=True)`` dynamo turns every Python float the model reads
(the attention scale ``1/sqrt(d)``, RMSNorm's epsilon, RoPE's attention scaling) into a
0-d float64 graph input read with ``.item()``. The attention scale then reaches the
``maskkv::attention`` op as a SymFloat, which Inductor cannot pass to a custom op's
``float`` argument, and an eager ``scores * scale`` chain no longer multiplies by a
constant, so FindAttentionPass cannot recognise it.

Matches a placeholder whose value at compile time is a 0-d floating tensor that is not a
parameter and whose every user is ``.item()``; replaces each such ``.item()`` by the
value it had (the placeholder stays, so the graph's signature is unchanged), then folds
the Python arithmetic on those values (``1.0 / item``, ``math.sqrt(item)``) into constants.

Why this is sound: dynamo's default (no ``dynamic=True``) traces these floats as the same
constants, and only turns one into an input once it has seen it change. The values are
the model's hyper-parameters; the backend checks at every call that each input still
holds the value compiled in (the guard dynamo would have had) and raises if one changed
(``specialized`` maps placeholder positions to the values, for that check).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from .base import GraphPass, PassResult, is_method


class SpecializeScalarsPass(GraphPass):
    name = "SpecializeScalarsPass"

    def __init__(self, example_inputs: Sequence):
        self.example_inputs = list(example_inputs)
        self.specialized: dict[int, tuple[str, float]] = {}  # placeholder position -> (name, value)

    def run(self, gm: fx.GraphModule) -> PassResult:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for position, (node, value) in enumerate(zip(placeholders, self.example_inputs)):
            if not (
                isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
            ):
                continue
            if isinstance(value, torch.nn.Parameter) or not node.users:
                continue
            if not all(is_method(user, "item") for user in node.users):
                continue
            number = float(value)
            for user in list(node.users):
                user.replace_all_uses_with(number)
                gm.graph.erase_node(user)
            self.specialized[position] = (node.name, number)
        if self.specialized:
            _fold_constants(gm)
        return PassResult(self.name, matches=len(self.specialized), changed=bool(self.specialized))


_FOLDABLE_MODULES = ("_operator", "operator", "math")


def _fold_constants(gm: fx.GraphModule) -> None:
    """Replace Python-arithmetic nodes whose arguments are all constants by their value."""
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_function"
            or getattr(node.target, "__module__", None) not in _FOLDABLE_MODULES
        ):
            continue
        flat: list = []
        fx.node.map_arg((node.args, node.kwargs), flat.append)
        if flat:  # reads a graph value
            continue
        value = node.target(*node.args, **node.kwargs)
        if not isinstance(value, (int, float)):
            continue
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
