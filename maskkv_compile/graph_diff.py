"""A structural diff of what the MaskKV passes did, per attention site, and a folded line diff.

Used by :class:`maskkv_compile.explain.Report` (``report.diff``, ``report.structural``,
``report.to_html``) and by ``maskkv-compile diff``; a tool, never imported by the core.
Node names come from :mod:`maskkv_compile.naming`; the pictures of each site (and every HTML
section) are in :mod:`maskkv_compile.graph_view`, the Model Explorer export
in :mod:`maskkv_compile.model_explorer`.

- :func:`folded_diff` is a unified-style diff whose unchanged stretches are folded to
  ``... N unchanged lines ...`` and whose lines are wrapped to a width.
- :func:`structural_diff` groups the graphs' nodes by attention site (layer): the captured
  nodes the canonical ``maskkv::attention`` replaced, the nodes each rewritten graph inserted
  (``maskkv::`` ops marked), the graph inputs and outputs it added, the nodes it removed.
- :func:`node_info`, :func:`op_name`, :func:`op_counts`, :func:`node_layers` and :func:`plural`
  describe nodes for the views (:mod:`~maskkv_compile.graph_view`,
  :mod:`~maskkv_compile.model_explorer`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch.fx as fx

from maskkv_compile.naming import WIDTH, readable_code, readable_name, stack_path, wrap

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


# -- line diff -----------------------------------------------------------------------------------


def folded_diff(
    before: str, after: str, fromfile: str, tofile: str, context: int = 3, width: int = WIDTH
) -> str:
    """Diff of two codes (made readable first): ``--- fromfile``/``+++ tofile`` headers,
    `` ``/``-``/``+`` lines, unchanged stretches beyond ``context`` lines folded to
    ``  ... N unchanged lines ...``. Every line fits in ``width``."""
    a = readable_code(before, width - 2).splitlines()
    b = readable_code(after, width - 2).splitlines()
    out = [f"--- {fromfile}", f"+++ {tofile}"]
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    for k, (tag, i1, i2, j1, j2) in enumerate(ops):
        if tag == "equal":
            lines = a[i1:i2]
            head = context if k > 0 else 0
            tail = context if k < len(ops) - 1 else 0
            if len(lines) > head + tail + 1:
                out += [f"  {line}" for line in lines[:head]]
                out.append(f"  ... {len(lines) - head - tail} unchanged lines ...")
                out += [f"  {line}" for line in lines[len(lines) - tail :]] if tail else []
            else:
                out += [f"  {line}" for line in lines]
            continue
        out += [f"- {line}" for line in a[i1:i2]]
        out += [f"+ {line}" for line in b[j1:j2]]
    return "\n".join(out) + "\n"


# -- structural diff -----------------------------------------------------------------------------


@dataclass
class NodeInfo:
    name: str
    op: str  # "maskkv::select_kv", "aten.index_select", "getitem", "input", ...
    text: str  # one readable line: name = op(args)

    @property
    def maskkv(self) -> bool:
        return self.op.startswith("maskkv::")


@dataclass
class GraphChange:
    """What one rewritten graph changed at one site, against the canonical graph."""

    inserted: list[NodeInfo] = field(default_factory=list)
    removed: list[NodeInfo] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # placeholders added
    outputs: list[str] = field(default_factory=list)  # graph outputs added

    @property
    def maskkv_ops(self) -> list[str]:
        return [n.op for n in self.inserted if n.maskkv]


@dataclass
class SiteDiff:
    """One attention site (``layer`` None: the graph outside every layer)."""

    layer: Optional[int]
    module_path: str
    attention: str  # spelling, e.g. "eager+gqa"
    matched: list[NodeInfo] = field(
        default_factory=list
    )  # captured nodes the canonical graph replaced
    canonical: list[NodeInfo] = field(
        default_factory=list
    )  # what replaced them (maskkv::attention)
    graphs: dict[str, GraphChange] = field(default_factory=dict)  # "prefill"/"step" -> change

    @property
    def title(self) -> str:
        if self.layer is None:
            return "outside the layers"
        return f"layer {self.layer}: {self.module_path} ({self.attention})"


def op_name(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "get_attr"
    target = node.target
    text = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    qual = str(target)
    if qual.startswith("maskkv."):
        return "maskkv::" + qual.split(".")[1]
    if qual.startswith("aten."):
        return "aten." + qual.split(".")[1]
    return text


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return readable_name(a.name)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    return repr(a)


def node_info(node: fx.Node, width: int = 400) -> NodeInfo:
    op = op_name(node)
    name = readable_name(node.name)
    if node.op == "placeholder":
        text = f"{name}: input"
    else:
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        text = f"{name} = {op}({', '.join(args)})"
    if len(text) > width:
        text = text[: width - 3] + "..."
    return NodeInfo(node.name, op, text)


def _stack_layer(node: fx.Node) -> Optional[str]:
    path = stack_path(node)
    if path is None:
        return None
    m = _LAYER.search(path)
    return m.group(1) if m else ""


def node_layers(gm: fx.GraphModule) -> dict[str, Optional[int]]:
    """Node name -> layer index (None outside the layers). A node without a module stack
    (what a pass inserted) belongs to the layer of the nearest node before it that has one;
    a placeholder to the layer all its users are in."""
    layers: dict[str, Optional[int]] = {}
    current: Optional[int] = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        found = _stack_layer(node)
        if found is not None:
            current = int(found) if found else None
        layers[node.name] = current
    for node in gm.graph.find_nodes(op="placeholder"):
        user_layers = {layers.get(u.name) for u in node.users}
        layers[node.name] = user_layers.pop() if len(user_layers) == 1 else None
    return layers


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = gm.graph.output_node().args[0]
    flat = out if isinstance(out, (list, tuple)) else [out]
    return [a for a in flat if isinstance(a, fx.Node)]


def _outputs(gm: fx.GraphModule) -> list[str]:
    return [node.name for node in _output_nodes(gm)]


def _output_label(node: fx.Node) -> str:
    """``getitem_13`` -> ``getitem_13 (select_kv[0])``: which op's result became an output."""
    name = readable_name(node.name)
    if (
        node.op == "call_function"
        and op_name(node) == "getitem"
        and isinstance(node.args[0], fx.Node)
    ):
        source = op_name(node.args[0])
        return f"{name} ({source.split('::')[-1]}[{node.args[1]}])"
    return name


