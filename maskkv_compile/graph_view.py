"""Pictures of what the passes changed at each attention site: a small layered drawing (SVG)
of the site's subgraph in the captured graph and in each rewritten graph, side by side, and
the HTML sections of the report that hold them (:func:`site_table_html`, :func:`sites_html`).

Used by :meth:`maskkv_compile.explain.Report.to_html` (and so by ``maskkv-compile diff --html``).
Standard library and torch.fx only: the SVG is inline markup with its colours as attributes,
so the page stays one file that works offline.

What a view holds (:func:`site_views`): for the captured graph, the nodes the canonical
``maskkv::attention`` replaced (``removed``); for a rewritten graph, the nodes at the site that
the captured graph does not have (``maskkv`` for ``maskkv::`` ops, ``added`` otherwise, ``input``
for new graph inputs). Around them, one step of context: the nodes they read and the nodes that
read them (``context``, dashed), and ``output`` when a result became a graph output. A
``getitem`` of an inserted multi-result op is folded into the edges it feeds, labelled ``[i]``.

Invariants: every node of a view's site set is drawn (none is dropped for space; wide rows
wrap), every edge joins two drawn nodes, the layout is deterministic (graph order breaks ties).
"""

from __future__ import annotations

import html
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from maskkv_compile.graph_diff import (
    GraphChange,
    NodeInfo,
    SiteDiff,
    node_info,
    node_layers,
    op_counts,
    op_name,
    plural,
)
from maskkv_compile.naming import readable_name

KINDS = ("maskkv", "added", "removed", "input", "context", "output")
# fill, stroke, dashed, rounded
STYLE = {
    "maskkv": ("#e0b0ff", "#7a1fc2", False, False),
    "added": ("#d8f5d8", "#2e7d32", False, False),
    "removed": ("#ffd9d9", "#b22222", False, False),
    "input": ("#fff1b8", "#a67c00", False, True),
    "context": ("#ffffff", "#9a9a9a", True, False),
    "output": ("#eeeeee", "#555555", False, True),
}
CHAR_W, NODE_H, ROW_H, GAP, PAD = 6.7, 20, 34, 10, 8  # px: 11 px monospace text
MAX_ROW = 380  # a row wider than this wraps (a view is meant to fit a third of a 1280 px page)
MAX_LABEL = 28


@dataclass
class ViewNode:
    id: str  # the fx node's name ("output" for the graph output)
    label: str  # op for a changed node, readable name for context and inputs
    kind: str  # one of KINDS
    op: str  # "maskkv::select_kv", "matmul", "input", ...
    title: str  # tooltip: the node as one readable line
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0


@dataclass
class GraphView:
    """One graph's drawing at one site."""

    graph: str  # "captured", "prefill", "step"
    nodes: list[ViewNode] = field(default_factory=list)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (source id, target id, label)
    width: float = 0.0
    height: float = 0.0

    @property
    def changed(self) -> list[ViewNode]:
        """The nodes the passes removed (captured view) or added (rewritten views), inputs
        included."""
        return [n for n in self.nodes if n.kind in ("maskkv", "added", "removed", "input")]


def site_views(
    captured: fx.GraphModule, graphs, names=("prefill", "step")
) -> dict[Optional[int], list[GraphView]]:
    """Layer (None: outside every layer) -> [captured view, one view per rewritten graph in
    ``names``], for every attention site of ``graphs`` (a
    :class:`~maskkv_compile.pipeline.MaskKVGraphs`) and for the outside when it changed."""
    canonical_names = {n.name for n in graphs.canonical.graph.nodes}
    captured_names = {n.name for n in captured.graph.nodes}
    captured_layers = node_layers(captured)
    per_graph = []
    for name in names:
        gm = getattr(graphs, name)
        layers = node_layers(gm)
        per_graph.append((name, gm, layers))
    views: dict[Optional[int], list[GraphView]] = {}
    for layer in [site.layer for site in graphs.sites] + [None]:
        removed = {
            n.name
            for n in captured.graph.nodes
            if n.op != "output"
            and n.name not in canonical_names
            and captured_layers.get(n.name) == layer
        }
        row = [build_view("captured", captured, removed, captured_names)]
        for name, gm, layers in per_graph:
            new = {
                n.name
                for n in gm.graph.nodes
                if n.op != "output" and n.name not in captured_names and layers.get(n.name) == layer
            }
            if layer is None:  # inputs shared by the sites are drawn at the sites, not outside
                new = {name for name in new if not _only_in_layers(gm, name, layers)}
            row.append(build_view(name, gm, new, captured_names))
        if layer is not None or any(view.changed for view in row):
            views[layer] = row
    return views


