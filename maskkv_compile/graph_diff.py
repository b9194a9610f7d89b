"""Readable graphs and a structural diff of what the MaskKV passes did, per attention site.

Used by :class:`maskkv_compile.explain.Report` (``report.diff``, ``report.structural``,
``report.to_html``), by the passes' graph dumps and messages, and by ``maskkv-compile diff``.
No dependencies beyond the standard library and torch.fx. The pictures of each site are in
:mod:`maskkv_compile.graph_view`, the Model Explorer export in :mod:`maskkv_compile.model_explorer`.

- :func:`readable_code` renames dynamo's flattened placeholders
  (``L_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_``)
  to module paths (``model.layers.0.self_attn.q_proj.weight``) and wraps long lines. The result
  is for reading, not for ``exec`` (dotted names are not identifiers).
- :func:`folded_diff` is a unified-style diff whose unchanged stretches are folded to
  ``... N unchanged lines ...`` and whose lines are wrapped to a width.
- :func:`structural_diff` groups the graphs' nodes by attention site (layer): the captured
  nodes the canonical ``maskkv::attention`` replaced, the nodes each rewritten graph inserted
  (``maskkv::`` ops marked), the graph inputs and outputs it added, the nodes it removed.
"""

from __future__ import annotations

import difflib
import html
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch.fx as fx

WIDTH = 100  # text form: no line wider than this
_FLAT = re.compile(r"\b[Ll]_(?:self|args_\d+|kwargs)_\w*?_\b|\b[Ll]_\w+_(?:parameters|buffers)_\w+?_\b")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


# -- names ---------------------------------------------------------------------------------------


def readable_name(name: str) -> str:
    """Dynamo's flattened placeholder name -> module path; other names unchanged.

    ``L_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_``
    (and its lower-case ``l_...`` twin in the body) -> ``model.layers.0.self_attn.q_proj.weight``;
    ``L_kwargs_input_ids_`` -> ``input_ids``; ``L_self_modules_model_...`` likewise."""
    m = re.fullmatch(r"[Ll]_(?:self_|args_\d+_|kwargs_)?(\w+?)_", name)
    if not m:
        return name
    body = m.group(1)
    if not re.search(r"(?:^|_)(?:modules|parameters|buffers)_", body):
        return body if re.match(r"[Ll]_kwargs_", name) else name
    body = re.sub(r"^(?:modules|parameters|buffers)_", "", body)
    return re.sub(r"_(?:modules|parameters|buffers)_", ".", body)


def readable_code(code: str, width: Optional[int] = WIDTH) -> str:
    """``code`` with flattened names as module paths and, with ``width``, lines wrapped.
    Dynamo's ``l_x_ = L_x_`` rebindings, which read ``x = x`` once renamed, are dropped;
    source comments name files below ``site-packages`` (``transformers/models/...``)."""
    renamed = _SITE_PACKAGES.sub(r"\1", _FLAT.sub(lambda m: readable_name(m.group(0)), code))
    lines = [line for line in renamed.splitlines() if not _SELF_ASSIGN.fullmatch(line)]
    if width is None:
        return "\n".join(lines)
    return "\n".join(part for line in lines for part in wrap(line, width))


_SELF_ASSIGN = re.compile(r"\s*([\w.]+) = \1")
_SITE_PACKAGES = re.compile(r"(# File: )\S*?[/\\](?:site|dist)-packages[/\\]")  # print_readable's source paths


def wrap(line: str, width: int = WIDTH) -> list[str]:
    """Break ``line`` after commas (else spaces), outside string literals where it can, so
    that no piece is wider than ``width``; continuation lines are indented 4 past the line's
    own indent (a comment's continue as comments). A single token wider than the width is cut."""
    if len(line) <= width:
        return [line]
    lead = len(line) - len(line.lstrip())
    comment = line.lstrip().startswith("#")
    indent = " " * lead + ("#   " if comment else "    ")
    pieces, rest = [], line
    while len(rest) > width:
        cut = _cut(rest, len(indent) + 1, width, comment)
        pieces.append(rest[:cut].rstrip())
        rest = indent + rest[cut:].lstrip()
    pieces.append(rest)
    return pieces


def _cut(text: str, lo: int, width: int, comment: bool) -> int:
    """Where to break ``text``: after the last ", " (else " ") in ``[lo, width)`` outside a
    string literal, else after any space there, else at ``width``."""
    quoted, quote = [], None
    for ch in text[:width]:
        quoted.append(quote is not None)
        if not comment and ch in "'\"":
            quote = None if quote == ch else (ch if quote is None else quote)
    for sep in (", ", " "):
        i = text.rfind(sep, lo, width - len(sep) + 1)
        while i > 0 and quoted[i]:
            i = text.rfind(sep, lo, i)
        if i > 0:
            return i + len(sep)
    i = text.rfind(" ", lo, width)
    return i + 1 if i > 0 else width