def structural_diff(
    captured: Optional[fx.GraphModule], graphs, names: Iterable[str] = ("prefill", "step")
) -> list[SiteDiff]:
    """Per attention site of ``graphs`` (a :class:`~maskkv_compile.pipeline.MaskKVGraphs`):
    captured -> canonical (what was matched and what replaced it), then canonical -> each of
    ``names``. The last entry (layer None) holds what changed outside every layer."""
    sites = {
        site.layer: SiteDiff(site.layer, site.module_path, site.spelling) for site in graphs.sites
    }
    outside = SiteDiff(None, "", "")

    def at(layer):
        return sites.get(layer, outside)

    canonical = graphs.canonical
    canonical_names = {n.name for n in canonical.graph.nodes}
    if captured is not None:
        captured_names = {n.name for n in captured.graph.nodes}
        captured_layers = node_layers(captured)
        for node in captured.graph.nodes:
            if node.name not in canonical_names and node.op != "output":
                at(captured_layers.get(node.name)).matched.append(node_info(node))
        canonical_layers = node_layers(canonical)
        for node in canonical.graph.nodes:
            if node.name not in captured_names and node.op != "output":
                at(canonical_layers.get(node.name)).canonical.append(node_info(node))
    canonical_outputs = set(_outputs(canonical))
    for graph in names:
        gm = getattr(graphs, graph)
        layers = node_layers(gm)
        present = {n.name for n in gm.graph.nodes}
        for site in [*sites.values(), outside]:
            site.graphs[graph] = GraphChange()
        for node in gm.graph.nodes:
            if node.name in canonical_names or node.op == "output":
                continue
            change = at(layers.get(node.name)).graphs[graph]
            if node.op == "placeholder":
                change.inputs.append(node.name)
            else:
                change.inserted.append(node_info(node))
        canonical_node_layers = node_layers(canonical)
        for node in canonical.graph.nodes:
            if node.name not in present and node.op != "output":
                at(canonical_node_layers.get(node.name)).graphs[graph].removed.append(
                    node_info(node)
                )
        for node in _output_nodes(gm):
            if node.name not in canonical_outputs:
                at(layers.get(node.name)).graphs[graph].outputs.append(_output_label(node))
    return [*(sites[k] for k in sorted(sites)), outside]


