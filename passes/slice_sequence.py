"""SliceSequencePass (step graph): compute only the response rows, at absolute positions.

The sequence dimension is cut at its sources, so everything downstream is (B, R, ...):
  * the token ids placeholder, and every other (B, S, ...) input (token_type_ids,
    position_ids)                      -> ``index_select(x, 1, resp_idx)``
  * ``arange`` of length S (positions) -> ``resp_idx + start`` (absolute positions for RoPE
                                          and learned position embeddings)
  * ``table[..., :S]`` (cached rotary tables, ``position_ids``/``token_type_ids`` buffers)
                                       -> ``index_select(table, dim, resp_idx)``
  * every other use of the length symbol S (views, reshapes) -> ``resp_idx.size(0)``
``resp_idx`` (R,) int64 is a new graph input: the response positions, in order, anywhere
in the sequence (a suffix is one case, an infilled span another).

Invariant, checked after the rewrite by running the graph on fake tensors with S != R: no
computed tensor has a dimension of size S. A source the pass does not know (a length-S
tensor built some other way) fails that check with an error naming the node.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from maskkv_compile._torch_private import FakeTensorMode, example_value, sym_expr, sym_hint
from maskkv_compile.naming import readable_code, readable_name  # messages name nodes by module path
from maskkv_compile.tensor_parallel import fake_like, real_object

from .base import GraphPass, PassResult, is_call, placeholder
from .dead_code import eliminate_dead_code
from .graph_info import GraphInfo, UnsupportedModelError, node_by_name

CHECK_SEQ, CHECK_RESP = (
    761,
    7,
)  # sizes for the fake-tensor check; S must not collide with model dims


class SliceSequencePass(GraphPass):
    name = "SliceSequencePass"

    def __init__(self, info: GraphInfo):
        self.info = info

    def _is_seq(self, value) -> bool:
        return isinstance(value, torch.SymInt) and sym_expr(value) == self.info.seq_expr

    def run(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        resp_idx = placeholder(gm, "resp_idx")
        rewrites = 0
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first_op):
            num_resp = graph.call_method("size", (resp_idx, 0))
        for name in (self.info.tokens, *self.info.per_token):
            per_token = node_by_name(gm, name)
            with graph.inserting_before(first_op):
                sliced = graph.call_function(torch.index_select, (per_token, 1, resp_idx))
            per_token.replace_all_uses_with(
                sliced, delete_user_cb=lambda user, sliced=sliced: user is not sliced
            )
            rewrites += 1

        for node in list(graph.nodes):
            if is_call(node, torch.arange) and self._is_seq(example_value(node).shape[0]):
                rewrites += self._positions(gm, node, resp_idx)
            elif is_call(node, operator.getitem):
                rewrites += self._table_slice(gm, node, resp_idx)
        seq_nodes = [
            n for n in graph.nodes if n.op == "placeholder" and n.name in self.info.seq_symbols
        ]
        for node in seq_nodes:
            node.replace_all_uses_with(num_resp)
        rewrites += len(seq_nodes)
        eliminate_dead_code(graph)
        gm.recompile()
        check_no_sequence_left(gm, self.info)
        return PassResult(self.name, matches=rewrites, changed=True)

    def _positions(self, gm: fx.GraphModule, node: fx.Node, resp_idx: fx.Node) -> int:
        args = node.args
        start = args[0] if len(args) >= 2 else node.kwargs.get("start", 0)
        step = args[2] if len(args) >= 3 else node.kwargs.get("step", 1)
        if step != 1:
            raise UnsupportedModelError(
                f"position source {readable_name(node.name)} is an arange with step {step}"
            )
        dtype = node.kwargs.get("dtype")
        with gm.graph.inserting_before(node):
            positions = (
                resp_idx if start == 0 else gm.graph.call_function(operator.add, (resp_idx, start))
            )
            if dtype is not None and dtype != torch.long:
                positions = gm.graph.call_method("to", (positions, dtype))
        node.replace_all_uses_with(positions)
        return 1

    def _table_slice(self, gm: fx.GraphModule, node: fx.Node, resp_idx: fx.Node) -> int:
        """table[..., :S, ...] -> index_select(table, dim, resp_idx)."""
        source, index = node.args
        items = index if isinstance(index, tuple) else (index,)
        for dim, item in enumerate(items):
            if item is Ellipsis:
                return 0  # only leading-slice forms are rewritten; the check catches the rest
            stop = (
                example_value(item.stop)
                if isinstance(item, slice) and isinstance(item.stop, fx.Node)
                else None
            )
            if (
                isinstance(item, slice)
                and item.start in (None, 0)
                and item.step in (None, 1)
                and self._is_seq(stop)
            ):
                rest = tuple(slice(None) if i == dim else it for i, it in enumerate(items))
                with gm.graph.inserting_before(node):
                    full = gm.graph.call_function(operator.getitem, (source, rest))
                    picked = gm.graph.call_function(torch.index_select, (full, dim, resp_idx))
                node.replace_all_uses_with(picked)
                return 1
        return 0


def check_no_sequence_left(gm: fx.GraphModule, info: GraphInfo) -> None:
    """Run ``gm`` on fake tensors with S != R; fail if any computed tensor still has size S."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = []
    with mode:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.target == "resp_idx":
                args.append(torch.arange(CHECK_RESP))
                continue
            value = example_value(node)
            if isinstance(value, torch.Tensor):
                shape = [
                    CHECK_SEQ if sym_expr(d) == info.seq_expr else sym_hint(d) for d in value.shape
                ]
                args.append(
                    fake_like(value, shape)
                )  # a DTensor input (tensor parallelism) stays one
            elif isinstance(value, torch.SymInt):
                args.append(CHECK_SEQ if sym_expr(value) == info.seq_expr else sym_hint(value))
            else:
                args.append(real_object(value))  # e.g. the DeviceMesh of a tensor-parallel model
    leftovers: list[str] = []

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            if (
                n.op == "call_method" and n.target == "item"
            ):  # a scalar input (dynamo's unspecialized floats)
                return 1.0  # its value never shapes a tensor
            result = super().run_node(n)
            if n.op == "call_function" or n.op == "call_method":
                if isinstance(result, torch.Tensor) and CHECK_SEQ in result.shape:
                    leftovers.append(
                        readable_code(
                            f"{n.name} = {n.format_node()} -> {tuple(result.shape)}", None
                        )
                    )
            return result

    try:
        with mode:
            _Recorder(gm).run(*args)
    except Exception as error:  # a shape clash: some length-S source was not sliced
        raise UnsupportedModelError(
            "the step graph mixes sliced and full-length tensors after slicing at the "
            f"known sources: {error}"
        ) from error
    if leftovers:
        raise UnsupportedModelError(
            "the step graph still computes full-sequence tensors after slicing "
            "at the known sources "
            "(token ids, arange positions, table[:S]); unhandled:\n  " + "\n  ".join(leftovers[:10])
        )