def _only_in_layers(gm: fx.GraphModule, name: str, layers: dict) -> bool:
    node = next(iter(gm.graph.find_nodes(op="placeholder", target=name)), None)
    return (
        node is not None
        and bool(node.users)
        and all(layers.get(u.name) is not None for u in node.users)
    )


def change_kind(node: fx.Node, captured: bool) -> str:
    """How the passes changed ``node``, which the caller knows to be changed: in the captured
    graph "removed"; in a rewritten graph "input" (a new placeholder), "maskkv" (a maskkv::
    op) or "added"."""
    if captured:
        return "removed"
    if node.op == "placeholder":
        return "input"
    return "maskkv" if op_name(node).startswith("maskkv::") else "added"


def build_view(graph: str, gm: fx.GraphModule, members: set[str], reference: set[str]) -> GraphView:
    """The view of ``members`` (node names of ``gm``) with one step of context, laid out.
    ``reference``: the captured graph's node names (what is not new in a rewritten graph)."""
    view = GraphView(graph)
    before = graph == "captured"
    nodes = {n.name: n for n in gm.graph.nodes}
    folded = {
        name
        for name in members
        if nodes[name].op == "call_function"
        and nodes[name].target is operator.getitem
        and isinstance(nodes[name].args[0], fx.Node)
        and nodes[name].args[0].name in members
        and isinstance(nodes[name].args[1], int)
    }
    drawn: dict[str, ViewNode] = {}
    edges: dict[tuple[str, str], list[str]] = {}

    def kind(node: fx.Node) -> str:
        if node.op == "output":
            return "output"
        if before:
            return change_kind(node, True) if node.name in members else "context"
        if node.op == "placeholder" and node.name not in reference:
            return "input"  # a new graph input, also where it is only context
        if node.name not in members:
            return "context"
        return change_kind(node, False)

    def add(node: fx.Node) -> str:
        if node.name not in drawn:
            k = kind(node)
            info = node_info(node)
            if node.op == "output":
                label, title = "output", "graph output"
            elif k in ("context", "input"):
                label, title = readable_name(node.name), info.text
            else:
                label, title = info.op.split("::")[-1], info.text
            if len(label) > MAX_LABEL:
                label = label[: MAX_LABEL - 1] + "\u2026"
            drawn[node.name] = ViewNode(
                node.name, label, k, info.op if node.op != "output" else "output", title
            )
        return node.name

    def edge(src: str, dst: str, label: str = "") -> None:
        labels = edges.setdefault((src, dst), [])
        if label and label not in labels:
            labels.append(label)

    for node in gm.graph.nodes:  # graph order: deterministic layout
        if node.name not in members or node.name in folded:
            continue
        add(node)
        for arg in node.all_input_nodes:
            if arg.name in folded:  # getitem of an inserted op: an edge from that op
                edge(add(arg.args[0]), node.name, f"[{arg.args[1]}]")
            else:
                edge(add(arg), node.name)
        for user in node.users:
            if user.name not in members:
                edge(node.name, add(user))
    for name in folded:  # where each folded getitem's value goes outside the site
        getitem = nodes[name]
        for user in getitem.users:
            if user.name not in members:
                edge(add(getitem.args[0]), add(user), f"[{getitem.args[1]}]")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    view.nodes = sorted(drawn.values(), key=lambda v: order[v.id])
    view.edges = [
        (s, d, ",".join(sorted(ls, key=_index)).replace("],[", ",")) for (s, d), ls in edges.items()
    ]
    _layout(view)
    return view