def plural(n: int, what: str = "node") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def op_counts(items: list[NodeInfo]) -> str:
    from collections import Counter

    return ", ".join(
        f"{op} x{n}" if n > 1 else op for op, n in Counter(i.op for i in items).items()
    )


def structural_text(site_diffs: list[SiteDiff], width: int = WIDTH) -> str:
    """The terminal form: one block per site, maskkv:: ops marked with ``*``, every line
    wrapped to ``width``."""
    lines: list[str] = []

    def emit(text: str, indent: str = ""):
        lines.extend(wrap(indent + text, width))

    for site in site_diffs:
        changes = [
            g for g in site.graphs.values() if g.inserted or g.removed or g.inputs or g.outputs
        ]
        if site.layer is None and not site.matched and not site.canonical and not changes:
            continue
        emit(f"== {site.title} ==")
        if site.matched or site.canonical:
            emit(
                f"matched (captured, {plural(len(site.matched))}): "
                f"{op_counts(site.matched) or '-'}",
                "  ",
            )
            emit(f"replaced by (canonical): {op_counts(site.canonical) or '-'}", "  ")
            for info in site.canonical:
                emit(("* " if info.maskkv else "  ") + info.text, "    ")
        for graph, change in site.graphs.items():
            if not (change.inserted or change.removed or change.inputs or change.outputs):
                emit(f"{graph}: unchanged", "  ")
                continue
            emit(
                f"{graph}: {plural(len(change.inserted))} inserted "
                f"({', '.join(change.maskkv_ops) or 'no maskkv:: op'})",
                "  ",
            )
            if change.inputs:
                emit(f"inputs added: {', '.join(change.inputs)}", "    ")
            if change.outputs:
                emit(f"outputs added: {', '.join(change.outputs)}", "    ")
            if change.removed:
                emit(f"removed: {op_counts(change.removed)}", "    ")
            for info in change.inserted:
                emit(("* " if info.maskkv else "+ ") + info.text, "    ")
        lines.append("")
    lines.append("(* marks an inserted maskkv:: op)")
    return "\n".join(lines) + "\n"


# -- HTML ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m maskkv_compile.graph_diff FILE [FILE2]``: a MASKKV_DEBUG_DIR dump (or any
    graph code) with module-path names and wrapped lines; with two files, their folded diff."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("--width", type=int, default=WIDTH)
    args = parser.parse_args(argv)
    texts = []
    for path in args.files[:2]:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    if len(texts) == 1:
        print(readable_code(texts[0], args.width))
    else:
        import os

        names = [os.path.basename(path) for path in args.files[:2]]
        print(folded_diff(texts[0], texts[1], *names, width=args.width), end="")
    return 0


__all__ = [
    "GraphChange",
    "NodeInfo",
    "SiteDiff",
    "folded_diff",
    "node_info",
    "node_layers",
    "op_counts",
    "op_name",
    "plural",
    "structural_diff",
    "structural_text",
]


if __name__ == "__main__":
    raise SystemExit(main())
