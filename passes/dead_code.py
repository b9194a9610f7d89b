"""Dead-code elimination that keeps in-place writes.

``fx.Graph.eliminate_dead_code`` removes a node that nothing reads unless FX calls it impure,
and FX's rule looks only at ``call_function`` targets with a schema. A dynamo graph records a
model's in-place writes as Tensor methods (``group_mask.scatter_(1, idx, 1)``, whose result
LLaDA2's released MoE gate never reads) or plain torch functions (``torch.relu_``,
``F.relu(x, inplace=True)``, ``out=``). FX drops them, and the tensor they write is read
afterwards with its old contents: wrong numbers, silently.

:func:`eliminate_dead_code` keeps a write whose storage may be read: the tensor it writes, or a
view of it (a chain of view-like ops back to the tensor that owns the storage), has a reader
still in the graph, or the storage belongs to a graph input or a module attribute (a side
effect outside the graph). A write to a temporary that nothing reads goes like any dead node.

Invariant: a node is removed only if no node left in the graph can observe its effect, on the
assumption that an op not listed in ``_VIEWS`` returns new storage. The list holds every op
that can return its input's storage (``contiguous``, ``to`` and the dtype casts among them,
which return ``self`` when there is nothing to do).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx

_VIEWS = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand",
        "expand_as", "unsqueeze", "squeeze", "narrow", "select", "flatten", "unflatten", "t",
        "contiguous", "to", "type", "type_as", "float", "half", "double", "bfloat16", "detach",
        "as_strided", "split", "split_with_sizes", "chunk", "tensor_split", "unbind",
        "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold", "view_as_real",
        "view_as_complex", "real", "imag", "__getitem__", "getitem", "alias", "positive",
    }
)  # fmt: skip
_IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
        operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
        operator.ilshift, operator.irshift, operator.imatmul,
    }
)  # fmt: skip


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", "")
    return ""


def _written(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node an in-place call writes (None: not an in-place call)."""
    if node.op not in ("call_method", "call_function"):
        return None
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    name = _name(node)
    in_place = (
        (name.endswith("_") and not name.endswith("__"))  # scatter_, masked_fill_, torch.relu_
        or node.kwargs.get("inplace") is True
        or node.target in _IN_PLACE_OPERATORS
    )
    return first if in_place else None


def _owner(node: fx.Node) -> fx.Node:
    """The node that owns the storage ``node`` may share (itself if it is not a view)."""
    while _name(node) in _VIEWS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def eliminate_dead_code(graph: fx.Graph) -> bool:
    """``graph.eliminate_dead_code`` that keeps every in-place write whose storage may be read
    (see the module docstring). Returns whether anything was removed."""
    views: dict[fx.Node, set[fx.Node]] = {}  # storage owner -> the nodes that may alias it
    for node in graph.nodes:
        views.setdefault(_owner(node), set()).add(node)

    def may_be_read(node: fx.Node) -> bool:
        owner = _owner(_written(node))
        if owner.op in ("placeholder", "get_attr"):
            return True
        aliases = views.get(owner, {owner})
        return any(
            user is not node and user not in aliases and not user._erased
            for alias in aliases
            if not alias._erased
            for user in alias.users
        )

    def impure(node: fx.Node) -> bool:
        if node.is_impure():
            return True
        return _written(node) is not None and may_be_read(node)

    return graph.eliminate_dead_code(is_impure_node=impure)
