"""Pass infrastructure: the ``PassResult`` record, the ``GraphPass`` base and the manager.

Invariants every pass keeps (checked by the manager after each pass): the graph lints,
the module is recompiled, and nodes a pass inserts are ``maskkv::`` ops or plain indexing
of existing tensors. A pass that finds nothing to do says so in its result; whether that
is an error is the pipeline's decision, never silent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.fx as fx

from maskkv_compile.naming import readable_code

from .dead_code import eliminate_dead_code

log = logging.getLogger("maskkv_compile.passes")
graph_log = logging.getLogger("maskkv_compile.graph")


@dataclass(frozen=True)
class PassResult:
    """What one pass did: sites matched, whether the graph changed, sites skipped (why)."""

    name: str
    matches: int
    changed: bool
    skipped: tuple[str, ...] = ()
    ms: float = 0.0
    inserted: tuple[str, ...] = ()


class GraphPass:
    """One FX rewrite. Subclasses set ``name`` and implement ``run(gm) -> PassResult``; a pass
    takes in ``__init__`` exactly what it reads (the config, the graph's info), nothing else."""

    name = "GraphPass"
    dead_code_elimination = True  # off for passes whose new nodes a later pass consumes

    def run(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        start = time.perf_counter()
        before = {n for n in gm.graph.nodes}
        result = self.run(gm)
        if self.dead_code_elimination:
            eliminate_dead_code(gm.graph)
        gm.graph.lint()
        gm.recompile()
        inserted = tuple(
            str(n.target)
            for n in gm.graph.nodes
            if n not in before and n.op == "call_function" and "maskkv" in str(n.target)
        )
        return dataclasses.replace(
            result, ms=(time.perf_counter() - start) * 1e3, inserted=inserted
        )


def new_placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a placeholder after the existing ones (the graph's call signature grows)."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        return gm.graph.placeholder(name)


def set_outputs(gm: fx.GraphModule, outputs: tuple) -> None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out.args = (tuple(outputs),)


def graph_outputs(gm: fx.GraphModule) -> tuple:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = out.args[0]
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


@dataclass
class PassRecord:
    index: int
    name: str
    result: PassResult
    before: str
    after: str


@dataclass
class PassManager:
    """Runs passes in the given order, one log line each, keeping before/after code.

    With ``MASKKV_DEBUG_DIR`` set, each graph is written as
    ``maskkv.<graph>.<i>.<PassName>.before.py`` / ``.after.py``: for reading (parameters by
    module path, lines wrapped), like every other view of a graph this project prints.
    """

    graph_name: str
    passes: list[GraphPass]
    records: list[PassRecord] = field(default_factory=list)
    debug_dir: Optional[str] = field(default_factory=lambda: os.environ.get("MASKKV_DEBUG_DIR"))

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        for i, graph_pass in enumerate(self.passes):
            stem = f"maskkv.{self.graph_name}.{i}.{graph_pass.name}"
            before = gm.code
            self._dump(f"{stem}.before", gm)
            result = graph_pass(gm)
            after = gm.code
            self.records.append(PassRecord(i, graph_pass.name, result, before, after))
            log.info(
                "[%s] %d %s: matches=%d changed=%s skipped=%d (%.1f ms)",
                self.graph_name,
                i,
                graph_pass.name,
                result.matches,
                result.changed,
                len(result.skipped),
                result.ms,
            )
            self._dump(f"{stem}.after", gm)
        return gm

    def _dump(self, name: str, gm: fx.GraphModule) -> None:
        """``gm`` as it is now, under ``name``: to the ``maskkv_compile.graph`` logger (DEBUG,
        the format TORCH_LOGS and depyf read), as a tlparse artifact, and to ``debug_dir``.
        Every consumer formats the graph right here, so a "before" dump shows the graph
        before the pass mutates it."""
        from maskkv_compile._torch_private import (
            lazy_format_graph_code,
            structured_trace_on,
            trace_structured,
        )

        if graph_log.isEnabledFor(logging.DEBUG):
            graph_log.debug(
                "%s",
                _Readable(
                    lazy_format_graph_code(name, gm, include_stride=True, include_device=True)
                ),
            )
        if structured_trace_on():  # formatting a graph costs more than the pass that made it
            trace_structured(
                "artifact",
                metadata_fn=lambda: {"name": name, "encoding": "string"},
                payload_fn=lambda: _readable(gm),
            )
        if self.debug_dir:
            os.makedirs(self.debug_dir, exist_ok=True)
            with open(os.path.join(self.debug_dir, f"{name}.py"), "w") as f:
                f.write(_as_module(name, gm))


class _Readable:
    """A lazily formatted graph (formatted only when a handler emits it), made readable."""

    def __init__(self, text):
        self.text = text

    def __str__(self) -> str:
        return readable_code(str(self.text))


def _readable(gm: fx.GraphModule) -> str:
    """``print_readable``'s class (shapes, strides and devices as annotations, source lines as
    comments) with dynamo's flattened names as module paths
    (``model.layers.0.self_attn.q_proj.weight``) and every line wrapped to
    :data:`maskkv_compile.naming.WIDTH`. For reading: dotted names do not parse."""
    return readable_code(
        gm.print_readable(print_output=False, include_stride=True, include_device=True)
    )


def _as_module(name: str, gm: fx.GraphModule) -> str:
    """The graph as ``print_readable`` shows it, made readable, under a header naming it."""
    header = (
        f"# {name}: written by maskkv_compile (MASKKV_DEBUG_DIR)\n"
        "# For reading: parameters and buffers by module path, long lines wrapped.\n"
        "# `python -m maskkv_compile.graph_diff A.py B.py` diffs two dumps.\n\n"
    )
    return header + _readable(gm) + "\n"


def is_call(node: Any, *targets: Any) -> bool:
    """``node`` is a graph node calling one of ``targets`` (False for a constant or None)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    """``node`` is a graph node calling a method named one of ``names`` (False otherwise)."""
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """The placeholder called ``name``, appended after the existing ones if missing."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == name:
            return node
    return new_placeholder(gm, name)


def extra_inputs(gm: fx.GraphModule, original: int) -> list[str]:
    """Names of the placeholders the passes added after the ``original`` captured ones."""
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"][original:]


OUTPUT_GROUPS = "maskkv_output_groups"  # output node meta: what each graph output is


def append_outputs(gm: fx.GraphModule, group: str, per_layer: list[tuple[fx.Node, ...]]) -> None:
    """Append one tuple of nodes per layer to the graph's outputs, named ``group``: the
    runtime finds them by that name (``split_outputs``), never by position or count."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    names = output_groups(gm)
    flat = []
    for layer, nodes in enumerate(per_layer):
        flat += nodes
        names += [(group, layer, i, len(nodes)) for i in range(len(nodes))]
    set_outputs(gm, graph_outputs(gm) + tuple(flat))
    out.meta[OUTPUT_GROUPS] = names


def output_groups(gm: fx.GraphModule) -> list:
    """Per graph output: None for the model's own outputs, else (group, layer, field, fields)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    names = list(out.meta.get(OUTPUT_GROUPS, ()))
    return names + [None] * (len(graph_outputs(gm)) - len(names))


def split_outputs(outputs, groups: list) -> tuple[tuple, dict[str, list[tuple]]]:
    """A graph's outputs -> (the model's own outputs, group -> one tuple per layer), by the
    names ``append_outputs`` recorded (``groups`` is ``output_groups`` of the graph)."""
    base, named = [], {}
    for value, name in zip(outputs, groups):
        if name is None:
            base.append(value)
            continue
        group, layer, field, fields = name
        layers = named.setdefault(group, [])
        while len(layers) <= layer:
            layers.append([None] * fields)
        layers[layer][field] = value
    return tuple(base), {
        group: [tuple(fields) for fields in layers] for group, layers in named.items()
    }
