"""Export the captured and rewritten graphs to Google's Model Explorer (``ai-edge-model-explorer``).

    maskkv-compile diff --model tiny-qwen2 --model-explorer maskkv.json
    pip install ai-edge-model-explorer && model-explorer maskkv.json

Writes Model Explorer's JSON graph format, which its built-in JSON loader reads: a graph
collection ``{"label", "graphs": [graph, ...]}``, each graph ``{"id", "nodes": [...]}``, each
node ``{"id", "label", "namespace", "attrs": [{"key", "value"}], "incomingEdges":
[{"sourceNodeId", "sourceNodeOutputId", "targetNodeInputId"}], "outputsMetadata", "style"}``
(the fields of ``model_explorer.graph_builder``). Nothing here imports the package: the JSON
is built from the standard library, and Model Explorer is an optional extra
(``pip install maskkv-compile[explorer]``).

The collection holds four graphs: captured, canonical, prefill, step. A node keeps its fx name
as its id in every graph, so Model Explorer's split view with sync navigation "Match node id"
lines the graphs up and its "Highlight deleted and new nodes" shows what the passes did.
Namespaces are module paths (``model/layers/0/self_attn``), so the viewer folds the graph by
module; the nodes a pass inserted have no module stack and go to their attention site's module.
Inserted ``maskkv::`` ops, other inserted nodes and the nodes the canonical pass replaced are
coloured as in the HTML report.
"""

from __future__ import annotations

import json
import re
from typing import Optional

import torch
import torch.fx as fx

from maskkv_compile._torch_private import example_value
from maskkv_compile.graph_diff import node_info, node_layers, op_name
from maskkv_compile.graph_view import STYLE, change_kind
from maskkv_compile.naming import readable_name, stack_path

GRAPH_IDS = ("captured", "canonical", "prefill", "step")
_COLOURS = {
    kind: STYLE[kind][:2] for kind in ("maskkv", "added", "removed", "input")
}  # (fill, stroke) as in the HTML
_STATUS = {
    "maskkv": "inserted maskkv:: op",
    "added": "inserted",
    "removed": "replaced by maskkv::attention",
    "input": "graph input added by the passes",
}


def _module_path(node: fx.Node) -> Optional[str]:
    """``L['args'][0].model.layers[0].self_attn`` -> ``model.layers.0.self_attn``."""
    path = stack_path(node)
    if path is None:
        return None
    path = re.sub(r"\[['\"]?(\w+)['\"]?\]", r".\1", path)  # [0] / ['0'] -> .0
    return path.strip(".")


def _namespace(path: str) -> str:
    return "/".join(part for part in path.split(".") if part)


def _shape(node: fx.Node) -> Optional[str]:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(str(d) for d in value.shape)}]"
    return None


def graph_json(
    gm: fx.GraphModule, graph_id: str, kinds: dict[str, str], site_paths: dict[int, str]
) -> dict:
    """One fx graph as a Model Explorer graph. ``kinds``: node name -> "maskkv", "added",
    "removed" or "input" for the nodes to colour; ``site_paths``: layer -> module path, the
    namespace of a node that has no module stack (what a pass inserted)."""
    layers = node_layers(gm)
    nodes = []
    for node in gm.graph.nodes:
        info = node_info(node)
        if node.op == "placeholder":
            name = readable_name(node.name)
            owner, _, leaf = name.rpartition(".")
            namespace, label = (_namespace(owner), leaf) if owner else ("inputs", name)
        elif node.op == "output":
            namespace, label = "outputs", "output"
        else:
            path = _module_path(node)
            if path is None:
                path = site_paths.get(layers.get(node.name), "")
            namespace, label = _namespace(path), info.op
        attrs = [
            {"key": "node", "value": readable_name(node.name)},
            {"key": "code", "value": info.text},
        ]
        kind = kinds.get(node.name)
        if kind:
            attrs.append({"key": "maskkv", "value": _STATUS[kind]})
        entry = {
            "id": node.name,
            "label": label,
            "namespace": namespace,
            "attrs": attrs,
            "incomingEdges": [
                {"sourceNodeId": arg.name, "sourceNodeOutputId": "0", "targetNodeInputId": str(i)}
                for i, arg in enumerate(node.all_input_nodes)
            ],
        }
        shape = _shape(node)
        if shape:
            entry["outputsMetadata"] = [
                {"id": "0", "attrs": [{"key": "tensor_shape", "value": shape}]}
            ]
        if kind:
            fill, border = _COLOURS[kind]
            entry["style"] = {
                "backgroundColor": fill,
                "borderColor": border,
                "hoveredBorderColor": border,
            }
        nodes.append(entry)
    return {"id": graph_id, "nodes": nodes}


def collection(captured: fx.GraphModule, graphs, label: str) -> dict:
    """The captured, canonical, prefill and step graphs of ``graphs`` (a
    :class:`~maskkv_compile.pipeline.MaskKVGraphs`) as one Model Explorer graph collection."""
    site_paths = {site.layer: site.module_path for site in graphs.sites}
    canonical_names = {n.name for n in graphs.canonical.graph.nodes}
    captured_names = {n.name for n in captured.graph.nodes}
    out = []
    for graph_id in GRAPH_IDS:
        gm = captured if graph_id == "captured" else getattr(graphs, graph_id)
        kinds: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            gone = graph_id == "captured" and node.name not in canonical_names
            if gone or (graph_id != "captured" and node.name not in captured_names):
                kinds[node.name] = change_kind(node, graph_id == "captured")
        graph = graph_json(gm, graph_id, kinds, site_paths)
        summary = {"graph": graph_id, "nodes": str(len(graph["nodes"]))}
        ops = sorted({op_name(n) for n in gm.graph.nodes if kinds.get(n.name) == "maskkv"})
        if ops:
            summary["maskkv:: ops"] = ", ".join(ops)
        graph["groupNodeAttributes"] = {"": summary}
        for site in graphs.sites:
            graph["groupNodeAttributes"][_namespace(site.module_path)] = {
                "attention": site.spelling,
                "heads": str(site.heads),
                "kv heads": str(site.kv_heads),
            }
        out.append(graph)
    return {"label": label, "graphs": out}


def write(path, captured: fx.GraphModule, graphs, label: str) -> str:
    """Write :func:`collection` as JSON to ``path``; returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(collection(captured, graphs, label), f, indent=1)
        f.write("\n")
    return str(path)


__all__ = ["GRAPH_IDS", "collection", "graph_json", "write"]
