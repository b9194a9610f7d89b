"""Proofs that an attention mask in the traced graph lets every query see every key.

Some callers hand SDPA a mask that masks nothing. transformers 5.24 under torch < 2.12 is one
(docs/kernels.md, README "Supported versions"): for a bidirectional model it builds
``(arange(S)[None, None, :, None] + 0 >= 0).expand(B, 1, S, S)``. FindAttentionPass refuses a
site with a mask it cannot rule out. This module rules such masks out by bounding the values
of the nodes that compute them:

* an integer node gets an interval ``[lo, hi]`` (``hi`` may be unbounded): ``arange`` from its
  start; ``add`` / ``sub`` of an interval and an integer constant, or of two intervals;
* a boolean node gets ``True`` / ``False`` when every element is known: a comparison of an
  interval with a constant that the interval decides, ``&`` / ``|`` of known ones, and
  ``ones`` / ``full(..., True)``;
* indexing, views, ``expand``, ``contiguous`` / ``clone`` and dtype-preserving ``to`` keep
  their input's bound.

Anything else is unknown, and the site stays refused. So a mask is dropped only when it is
all-True for every size the graph can be called with, not only for the traced one.

A mask that is not all-True may still be one the model builds from the sequence length alone
(a block-causal mask from a ``block_size`` in its config: Fast-dLLM v2 / SDAR-style code that
makes its mask inside ``forward``). :func:`length_only` says so when nothing the mask is
computed from reads the values of a call's tensors, only their sizes (weights, buffers and
constants are the model's own): such a mask is computed again for each call's length
(``pipeline.MaskKVGraphs.mask_fn``) and read like a mask passed by the caller.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx as fx

from maskkv_compile._torch_private import example_value

from .graph_info import is_weight


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float  # math.inf when unbounded


Bound = Union[Interval, bool, int, None]  # None: unknown

_KEEP_METHODS = {
    "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "permute", "transpose",
    "contiguous", "clone", "__getitem__",
}  # fmt: skip
_KEEP_FUNCTIONS = {
    operator.getitem, torch.reshape, torch.unsqueeze, torch.squeeze, torch.permute,
    torch.transpose, torch.clone,
}  # fmt: skip
_COMPARE = {
    operator.ge: lambda i, c: (i.lo >= c) or (False if i.hi < c else None),
    operator.gt: lambda i, c: (i.lo > c) or (False if i.hi <= c else None),
    operator.le: lambda i, c: (i.hi <= c) or (False if i.lo > c else None),
    operator.lt: lambda i, c: (i.hi < c) or (False if i.lo >= c else None),
}
_COMPARE.update({torch.ge: _COMPARE[operator.ge], torch.gt: _COMPARE[operator.gt]})
_COMPARE.update({torch.le: _COMPARE[operator.le], torch.lt: _COMPARE[operator.lt]})
_FLIP = {operator.ge: operator.le, operator.gt: operator.lt, operator.le: operator.ge,
         operator.lt: operator.gt, torch.ge: torch.le, torch.gt: torch.lt, torch.le: torch.ge,
         torch.lt: torch.gt}  # fmt: skip


def _const(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    return None


def bound(node, depth: int = 0) -> Bound:
    """What is known of every element of ``node``'s value (see the module docstring)."""
    if depth > 64:
        return None
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (bool, int, float)) else None
    args = node.args
    if node.op == "call_method" and node.target in _KEEP_METHODS:
        return bound(args[0], depth + 1)
    if node.op == "call_method" and node.target == "to":
        given = [*args[1:], node.kwargs.get("dtype")]
        dtype = next((a for a in given if isinstance(a, torch.dtype)), None)
        inner = bound(args[0], depth + 1)
        if dtype is None or (isinstance(inner, bool) and dtype == torch.bool):
            return inner
        return inner if isinstance(inner, Interval) and not dtype.is_floating_point else None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _KEEP_FUNCTIONS:
        return bound(args[0], depth + 1)
    if target is torch.arange:
        start = _const(args[0]) if len(args) > 1 else 0
        step = _const(args[2]) if len(args) > 2 else _const(node.kwargs.get("step", 1))
        start = _const(node.kwargs.get("start", start))
        if start is None or step is None or step <= 0:
            return None
        return Interval(start, math.inf)
    if target in (operator.add, torch.add, operator.sub, torch.sub):
        a, b = bound(args[0], depth + 1), bound(args[1], depth + 1)
        sign = -1 if target in (operator.sub, torch.sub) else 1
        if isinstance(a, Interval) and _const(b) is not None:
            return Interval(a.lo + sign * b, a.hi + sign * b)
        if sign == 1 and isinstance(b, Interval) and _const(a) is not None:
            return Interval(b.lo + a, b.hi + a)
        if sign == 1 and isinstance(a, Interval) and isinstance(b, Interval):
            return Interval(a.lo + b.lo, a.hi + b.hi)
        return None
    if target in _COMPARE:
        a, b = bound(args[0], depth + 1), bound(args[1], depth + 1)
        if isinstance(a, Interval) and _const(b) is not None:
            return _COMPARE[target](a, b)
        if isinstance(b, Interval) and _const(a) is not None:
            return _COMPARE[_FLIP[target]](b, a)
        return None
    if target in (operator.and_, torch.logical_and, torch.bitwise_and):
        a, b = bound(args[0], depth + 1), bound(args[1], depth + 1)
        if a is False or b is False:
            return False
        return True if a is True and b is True else None
    if target in (operator.or_, torch.logical_or, torch.bitwise_or):
        a, b = bound(args[0], depth + 1), bound(args[1], depth + 1)
        if a is True or b is True:
            return True
        return False if a is False and b is False else None
    if target is torch.ones and node.kwargs.get("dtype") == torch.bool:
        return True
    if target is torch.full and node.kwargs.get("dtype") == torch.bool and args[1] is True:
        return True
    return None


def allows_everything(mask) -> bool:
    """Whether the boolean attention mask ``mask`` (an FX node) is provably all True."""
    return bound(mask) is True


_SIZE_METHODS = {"size", "dim", "numel"}
_SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}


def _reads_size_only(node: fx.Node) -> bool:
    """A node that reads its tensor input's size (or dtype, device), never its values."""
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    if node.op != "call_function":
        return False
    if node.target is getattr and len(node.args) > 1 and node.args[1] in _SIZE_ATTRIBUTES:
        return True
    packet = getattr(node.target, "overloadpacket", None)
    return packet in (torch.ops.aten.sym_size, torch.ops.aten.sym_numel)


def length_only(mask: fx.Node) -> bool:
    """Whether ``mask``'s value depends on a call only through sizes: no node it is computed
    from reads the values of an input tensor that is not a weight or buffer."""
    stack, seen = [mask], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if isinstance(example_value(node), torch.Tensor) and not is_weight(node.name):
                return False
            continue
        if _reads_size_only(node):
            continue
        stack.extend(node.all_input_nodes)
    return True