def _index(label: str) -> int:
    try:
        return int(label.strip("[]"))
    except ValueError:
        return 0


def _layout(view: GraphView) -> None:
    """Layered top-to-bottom: rank = longest path from a source; a source sits one rank above
    its first consumer; a rank is ordered by where its inputs are and wraps past MAX_ROW."""
    preds = {n.id: [] for n in view.nodes}
    succs = {n.id: [] for n in view.nodes}
    for src, dst, _ in view.edges:
        preds[dst].append(src)
        succs[src].append(dst)
    index = {n.id: i for i, n in enumerate(view.nodes)}
    rank: dict[str, int] = {}
    for n in view.nodes:  # graph order is a topological order (output last)
        rank[n.id] = 1 + max((rank[p] for p in preds[n.id]), default=-1)
    for n in reversed(view.nodes):
        if not preds[n.id] and succs[n.id]:
            rank[n.id] = max(0, min(rank[s] for s in succs[n.id]) - 1)
    for n in view.nodes:
        n.w = round(len(n.label) * CHAR_W + 12, 1)
    by_rank: dict[int, list[ViewNode]] = {}
    for n in view.nodes:
        by_rank.setdefault(rank[n.id], []).append(n)
    position: dict[str, float] = {}  # order within the rows so far, for the barycentres
    rows: list[list[ViewNode]] = []
    for r in sorted(by_rank):

        def key(n: ViewNode) -> tuple:
            near = [position[p] for p in preds[n.id] if p in position] or [
                position[s] for s in succs[n.id] if s in position
            ]
            return (sum(near) / len(near) if near else float(index[n.id]), index[n.id])

        ordered = sorted(by_rank[r], key=key)
        row: list[ViewNode] = []
        for n in ordered:
            if row and sum(m.w for m in row) + GAP * len(row) + n.w > MAX_ROW:
                rows.append(row)
                row = []
            row.append(n)
        rows.append(row)
        for i, n in enumerate(ordered):
            position[n.id] = i - (len(ordered) - 1) / 2
    widths = [sum(n.w for n in row) + GAP * (len(row) - 1) for row in rows]
    view.width = round(max(widths, default=0) + 2 * PAD, 1)
    for y, (row, w) in enumerate(zip(rows, widths)):
        x = (view.width - w) / 2
        for n in row:
            n.x, n.y = round(x, 1), PAD + y * ROW_H
            x += n.w + GAP
    view.height = PAD * 2 + (len(rows) - 1) * ROW_H + NODE_H if rows else 0


