"""Read-only analysis of a captured graph: where the tokens come in, which symbol is the
sequence length, which output holds the logits. Shared by the passes; rewrites nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from maskkv_compile._torch_private import example_value, sym_expr
from maskkv_compile.naming import readable_name  # messages name nodes by module path

from .base import graph_outputs


class UnsupportedModelError(RuntimeError):
    """The model cannot be rewritten safely; the message lists what was seen."""


@dataclass(frozen=True)
class GraphInfo:
    tokens: str  # placeholder name of the (B, S) token ids
    seq_expr: object  # sympy expression of S (or an int when the trace was static)
    seq_symbols: tuple[str, ...]  # SymInt placeholders that carry S
    per_token: tuple[str, ...]  # other (B, S, ...) inputs (token_type_ids, position_ids, ...)
    logits_index: int  # position of the logits among the graph outputs
    # sympy expression of the batch size (an int when static); never int()-ed: that would guard
    batch: object


def _is_seq(value, seq_expr) -> bool:
    return isinstance(value, torch.SymInt) and sym_expr(value) == seq_expr


def analyse(gm: fx.GraphModule) -> GraphInfo:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for node in placeholders:
        value = example_value(node)
        if (
            isinstance(value, torch.Tensor)
            and value.dim() == 2
            and not value.is_floating_point()
            and value.dtype != torch.bool
        ):
            candidates.append(node)
    if not candidates:
        seen = [
            f"{readable_name(n.name)}: {_describe(example_value(n))}"
            for n in placeholders
            if not is_weight(n.name)
        ]
        raise UnsupportedModelError(
            "maskkv needs the model to take (batch, seq) integer token ids; the "
            "traced inputs were: " + "; ".join(seen)
        )
    if len(candidates) > 1:
        named = [n for n in candidates if "input_ids" in n.name]
        if len(named) != 1:
            raise UnsupportedModelError(
                "several integer (batch, seq) inputs were traced: "
                + ", ".join(n.name for n in candidates)
                + "; call the model with input_ids only (attention_mask/position_ids "
                "are not supported yet)"
            )
        candidates = named
    tokens = candidates[0]
    shape = example_value(tokens).shape
    seq_expr = sym_expr(shape[1])
    seq_symbols = tuple(n.name for n in placeholders if _is_seq(example_value(n), seq_expr))
    per_token = tuple(
        n.name
        for n in placeholders
        if n is not tokens
        and isinstance(example_value(n), torch.Tensor)
        and example_value(n).dim() >= 2
        and _is_seq(example_value(n).shape[1], seq_expr)
    )
    return GraphInfo(
        tokens.name, seq_expr, seq_symbols, per_token, find_logits(gm, seq_expr), sym_expr(shape[0])
    )


def find_logits(gm: fx.GraphModule, seq_expr) -> int:
    """The logits: the floating (B, S, V) output with the largest V (the last such on ties)."""
    best: Optional[tuple[int, int]] = None
    for i, out in enumerate(graph_outputs(gm)):
        value = example_value(out) if isinstance(out, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point():
            if sym_expr(value.shape[1]) == seq_expr and isinstance(value.shape[2], int):
                if best is None or value.shape[2] >= best[1]:
                    best = (i, value.shape[2])
    if best is None:
        outs = [
            _describe(example_value(o)) if isinstance(o, fx.Node) else repr(o)
            for o in graph_outputs(gm)
        ]
        raise UnsupportedModelError(
            "no (batch, seq, vocab) logits among the model outputs: " + "; ".join(outs)
        )
    return best[0]


def node_by_name(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def is_weight(name: str) -> bool:
    """A placeholder dynamo made of a module's parameter or buffer (by its name)."""
    return "_parameters_" in name or "_buffers_" in name


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype}"
    return type(value).__name__
