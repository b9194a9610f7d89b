"""PruneTailRowsPass (prefill graph): the layers after the last attention on the response rows.

The prefill returns logits for the response rows only (``MaskOnlyHeadPass`` selects them before
the LM head), and the prompt rows of the last layer feed nothing else: its K/V come from
before its attention. Everything between the last ``maskkv::attention`` and that selection
(the output projection, the residual adds, the MLP, the final norm) is therefore dead work on
the prompt rows: 1/L of the prefill on an L-layer model, the prompt being most of the rows.

Matches: the last ``maskkv::attention`` node A and the ``index_select(h, 1, resp_idx)`` feeding
the LM head; the *tail* T is every node that depends on A and leads to ``h``.
Inserts:
  * ``index_select(q, 2, resp_idx)`` on A's queries, and A's block ends (``key_end``, per
    query) replaced by the graph input ``rows_key_end`` (the response rows' block ends, or the
    same empty (0,) tensor when there are none);
  * ``index_select(x, d, resp_idx)`` on every other tensor that flows into T with the sequence
    in dim d (the residual stream), and ``resp_idx.size(0)`` for the length S in T's sizes;
  * the selection before the LM head is removed: ``h`` already holds the response rows.

Invariants (else the pass changes nothing and says why in ``skipped``; the prefill is then
the full one, never wrong):
  * every node of T computes each row from that row alone: elementwise ops, casts, the
    projections (``linear`` / ``matmul`` on a weight), norms and reductions over other dims,
    softmax over another dim, reshapes that keep the rows (the product of the dims before
    the sequence is unchanged), dimension moves, and basic slicing that keeps every row;
  * every tensor of T has the sequence in exactly one dim, and no size that merely contains S;
  * nothing outside T reads a node of T (no other output needs the prompt rows).
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from maskkv_compile._torch_private import example_value, sym_expr

from .base import GraphPass, PassResult, is_call, is_method, placeholder
from .dead_code import eliminate_dead_code
from .graph_info import GraphInfo
from .mask_only_head import HEAD_TARGETS, logits_head

ATTENTION = torch.ops.maskkv.attention.default

ELEMENTWISE_FUNCTIONS = (
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.neg,
    torch.pow,
    torch.rsqrt,
    torch.sqrt,
    torch.exp,
    torch.tanh,
    torch.sigmoid,
    torch.erf,
    F.silu,
    F.gelu,
    F.relu,
    torch.relu,
)
ELEMENTWISE_METHODS = (
    "to",
    "float",
    "half",
    "bfloat16",
    "double",
    "type",
    "type_as",
    "contiguous",
    "clone",
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "pow",
    "rsqrt",
    "sqrt",
    "exp",
    "tanh",
    "sigmoid",
)
REDUCE_METHODS = ("mean", "sum", "amax", "norm")
REDUCE_FUNCTIONS = (torch.mean, torch.sum, torch.amax)
SOFTMAX = (F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
NORMS = (F.layer_norm, F.rms_norm)
MOVES_METHODS = ("transpose", "permute", "unsqueeze", "squeeze")
MOVES_FUNCTIONS = (torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze)
RESHAPES_METHODS = ("view", "reshape", "flatten", "unflatten")
RESHAPES_FUNCTIONS = (torch.reshape, torch.flatten)


class PruneTailRowsPass(GraphPass):
    name = "PruneTailRowsPass"

    def __init__(self, info: GraphInfo):
        self.info = info

    def _is_seq(self, size) -> bool:
        return sym_expr(size) == self.info.seq_expr

    def _seq_dim(self, node) -> Optional[int]:
        """The one dim of ``node``'s value that is S; None when there is none; -1 when S shows up
        in more than one dim or inside another size (S * heads: rows merged)."""
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            return -1
        dims = [i for i, d in enumerate(value.shape) if self._is_seq(d)]
        mixed = any(
            isinstance(d, torch.SymInt) and not self._is_seq(d) and self._mentions_seq(d)
            for d in value.shape
        )
        if mixed or len(dims) > 1:
            return -1
        return dims[0] if dims else None

    def _mentions_seq(self, size) -> bool:
        expr = sym_expr(size)
        seq = self.info.seq_expr
        return hasattr(expr, "free_symbols") and bool(
            getattr(seq, "free_symbols", set()) & expr.free_symbols
        )

    def run(self, gm: fx.GraphModule) -> PassResult:
        def skip(why: str) -> PassResult:
            return PassResult(self.name, 0, False, skipped=(why,))

        graph = gm.graph
        head = logits_head(gm, self.info.logits_index)
        select = None if isinstance(head, str) else head.args[0]
        if not (is_call(select, torch.index_select) and select.args[1] == 1):
            return skip("the LM head reads no selection of the response rows")
        if isinstance(self.info.seq_expr, int):
            return skip("a static sequence length")  # SymbolicLengthPass makes it a symbol
        resp_idx = select.args[2]
        attentions = [n for n in graph.nodes if is_call(n, ATTENTION)]
        if not attentions:
            return skip("no attention")
        attn = attentions[-1]
        tail = self._tail(attn, select)
        if isinstance(tail, str):
            return skip(tail)
        why = self._check(attn, tail)
        if why is not None:
            return skip(why)
        self._rewrite(gm, attn, tail, select, resp_idx)
        return PassResult(self.name, matches=len(tail), changed=True)

    # -- analysis --------------------------------------------------------------------------
    def _tail(self, attn: fx.Node, select: fx.Node):
        """The nodes that depend on ``attn`` and lead to ``select`` (in graph order), or why
        there is no such closed set."""
        below, todo = set(), [attn]
        while todo:
            for user in todo.pop().users:
                if user not in below:
                    below.add(user)
                    todo.append(user)
        if select not in below:
            return "the logits do not depend on the last attention"
        above, todo = set(), [select.args[0]]
        while todo:
            node = todo.pop()
            if node in above or not isinstance(node, fx.Node):
                continue
            above.add(node)
            todo += node.all_input_nodes
        tail = [n for n in attn.graph.nodes if n in below and n in above]
        for node in (attn, *tail):
            outside = [u for u in node.users if u not in tail and u is not select]
            if outside:
                return f"{outside[0].name} reads {node.name} outside the rows the logits need"
        return tail

    def _check(self, attn: fx.Node, tail: list[fx.Node]) -> Optional[str]:
        members = set(tail)
        if self._seq_dim(attn.args[0]) != 2:
            return f"the last attention's queries {attn.args[0].name} are not (B, H, S, D)"
        for node in tail:
            dim = self._seq_dim(node)
            if dim is None or dim < 0:
                return f"{node.name} does not hold the sequence in one dim"
            for arg in node.all_input_nodes:
                value = example_value(arg)
                if (
                    isinstance(value, torch.SymInt)
                    and not self._is_seq(value)
                    and self._mentions_seq(value)
                ):
                    return f"{node.name} reads a size computed from S ({arg.name})"
            why = self._rowwise(node, members | {attn})
            if why is not None:
                return f"{node.name}: {why}"
        return None

    def _rowwise(self, node: fx.Node, members: set) -> Optional[str]:
        """None when each row of ``node`` depends on the same row of its inputs only."""
        out_dim = self._seq_dim(node)
        out = example_value(node)
        tensors = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
        if is_call(node, *ELEMENTWISE_FUNCTIONS) or is_method(node, *ELEMENTWISE_METHODS):
            for arg in tensors:
                value = example_value(arg)
                at = out_dim - (out.dim() - value.dim())  # the row dim, broadcast from the right
                if arg in members or self._seq_dim(arg) is not None:
                    if self._seq_dim(arg) != at:
                        return f"{arg.name} is not row-aligned"
                elif at >= 0 and value.shape[at] != 1:
                    return f"{arg.name} broadcasts across rows"
            return None
        if is_call(node, *HEAD_TARGETS) or is_call(node, operator.matmul):
            x, others = node.args[0], node.args[1:]
            if any(isinstance(o, fx.Node) and self._seq_dim(o) is not None for o in others):
                return "a product with another row-indexed tensor"
            if self._seq_dim(x) == example_value(x).dim() - 1:
                return "a product over the rows"
            return None
        if is_method(node, *REDUCE_METHODS) or is_call(node, *REDUCE_FUNCTIONS):
            return self._reduced_dims_ok(node, "dim")
        if is_call(node, *SOFTMAX) or is_method(node, "softmax", "log_softmax"):
            return self._reduced_dims_ok(node, "dim")
        if is_call(node, *NORMS):
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            x = node.args[0]
            if not isinstance(shape, (tuple, list)):
                return "a norm over a shape given as a graph value"
            if self._seq_dim(x) >= example_value(x).dim() - len(shape):
                return "a norm over the rows"
            return None
        if is_method(node, *MOVES_METHODS) or is_call(node, *MOVES_FUNCTIONS):
            if (is_method(node, "squeeze") or is_call(node, torch.squeeze)) and len(node.args) < 2:
                return "a squeeze of every size-1 dim (it would drop a single response row)"
            return None  # a dimension move: rows stay rows (found again by their size S)
        if is_method(node, *RESHAPES_METHODS) or is_call(node, *RESHAPES_FUNCTIONS):
            x = node.args[0]
            before_in = example_value(x).shape[: self._seq_dim(x)]
            before_out = out.shape[:out_dim]
            if sym_expr(math.prod(before_in)) != sym_expr(math.prod(before_out)):
                return "a reshape that moves elements across rows"
            return None
        if is_call(node, operator.getitem):
            return self._basic_slice_ok(node)
        return f"{node.format_node()} is not known to be row-wise"

    def _reduced_dims_ok(self, node: fx.Node, name: str) -> Optional[str]:
        x = node.args[0]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get(name)
        if dims is None or isinstance(dims, fx.Node):
            return "a reduction over every dim"
        ndim = example_value(x).dim()
        dims = [d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
        return "a reduction over the rows" if self._seq_dim(x) in dims else None

    def _basic_slice_ok(self, node: fx.Node) -> Optional[str]:
        x, index = node.args
        if not isinstance(index, tuple):
            index = (index,)
        if any(isinstance(i, fx.Node) for i in index):
            return "indexing by a tensor or a graph value"
        ndim, row = example_value(x).dim(), self._seq_dim(x)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        dim = 0
        for entry in index:
            if entry is None:
                continue
            if entry is Ellipsis:
                dim += ndim - consumed
                continue
            if dim == row:
                full = isinstance(entry, slice) and entry.start in (None, 0) and entry.stop is None
                if not (full and entry.step in (None, 1)):
                    return "a slice of the rows"
            dim += 1
        return None

    # -- rewrite ---------------------------------------------------------------------------
    def _rewrite(self, gm, attn, tail, select, resp_idx) -> None:
        graph = gm.graph
        members = set(tail)
        with graph.inserting_before(attn):
            rows = graph.call_method("size", (resp_idx, 0))  # R
            q = graph.call_function(torch.index_select, (attn.args[0], 2, resp_idx))
        attn.replace_input_with(attn.args[0], q)
        key_end = attn.args[6] if len(attn.args) > 6 else attn.kwargs.get("key_end")
        if isinstance(key_end, fx.Node):
            attn.replace_input_with(key_end, placeholder(gm, "rows_key_end"))
        selected: dict = {}
        for node in tail:
            for arg in node.all_input_nodes:
                if arg in members or arg is attn:
                    continue
                value = example_value(arg)
                if isinstance(value, torch.SymInt) and self._is_seq(value):
                    node.replace_input_with(arg, rows)  # a size S in T (also inside tuples)
                    continue
                dim = self._seq_dim(arg) if isinstance(value, torch.Tensor) else None
                if dim is None:
                    continue  # a weight, or a tensor without rows
                if arg not in selected:  # before its first reader in T, after everything it reads
                    with graph.inserting_before(node):
                        selected[arg] = graph.call_function(
                            torch.index_select, (arg, dim, resp_idx)
                        )
                node.replace_input_with(arg, selected[arg])
        select.replace_all_uses_with(select.args[0])  # h holds the response rows already
        graph.erase_node(select)
        eliminate_dead_code(graph)
        gm.recompile()