def svg(view: GraphView, uid: str) -> str:
    """``view`` as an inline ``<svg>``: nodes as boxes (``<g class="node KIND" data-op=...>``,
    the full node line as a tooltip), edges as arrows under them. ``uid`` keeps the arrow
    marker's id unique in the page."""
    nodes = {n.id: n for n in view.nodes}
    marker = f"arrow-{uid}"
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" class="graph" '
        f'data-graph="{html.escape(view.graph)}" width="{view.width:g}" height="{view.height:g}" '
        f'viewBox="0 0 {view.width:g} {view.height:g}" font-family="monospace" font-size="11">',
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>',
    ]
    for src, dst, label in view.edges:
        a, b = nodes[src], nodes[dst]
        x1, y1, x2, y2 = a.x + a.w / 2, a.y + NODE_H, b.x + b.w / 2, b.y
        if y2 <= y1:  # same row (wrapped sources never feed each other; kept for safety)
            y1, y2 = a.y + NODE_H / 2, b.y + NODE_H / 2
        bend = max(12.0, (y2 - y1) / 2)
        path = f"M{x1:g},{y1:g} C{x1:g},{y1 + bend:g} {x2:g},{y2 - bend:g} {x2:g},{y2:g}"
        out.append(
            f'<g class="edge" data-source="{html.escape(src)}" data-target="{html.escape(dst)}">'
            f'<path d="{path}" fill="none" stroke="#777" stroke-width="1" '
            f'marker-end="url(#{marker})"/>'
        )
        if label:
            out.append(
                f'<text x="{(x1 + x2) / 2 + 3:g}" y="{(y1 + y2) / 2 + 3:g}" '
                'font-size="9" fill="#444">'
                f"{html.escape(label)}</text>"
            )
        out.append("</g>")
    for n in view.nodes:
        fill, stroke, dashed, rounded = STYLE[n.kind]
        weight = ' font-weight="bold"' if n.kind == "maskkv" else ""
        dash = ' stroke-dasharray="3,2"' if dashed else ""
        out.append(
            f'<g class="node {n.kind}" data-node="{html.escape(n.id)}" '
            f'data-op="{html.escape(n.op)}">'
            f"<title>{html.escape(n.title)}</title>"
            f'<rect x="{n.x:g}" y="{n.y:g}" width="{n.w:g}" height="{NODE_H}" '
            f'rx="{10 if rounded else 3}" fill="{fill}" stroke="{stroke}"{dash}/><text '
            f'x="{n.x + n.w / 2:g}" y="{n.y + 14:g}" '
            f'text-anchor="middle"{weight}>{html.escape(n.label)}</text></g>'
        )
    out.append("</svg>")
    return "".join(out)


def _swatch(kind: str) -> str:
    fill, stroke, dashed, rounded = STYLE[kind]
    dash = ' stroke-dasharray="3,2"' if dashed else ""
    return (
        '<svg width="14" height="12"><rect x="1" y="1" width="12" height="10" '
        f'rx="{5 if rounded else 2}" fill="{fill}" stroke="{stroke}"{dash}/></svg>'
    )


LEGEND = (
    "<span class='legend'>"
    + " ".join(
        f"{_swatch(kind)} {text}"
        for kind, text in (
            ("maskkv", "maskkv:: op"),
            ("added", "inserted"),
            ("removed", "replaced"),
            ("input", "new input"),
            ("context", "unchanged"),
            ("output", "graph output"),
        )
    )
    + "</span>"
)


def caption(view: GraphView) -> str:
    changed = [n for n in view.nodes if n.kind in ("maskkv", "added", "removed")]
    if view.graph == "captured":
        return f"captured: {plural(len(changed))} replaced"
    inputs = sum(n.kind == "input" for n in view.nodes)
    return f"{view.graph}: {plural(len(changed), 'new node')}" + (
        f", {plural(inputs, 'new input')}" if inputs else ""
    )


def views_html(views: list[GraphView], uid: str) -> str:
    """One site's views side by side, each captioned."""
    figures = "".join(
        f"<figure class='view'><figcaption>{html.escape(caption(v))}</figcaption>"
        f"{svg(v, f'{uid}-{v.graph}')}</figure>"
        for v in views
    )
    return f"<div class='views'>{figures}</div>"


# -- HTML sections ------------------------------------------------------------------------------


def _node_list(items: list[NodeInfo], cls: str) -> str:
    if not items:
        return "<p class='none'>none</p>"
    rows = []
    for info in items:
        text = html.escape(info.text)
        if info.maskkv:
            text = text.replace(
                html.escape(info.op), f'<mark class="maskkv">{html.escape(info.op)}</mark>', 1
            )
        rows.append(f"<li class='{cls}{' op' if info.maskkv else ''}'><code>{text}</code></li>")
    return "<ul class='nodes'>" + "".join(rows) + "</ul>"


