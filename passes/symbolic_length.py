"""SymbolicLengthPass (backend, before everything else): a static trace made symbolic in S.

Dynamo traces the first call with every size a constant unless the user asked otherwise
(``dynamic=True`` / ``mark_dynamic``). The MaskKV step graph computes R response rows, not
S, so every use of the sequence length must be a graph value the later passes can redirect.

Matches, with S the token input's dim 1 (an int in a static trace):
  * int constants equal to S in *size positions*: the shape arguments of ``view`` /
    ``reshape`` / ``expand`` / ``repeat`` / ``new_*`` / ``zeros`` / ``ones`` / ``empty`` /
    ``full`` / ``broadcast_to`` / ``narrow`` (length) / ``unflatten`` (sizes), also inside
    tuples and lists; the end of ``arange``; the start or stop of a slice in ``x[...]``.
Inserts one node ``seq = tokens.size(1)`` right after the placeholders and puts it in
place of each matched constant (SliceSequencePass later redirects the tokens' users to the
sliced tokens, so in the step graph ``seq`` is R). The token input and every other
non-parameter (B, S, ...) input (token_type_ids, position_ids) get fake values whose dim 1
is one symbol s, and every node's ``example_value`` is recomputed from them, so
``analyse`` sees a symbolic sequence length exactly as in a dynamic trace.

Invariants (else ``UnsupportedModelError``, telling the user to trace with a symbolic
length): S equals no other size of any input (the batch, a weight or buffer dimension);
no int equal to S is left outside a size position (``pow(x, 2)`` with S == 2 is
ambiguous); run on fake inputs of lengths S + 7 and 761, the graph raises no shape error
and every tensor's shape is its symbolic shape evaluated there.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from maskkv_compile import _torch_private
from maskkv_compile._torch_private import FakeTensorMode, example_value, sym_expr, sym_hint, tracing
from maskkv_compile.naming import readable_code, readable_name  # messages name nodes by module path
from maskkv_compile.tensor_parallel import fake_like, is_dtensor, real_object

from .base import GraphPass, PassResult, is_call
from .graph_info import UnsupportedModelError, analyse

if TYPE_CHECKING:
    import sympy

TRIAL_OFFSET, TRIAL_PRIME = 7, 761  # the trial lengths: S + 7 and a prime no model dim is

# every positional argument from index 1 on (and these keywords) is a size
_SIZE_METHODS = {
    "view",
    "reshape",
    "expand",
    "repeat",
    "new_zeros",
    "new_ones",
    "new_empty",
    "broadcast_to",
    "resize_",
}
_SIZE_FUNCTIONS = {
    torch.zeros: 0,
    torch.ones: 0,
    torch.empty: 0,
    torch.rand: 0,
    torch.randn: 0,
    torch.reshape: 1,
    torch.broadcast_to: 1,
    torch.Tensor.view: 1,
    torch.Tensor.reshape: 1,
    torch.Tensor.expand: 1,
    torch.Tensor.repeat: 1,
}
_SIZE_KWARGS = ("size", "shape", "sizes", "end", "length")
_ONE_SIZE = {
    ("call_method", "new_full"): 1,
    ("call_method", "narrow"): 3,
    ("call_method", "unflatten"): 2,
    ("call_function", torch.full): 0,
    ("call_function", torch.narrow): 3,
}

_HINT = (
    "Trace the length symbolically instead: torch.compile(model, backend='maskkv', dynamic=True, "
    "...) or torch._dynamo.mark_dynamic(input_ids, 1) before the first call"
)


def _is_S(value, S: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == S


def _substitute(value, S: int, seq: fx.Node, slices_only: bool = False):
    """``value`` with every int equal to S (also in tuples/lists; with ``slices_only``, only a
    slice's start or stop) replaced by ``seq``; returns (new value, replacements)."""
    if _is_S(value, S) and not slices_only:
        return seq, 1
    if isinstance(value, (tuple, list)):
        items = [_substitute(v, S, seq, slices_only) for v in value]
        return type(value)(v for v, _ in items), sum(c for _, c in items)
    if isinstance(value, slice):
        start, a = _substitute(value.start, S, seq)
        stop, b = _substitute(value.stop, S, seq)
        return slice(start, stop, value.step), a + b
    return value, 0


def _ints_equal_to(value, S: int) -> int:
    if _is_S(value, S):
        return 1
    if isinstance(value, (tuple, list)):
        return sum(_ints_equal_to(v, S) for v in value)
    if isinstance(value, slice):
        return sum(_ints_equal_to(v, S) for v in (value.start, value.stop, value.step))
    if isinstance(value, dict):
        return sum(_ints_equal_to(v, S) for v in value.values())
    return 0


def _size_positions(node: fx.Node) -> tuple[list[int], tuple[str, ...]]:
    """(indices of the positional args that are sizes, keyword names that are sizes)."""
    n = len(node.args)
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        positions, keywords = list(range(1, n)), _SIZE_KWARGS
    elif node.op == "call_function" and node.target in _SIZE_FUNCTIONS:
        positions, keywords = list(range(_SIZE_FUNCTIONS[node.target], n)), _SIZE_KWARGS
    elif (node.op, node.target) in _ONE_SIZE:
        positions, keywords = [_ONE_SIZE[(node.op, node.target)]], _SIZE_KWARGS
    elif is_call(node, torch.arange):  # arange(end) / arange(start, end[, step])
        positions, keywords = [0 if n == 1 else 1], ("end",)
    elif is_call(
        node, operator.getitem
    ):  # x[..., :S]: slice bounds only (a bare index is not a size)
        positions, keywords = [1], ()
    else:
        positions, keywords = [], ()
    return [i for i in positions if i < n], keywords


class SymbolicLengthPass(GraphPass):
    name = "SymbolicLengthPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        info = analyse(gm)
        S, batch = info.seq_expr, info.batch
        if not isinstance(S, int):
            return PassResult(
                self.name, 0, False, skipped=("the sequence length is already symbolic",)
            )
        tokens = next(n for n in gm.graph.nodes if n.name == info.tokens)
        per_token = self._check_inputs(gm, tokens, S, batch)
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            seq = gm.graph.call_method("size", (tokens, 1))
        replaced, leftovers = self._replace(gm, S, seq)
        if leftovers:
            raise UnsupportedModelError(
                f"the sequence length was traced as the constant {S}, and {S} also appears where "
                "it is not a size, so maskkv cannot tell which uses are the length:\n  "
                + "\n  ".join(leftovers[:10])
                + "\n"
                + _HINT
            )
        symbol = _propagate(gm, tokens, per_token, S)
        for trial in (S + TRIAL_OFFSET, TRIAL_PRIME):
            _verify(gm, tokens, per_token, symbol, S, trial, replaced)
        return PassResult(self.name, matches=len(replaced), changed=True)

    @staticmethod
    def _check_inputs(gm: fx.GraphModule, tokens: fx.Node, S: int, batch) -> list[fx.Node]:
        """The other (B, S, ...) inputs; refuses an S that is also another input size."""
        per_token, clashes = [], []
        if batch == S:
            clashes.append(f"the batch size of {readable_name(tokens.name)}")
        for node in gm.graph.nodes:
            value = example_value(node) if node.op == "placeholder" else None
            if node is tokens or not isinstance(value, torch.Tensor):
                continue
            state = "parameters" in node.name or "buffers" in node.name
            if (
                not state
                and value.dim() >= 2
                and sym_expr(value.shape[0]) == batch
                and value.shape[1] == S
            ):
                per_token.append(node)
                dims = [d for d in range(value.dim()) if d != 1 and value.shape[d] == S]
            else:
                dims = [d for d in range(value.dim()) if value.shape[d] == S]
            clashes += [f"dim {d} of {readable_name(node.name)} {tuple(value.shape)}" for d in dims]
        if clashes:
            more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
            raise UnsupportedModelError(
                f"the sequence length was traced as the constant {S}, which is also "
                "a size of the model: "
                + "; ".join(clashes[:3])
                + more
                + f". maskkv cannot tell which {S}s in the graph are the length. "
                + _HINT
            )
        return per_token

    @staticmethod
    def _replace(gm: fx.GraphModule, S: int, seq: fx.Node) -> tuple[list[str], list[str]]:
        replaced, leftovers = [], []
        for node in list(gm.graph.nodes):
            if node.op not in ("call_function", "call_method") or node is seq:
                continue
            positions, keywords = _size_positions(node)
            args, kwargs = list(node.args), dict(node.kwargs)
            count = 0
            slices_only = is_call(node, operator.getitem)
            for i in positions:
                args[i], c = _substitute(args[i], S, seq, slices_only)
                count += c
            for key in keywords:
                if key in kwargs:
                    kwargs[key], c = _substitute(kwargs[key], S, seq)
                    count += c
            if count:
                replaced.append(readable_code(f"{node.name} = {node.format_node()}", None))
                node.args, node.kwargs = tuple(args), kwargs
            left = _ints_equal_to(node.args, S) + _ints_equal_to(node.kwargs, S)
            if left:
                leftovers.append(readable_code(f"{node.name} = {node.format_node()}", None))
        return replaced, leftovers


def _fake_inputs(
    gm: fx.GraphModule, mode, tokens: fx.Node, per_token: list[fx.Node], length, batch
) -> list:
    """Fake values for the placeholders: tokens and per-token inputs of ``length`` and ``batch``
    rows (the batch may be symbolic too: dynamo's automatic dynamic shapes after a second batch
    size), a SymInt input that is the batch as ``batch``, the rest as traced."""
    args = []
    batch_expr = sym_expr(example_value(tokens).shape[0])
    with mode:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            value = example_value(node)
            if (
                isinstance(value, torch.SymInt)
                and not isinstance(batch_expr, int)
                and sym_expr(value) == batch_expr
            ):
                args.append(batch)
            elif node is tokens or node in per_token:
                shape = (batch, length, *value.shape[2:])
                args.append(torch.zeros(shape, dtype=value.dtype, device=value.device))
            elif is_dtensor(value):  # a sharded parameter (tensor parallelism) stays a DTensor
                args.append(fake_like(value, value.shape))
            elif isinstance(value, torch.Tensor):
                args.append(
                    torch.empty_strided(
                        value.shape, value.stride(), dtype=value.dtype, device=value.device
                    )
                )
            else:
                args.append(real_object(value))  # e.g. the DeviceMesh of a tensor-parallel model
    return args


class _Run(fx.Interpreter):
    """Runs the graph on fake values, handing each node's result to ``visit``."""

    def __init__(self, gm, visit):
        super().__init__(gm)
        self.visit = visit
        self.current: fx.Node | None = None

    def run_node(self, n):
        self.current = n
        result = super().run_node(n)
        self.visit(n, result)
        return result

    def failure(self, error: Exception) -> str:
        """One line: the node that failed and the first line of the error."""
        where = (
            f"{self.current.name} = {self.current.format_node()}: "
            if self.current is not None
            else ""
        )
        return where + f"{type(error).__name__}: " + str(error).strip().split("\n")[0]


def _propagate(
    gm: fx.GraphModule, tokens: fx.Node, per_token: list[fx.Node], S: int
) -> sympy.Symbol:
    """Recompute every node's ``example_value`` with dim 1 of the token inputs one symbol s."""
    env = _torch_private.ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    value = example_value(tokens)
    dim = _torch_private.DimDynamic
    batch = dim.DYNAMIC if isinstance(value.shape[0], torch.SymInt) else dim.STATIC
    context = _torch_private.StatelessSymbolicContext(dynamic_sizes=[batch, dim.DYNAMIC])
    hints = tuple(sym_hint(d) for d in value.shape)
    fake_tokens = mode.from_tensor(torch.zeros(hints, dtype=value.dtype), symbolic_context=context)
    length = fake_tokens.shape[1]  # SymInt s, hint S
    args = _fake_inputs(gm, mode, tokens, per_token, length, fake_tokens.shape[0])

    def record(node, result):
        node.meta["example_value"] = result
        if "val" in node.meta:
            node.meta["val"] = result

    run = _Run(gm, record)
    try:
        with (
            tracing(None),
            mode,
        ):  # DTensor ops find the active fake mode, not the one dynamo traced with
            run.run(*args)
    except Exception as error:  # noqa: BLE001 - any failure means the rewrite is not sound
        raise UnsupportedModelError(
            f"the sequence length was traced as the constant {S}; maskkv made it symbolic "
            "but the graph does not "
            f"trace with a symbolic length: {run.failure(error)}\n" + _HINT
        ) from error
    return sym_expr(length)


def _verify(gm, tokens, per_token, symbol, S: int, trial: int, replaced: list[str]) -> None:
    """Run on fake inputs of length ``trial``; every shape must be its symbolic shape at
    ``trial``."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    batch = example_value(tokens).shape[0]  # after _propagate: an int, or its own symbol
    args = _fake_inputs(gm, mode, tokens, per_token, trial, sym_hint(batch))
    values = {
        symbol: trial,
        **({sym_expr(batch): sym_hint(batch)} if isinstance(batch, torch.SymInt) else {}),
    }
    expected = {n: example_value(n) for n in gm.graph.nodes}
    mismatches: list[str] = []

    def check(node, result):
        want = expected.get(node)
        if isinstance(result, torch.Tensor) and isinstance(want, torch.Tensor):
            shape = [
                int(sym_expr(d).subs(values)) if isinstance(d, torch.SymInt) else d
                for d in want.shape
            ]
            if list(result.shape) != shape:
                mismatches.append(
                    f"{node.name} = {node.format_node()}: {tuple(result.shape)}, "
                    f"expected {tuple(shape)}"
                )

    failure = None
    run = _Run(gm, check)
    try:
        with tracing(None), mode:
            run.run(*args)
    except Exception as error:  # noqa: BLE001 - a shape clash: some S was not (or wrongly) made symbolic
        failure = run.failure(error)
    if failure or mismatches:
        seen = "\n  ".join(replaced[:12]) or "(none)"
        raise UnsupportedModelError(
            f"the sequence length was traced as the constant {S}; maskkv replaced the "
            f"{S}s in size arguments by the token length, but the graph does not follow "
            f"another length ({trial}): "
            + (failure or "\n  " + "\n  ".join(mismatches[:10]))
            + f"\nreplaced:\n  {seen}\nA model dimension (head size, head count) equal to {S} "
            "makes this ambiguous. " + _HINT
        )