# -- line diff -----------------------------------------------------------------------------------


def folded_diff(before: str, after: str, fromfile: str, tofile: str, context: int = 3, width: int = WIDTH) -> str:
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
                out += [f"  {line}" for line in lines[len(lines) - tail:]] if tail else []
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
    matched: list[NodeInfo] = field(default_factory=list)  # captured nodes the canonical graph replaced
    canonical: list[NodeInfo] = field(default_factory=list)  # what replaced them (maskkv::attention)
    graphs: dict[str, GraphChange] = field(default_factory=dict)  # "prefill"/"step" -> change

    @property
    def title(self) -> str:
        if self.layer is None:
            return "outside the layers"
        return f"layer {self.layer}: {self.module_path} ({self.attention})"


def _op(node: fx.Node) -> str:
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


def _info(node: fx.Node, width: int = 400) -> NodeInfo:
    op = _op(node)
    name = readable_name(node.name)
    if node.op == "placeholder":
        text = f"{name}: input"
    else:
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        text = f"{name} = {op}({', '.join(args)})"
    if len(text) > width:
        text = text[: width - 3] + "..."
    return NodeInfo(node.name, op, text)


def stack_path(node: fx.Node) -> Optional[str]:
    """The innermost module dynamo recorded for ``node``, as its source path without the model
    argument (``L['self'].model.layers[0].self_attn`` -> ``model.layers[0].self_attn``); None
    when the node has no module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    return re.sub(r"^L\['\w+'\](\[\d+\])?\.?", "", str(list(stack.values())[-1][0]))


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
    if node.op == "call_function" and _op(node) == "getitem" and isinstance(node.args[0], fx.Node):
        source = _op(node.args[0])
        return f"{name} ({source.split('::')[-1]}[{node.args[1]}])"
    return name


def structural_diff(captured: Optional[fx.GraphModule], graphs, names: Iterable[str] = ("prefill", "step")) -> list[SiteDiff]:
    """Per attention site of ``graphs`` (a :class:`~maskkv_compile.pipeline.MaskKVGraphs`):
    captured -> canonical (what was matched and what replaced it), then canonical -> each of
    ``names``. The last entry (layer None) holds what changed outside every layer."""
    sites = {site.layer: SiteDiff(site.layer, site.module_path, site.spelling) for site in graphs.sites}
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
                at(captured_layers.get(node.name)).matched.append(_info(node))
        canonical_layers = node_layers(canonical)
        for node in canonical.graph.nodes:
            if node.name not in captured_names and node.op != "output":
                at(canonical_layers.get(node.name)).canonical.append(_info(node))
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
                change.inserted.append(_info(node))
        canonical_node_layers = node_layers(canonical)
        for node in canonical.graph.nodes:
            if node.name not in present and node.op != "output":
                at(canonical_node_layers.get(node.name)).graphs[graph].removed.append(_info(node))
        for node in _output_nodes(gm):
            if node.name not in canonical_outputs:
                at(layers.get(node.name)).graphs[graph].outputs.append(_output_label(node))
    return [*(sites[k] for k in sorted(sites)), outside]


def _count(n: int, what: str = "node") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _names(items: list[NodeInfo]) -> str:
    from collections import Counter

    return ", ".join(f"{op} x{n}" if n > 1 else op for op, n in Counter(i.op for i in items).items())


def structural_text(site_diffs: list[SiteDiff], width: int = WIDTH) -> str:
    """The terminal form: one block per site, maskkv:: ops marked with ``*``, every line
    wrapped to ``width``."""
    lines: list[str] = []

    def emit(text: str, indent: str = ""):
        lines.extend(wrap(indent + text, width))

    for site in site_diffs:
        changes = [g for g in site.graphs.values() if g.inserted or g.removed or g.inputs or g.outputs]
        if site.layer is None and not site.matched and not site.canonical and not changes:
            continue
        emit(f"== {site.title} ==")
        if site.matched or site.canonical:
            emit(f"matched (captured, {_count(len(site.matched))}): {_names(site.matched) or '-'}", "  ")
            emit(f"replaced by (canonical): {_names(site.canonical) or '-'}", "  ")
            for info in site.canonical:
                emit(("* " if info.maskkv else "  ") + info.text, "    ")
        for graph, change in site.graphs.items():
            if not (change.inserted or change.removed or change.inputs or change.outputs):
                emit(f"{graph}: unchanged", "  ")
                continue
            emit(f"{graph}: {_count(len(change.inserted))} inserted ({', '.join(change.maskkv_ops) or 'no maskkv:: op'})", "  ")
            if change.inputs:
                emit(f"inputs added: {', '.join(change.inputs)}", "    ")
            if change.outputs:
                emit(f"outputs added: {', '.join(change.outputs)}", "    ")
            if change.removed:
                emit(f"removed: {_names(change.removed)}", "    ")
            for info in change.inserted:
                emit(("* " if info.maskkv else "+ ") + info.text, "    ")
        lines.append("")
    lines.append("(* marks an inserted maskkv:: op)")
    return "\n".join(lines) + "\n"


# -- HTML ----------------------------------------------------------------------------------------


def _node_list(items: list[NodeInfo], cls: str) -> str:
    if not items:
        return "<p class='none'>none</p>"
    rows = []
    for info in items:
        text = html.escape(info.text)
        if info.maskkv:
            text = text.replace(html.escape(info.op), f'<mark class="maskkv">{html.escape(info.op)}</mark>', 1)
        rows.append(f"<li class='{cls}{' op' if info.maskkv else ''}'><code>{text}</code></li>")
    return "<ul class='nodes'>" + "".join(rows) + "</ul>"


def _change_cell(change: GraphChange) -> str:
    parts = []
    if change.inputs:
        parts.append("<p><b>inputs added:</b> " + ", ".join(f"<code>{html.escape(n)}</code>" for n in change.inputs) + "</p>")
    if change.outputs:
        parts.append("<p><b>outputs added:</b> " + ", ".join(f"<code>{html.escape(n)}</code>" for n in change.outputs) + "</p>")
    if change.removed:
        parts.append("<details><summary>removed: " + html.escape(_names(change.removed)) + "</summary>"
                     + _node_list(change.removed, "del") + "</details>")
    plain = [i for i in change.inserted if not i.maskkv]
    parts.append(f"<p><b>inserted:</b> {_count(len(change.inserted))}</p>")
    parts.append(_node_list(change.inserted, "add") if len(plain) <= 12 else
                 _node_list([i for i in change.inserted if i.maskkv], "add")
                 + f"<details><summary>all {len(change.inserted)} inserted nodes</summary>"
                 + _node_list(change.inserted, "add") + "</details>")
    return "".join(parts)


def site_table_html(site_diffs: list[SiteDiff]) -> str:
    graphs = list(site_diffs[0].graphs) if site_diffs else []
    head = "".join(f"<th>{html.escape(g)}: maskkv:: ops inserted</th>" for g in graphs)
    rows = []
    for site in site_diffs:
        if site.layer is None:
            continue
        cells = "".join(
            "<td>" + (", ".join(f'<mark class="maskkv">{html.escape(op)}</mark>' for op in site.graphs[g].maskkv_ops) or "-")
            + (f"<br><small>outputs +{len(site.graphs[g].outputs)}</small>" if site.graphs[g].outputs else "")
            + "</td>"
            for g in graphs
        )
        rows.append(
            f"<tr><td><a href='#site-{site.layer}'>{site.layer}</a></td><td><code>{html.escape(site.module_path)}</code></td>"
            f"<td>{html.escape(site.attention)}</td><td>{_count(len(site.matched))} &rarr; "
            f"{html.escape(_names(site.canonical) or '-')}</td>{cells}</tr>"
        )
    return (f"<table class='sites'><tr><th>layer</th><th>module</th><th>attention</th><th>matched</th>{head}</tr>"
            + "".join(rows) + "</table>")


def sites_html(site_diffs: list[SiteDiff], views: Optional[dict] = None) -> str:
    """One section per site: its pictures (``views``, from :func:`maskkv_compile.graph_view.site_views`:
    captured | each rewritten graph), matched -> canonical, then the rewritten graphs' node
    lists side by side."""
    from maskkv_compile.graph_view import views_html

    views = views or {}
    out = []
    for site in site_diffs:
        changed = any(g.inserted or g.removed or g.inputs or g.outputs for g in site.graphs.values())
        if site.layer is None and not (site.matched or site.canonical or changed):
            continue
        anchor = f"site-{site.layer}" if site.layer is not None else "site-outside"
        graphs = list(site.graphs)
        cols = "".join(f"<td>{_change_cell(site.graphs[g])}</td>" for g in graphs)
        heads = "".join(f"<th>{html.escape(g)} graph</th>" for g in graphs)
        matched = (
            f"<details><summary>matched in the captured graph: {_count(len(site.matched))} "
            f"({html.escape(_names(site.matched) or '-')})</summary>{_node_list(site.matched, 'del')}</details>"
            f"<p><b>replaced by (canonical):</b></p>{_node_list(site.canonical, 'add')}"
            if site.matched or site.canonical else ""
        )
        picture = views_html(views[site.layer], anchor) if site.layer in views else ""
        out.append(
            f"<section class='site' id='{anchor}'><h3>{html.escape(site.title)}</h3>{picture}{matched}"
            f"<table class='side'><tr>{heads}</tr><tr>{cols}</tr></table></section>"
        )
    return "\n".join(out)


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
    "GraphChange", "NodeInfo", "SiteDiff", "folded_diff", "node_layers", "readable_code", "readable_name",
    "site_table_html", "sites_html", "structural_diff", "structural_text", "wrap",
]


if __name__ == "__main__":
    raise SystemExit(main())