def _change_cell(change: GraphChange) -> str:
    parts = []
    if change.inputs:
        parts.append(
            "<p><b>inputs added:</b> "
            + ", ".join(f"<code>{html.escape(n)}</code>" for n in change.inputs)
            + "</p>"
        )
    if change.outputs:
        parts.append(
            "<p><b>outputs added:</b> "
            + ", ".join(f"<code>{html.escape(n)}</code>" for n in change.outputs)
            + "</p>"
        )
    if change.removed:
        parts.append(
            "<details><summary>removed: "
            + html.escape(op_counts(change.removed))
            + "</summary>"
            + _node_list(change.removed, "del")
            + "</details>"
        )
    plain = [i for i in change.inserted if not i.maskkv]
    parts.append(f"<p><b>inserted:</b> {plural(len(change.inserted))}</p>")
    parts.append(
        _node_list(change.inserted, "add")
        if len(plain) <= 12
        else _node_list([i for i in change.inserted if i.maskkv], "add")
        + f"<details><summary>all {len(change.inserted)} inserted nodes</summary>"
        + _node_list(change.inserted, "add")
        + "</details>"
    )
    return "".join(parts)


def site_table_html(site_diffs: list[SiteDiff]) -> str:
    graphs = list(site_diffs[0].graphs) if site_diffs else []
    head = "".join(f"<th>{html.escape(g)}: maskkv:: ops inserted</th>" for g in graphs)
    rows = []
    for site in site_diffs:
        if site.layer is None:
            continue
        cells = "".join(
            "<td>"
            + (
                ", ".join(
                    f'<mark class="maskkv">{html.escape(op)}</mark>'
                    for op in site.graphs[g].maskkv_ops
                )
                or "-"
            )
            + (
                f"<br><small>outputs +{len(site.graphs[g].outputs)}</small>"
                if site.graphs[g].outputs
                else ""
            )
            + "</td>"
            for g in graphs
        )
        rows.append(
            f"<tr><td><a href='#site-{site.layer}'>{site.layer}</a></td>"
            f"<td><code>{html.escape(site.module_path)}</code></td>"
            f"<td>{html.escape(site.attention)}</td><td>{plural(len(site.matched))} &rarr; "
            f"{html.escape(op_counts(site.canonical) or '-')}</td>{cells}</tr>"
        )
    return (
        "<table class='sites'><tr><th>layer</th><th>module</th><th>attention</th><th>matched</th>"
        f"{head}</tr>" + "".join(rows) + "</table>"
    )


def sites_html(site_diffs: list[SiteDiff], views: Optional[dict] = None) -> str:
    """One section per site: its pictures (``views``, from :func:`site_views`:
    captured | each rewritten graph), matched -> canonical, then the rewritten graphs' node
    lists side by side."""
    views = views or {}
    out = []
    for site in site_diffs:
        changed = any(
            g.inserted or g.removed or g.inputs or g.outputs for g in site.graphs.values()
        )
        if site.layer is None and not (site.matched or site.canonical or changed):
            continue
        anchor = f"site-{site.layer}" if site.layer is not None else "site-outside"
        graphs = list(site.graphs)
        cols = "".join(f"<td>{_change_cell(site.graphs[g])}</td>" for g in graphs)
        heads = "".join(f"<th>{html.escape(g)} graph</th>" for g in graphs)
        matched = (
            f"<details><summary>matched in the captured graph: {plural(len(site.matched))} "
            f"({html.escape(op_counts(site.matched) or '-')})</summary>"
            f"{_node_list(site.matched, 'del')}</details>"
            f"<p><b>replaced by (canonical):</b></p>{_node_list(site.canonical, 'add')}"
            if site.matched or site.canonical
            else ""
        )
        picture = views_html(views[site.layer], anchor) if site.layer in views else ""
        out.append(
            "<section class='site' "
            f"id='{anchor}'><h3>{html.escape(site.title)}</h3>{picture}{matched}<table "
            f"class='side'><tr>{heads}</tr><tr>{cols}</tr></table></section>"
        )
    return "\n".join(out)


__all__ = [
    "GraphView",
    "KINDS",
    "LEGEND",
    "STYLE",
    "ViewNode",
    "build_view",
    "caption",
    "change_kind",
    "site_table_html",
    "site_views",
    "sites_html",
    "svg",
    "views_html",
]
