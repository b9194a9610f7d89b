"""graph_diff: readable names, wrapped/folded diffs, the per-site structural diff and the HTML
page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build, prompt_and_masks

import maskkv_compile
from maskkv_compile.graph_diff import folded_diff
from maskkv_compile.graph_diff import main as graph_diff_main
from maskkv_compile.naming import WIDTH, readable_code, readable_name, wrap

FLAT = re.compile(r"_(?:modules|parameters|buffers)_")
# what each rewritten graph inserts at every attention site
SITE_OPS = {
    "prefill": {
        "maskkv::mask_votes",
        "maskkv::selection_scores",
        "maskkv::head_budgets",
        "maskkv::select_kv",
    },
    "step": {"maskkv::cached_attention"},
}


@pytest.fixture(
    scope="module",
    params=[("llada", "sdpa"), ("dream", "eager")],
    ids=["llada-sdpa", "dream-eager"],
)
def report(request):
    family, attn = request.param
    model = build(family, attn)
    _, x = prompt_and_masks(model, 16, 8)
    return maskkv_compile.explain(model, x, budget=8)


def test_readable_name():
    flat = (
        "L_args_0_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj"
        "_parameters_weight_"
    )
    assert readable_name(flat) == "model.layers.0.self_attn.q_proj.weight"
    assert readable_name(flat.replace("L_", "l_", 1)) == "model.layers.0.self_attn.q_proj.weight"
    assert (
        readable_name("L_self_modules_model_modules_rotary_emb_buffers_inv_freq_")
        == "model.rotary_emb.inv_freq"
    )
    assert readable_name("L_kwargs_input_ids_") == "input_ids"
    for name in ("q_embed", "getitem_13", "key_valid", "attention_default_1"):
        assert readable_name(name) == name


def test_wrap_and_fold():
    line = "    def forward(self, " + ", ".join(f"argument_number_{i}" for i in range(40)) + "):"
    pieces = wrap(line, 60)
    assert (
        all(len(p) <= 60 for p in pieces)
        and "".join(p.strip() for p in pieces).replace(",", ", ").count("argument_number_") == 40
    )
    assert all(p.startswith("        ") for p in pieces[1:])
    assert wrap("x" * 80, 50) == ["x" * 50, "    " + "x" * 30]
    typed = (
        '        out: "f32[1, 4, s27, 16][64*s27, 16, 64, 1]cpu" = '
        "torch.ops.maskkv.attention.default(q, k, v, 0.25)"
    )
    pieces = wrap(typed, 60)
    assert all(len(p) <= 60 and p.count('"') % 2 == 0 for p in pieces), (
        pieces
    )  # not broken inside the string
    comment = (
        "        # File: transformers/models/qwen2/modeling_qwen2.py:350 in forward, "
        "code: x = self.embed(ids)"
    )
    assert all(p.startswith("        #") and len(p) <= 60 for p in wrap(comment, 60))
    rebinding = (
        "        l_kwargs_input_ids_ = L_kwargs_input_ids_\n        y = f(l_kwargs_input_ids_)"
    )
    assert (
        readable_code(rebinding) == "        y = f(input_ids)"
    )  # dynamo's rebinding, "x = x" once renamed, dropped
    before = "\n".join(f"line {i}" for i in range(50))
    after = before.replace("line 25", "line twenty-five")
    diff = folded_diff(before, after, "a", "b", context=2)
    assert diff.startswith("--- a\n+++ b\n")
    assert "  ... 23 unchanged lines ...\n" in diff and "  ... 22 unchanged lines ...\n" in diff
    assert "- line 25\n+ line twenty-five\n" in diff


def test_text_forms_have_module_paths_and_bounded_lines(report):
    for graph in ("prefill", "step"):
        for text in (
            report.diff(graph),
            report.structural(graph),
            report.code(graph),
            report.code("captured"),
        ):
            assert not FLAT.search(text), [line for line in text.splitlines() if FLAT.search(line)][
                :3
            ]
            assert max(len(line) for line in text.splitlines()) <= WIDTH
        diff = report.diff(graph)
        assert "model.layers.0.self_attn.q_proj.weight" in report.code(graph)
        assert FLAT.search(
            report.code(graph, readable=False)
        )  # the GraphModule's own code, on request
        assert "model.norm.weight" in diff  # the signature's last unchanged lines, as context
        assert re.search(r"^  \.\.\. \d+ unchanged lines \.\.\.$", diff, re.M)
    assert max(len(line) for line in report.diff("prefill", width=60).splitlines()) <= 60


def test_structural_diff_lists_every_site_and_every_inserted_op(report):
    sites = report.site_diffs()
    assert [s.layer for s in sites] == [s.layer for s in report.sites] + [None]
    for site, found in zip(sites, report.sites):
        assert site.module_path == found.module_path and site.attention == found.spelling
        assert [n.op for n in site.canonical if n.maskkv] == ["maskkv::attention"]
        assert site.matched, "the captured nodes maskkv::attention replaced"
        for graph, ops in SITE_OPS.items():
            assert set(site.graphs[graph].maskkv_ops) == ops, (site.layer, graph)
        assert site.graphs["prefill"].outputs, "kept K/V and votes become prefill outputs"
        assert [n.op for n in site.graphs["step"].removed] == ["maskkv::attention"]
        assert {name.rsplit("_", 1)[0] for name in site.graphs["step"].inputs} >= {
            "kept_k",
            "kept_v",
        }
    # every maskkv:: op the passes report inserting into prefill/step is attributed to a site
    for graph in SITE_OPS:
        reported = sorted(op for g, _, op in report.inserted if g == graph)
        assert sorted(op for s in sites for op in s.graphs[graph].maskkv_ops) == reported
    outside = sites[-1]
    assert "resp_idx" in outside.graphs["step"].inputs  # the step graph slices to the response
    text = report.structural()
    for site in report.sites:
        assert f"== layer {site.layer}: {site.module_path} ({site.spelling}) ==" in text
    assert text.count("* cached_attention_default") == len(report.sites)


def test_html_is_self_contained_with_the_site_table_first(report, tmp_path):
    page = tmp_path / "r.html"
    report.to_html(page)
    text = page.read_text()
    assert not re.search(r"(?:src|href)\s*=\s*['\"]?(?:https?:)?//", text) and "<script" not in text
    assert "@import" not in text and not re.search(
        r"url\((?!#)", text
    )  # only in-page references (SVG arrow markers)
    assert not FLAT.search(text)
    # the site table, then each site's section, before the summary and the line diffs
    table, first_site = text.index("<table class='sites'>"), text.index("id='site-0'")
    assert (
        table < first_site < text.index("<pre class='summary'>") < text.index('<table class="diff"')
    )
    for site in report.sites:
        section = text[text.index(f"id='site-{site.layer}'") :]
        section = section[: section.index("</section>")]
        for op in set().union(*SITE_OPS.values()):
            assert f'<mark class="maskkv">{op}</mark>' in section
    assert text.count("<section class='site'") >= len(report.sites)


def test_site_diffs_checks_the_graph_name():
    report = maskkv_compile.explain(
        build("llada", "sdpa"), prompt_and_masks(build("llada", "sdpa"), 16, 8)[1], budget=8
    )
    with pytest.raises(ValueError, match="graph must be one of"):
        report.site_diffs(("nope",))


def test_debug_dumps_read_by_module_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKKV_DEBUG_DIR", str(tmp_path))
    model = build("llada", "sdpa")
    maskkv_compile.explain(model, prompt_and_masks(model, 16, 8)[1], budget=8)
    before = tmp_path / "maskkv.prefill.2.EvictKVPass.before.py"
    after = tmp_path / "maskkv.prefill.2.EvictKVPass.after.py"
    dump = before.read_text()
    assert (
        "model.layers.0.self_attn.q_proj.weight" in dump
        and "L_args_0_modules" not in dump
        and not FLAT.search(dump)
    )
    assert max(len(line) for line in dump.splitlines()) <= WIDTH
    # python -m maskkv_compile.graph_diff FILE [FILE2], in this process
    capsys.readouterr()
    assert graph_diff_main([str(before)]) == 0
    one = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in one and not FLAT.search(one)
    assert graph_diff_main([str(before), str(after)]) == 0
    two = capsys.readouterr().out
    assert "torch.ops.maskkv.select_kv" in two and "unchanged lines ..." in two
    assert max(len(line) for line in (one + two).splitlines()) <= WIDTH


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="no chromium (apt-get install chromium)"
)
def test_screenshot_script(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "scripts/screenshot_report.py",
            "--model",
            "tiny-llama",
            "--out",
            str(tmp_path),
            "--width",
            "1280",
            "--height",
            "600",
        ],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (tmp_path / "explain_report_tiny-llama.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the graph view (SVG per site) and the Model Explorer export ---------------------------------


def svg_nodes(section: str, graph: str) -> list:
    """The <g class="node ..."> elements of one view's <svg>, parsed as XML (the SVG is well
    formed)."""
    import xml.etree.ElementTree as ET

    start = section.index(f'data-graph="{graph}"')
    start = section.rindex("<svg", 0, start)
    root = ET.fromstring(section[start : section.index("</svg>", start) + len("</svg>")])
    ns = "{http://www.w3.org/2000/svg}"
    nodes = [g for g in root.iter(f"{ns}g") if "node" in g.get("class", "").split()]
    edges = [g for g in root.iter(f"{ns}g") if g.get("class") == "edge"]
    ids = {g.get("data-node") for g in nodes}
    for edge in edges:  # every edge joins two drawn nodes
        assert edge.get("data-source") in ids and edge.get("data-target") in ids
    return nodes


def test_every_site_has_a_view_with_every_inserted_op_drawn(report, tmp_path):
    page = tmp_path / "r.html"
    report.to_html(page)
    text = page.read_text()
    sites = report.site_diffs()
    for site in report.sites:
        section = text[text.index(f"id='site-{site.layer}'") :]
        section = section[: section.index("</section>")]
        assert section.count("<svg") == 3 and section.index("<svg") < section.index(
            "matched in the captured graph"
        )
        removed = [g for g in svg_nodes(section, "captured") if "removed" in g.get("class")]
        diff = next(s for s in sites if s.layer == site.layer)
        assert len(removed) == len(diff.matched)  # every node the canonical pass replaced
        for graph, ops in SITE_OPS.items():
            drawn = [
                g.get("data-op")
                for g in svg_nodes(section, graph)
                if "maskkv" in g.get("class").split()
            ]
            assert sorted(op for op in drawn if op != "maskkv::attention") == sorted(
                diff.graphs[graph].maskkv_ops
            )
            assert set(drawn) >= ops
        assert "maskkv::attention" in [g.get("data-op") for g in svg_nodes(section, "prefill")]
        step_inputs = {
            g.get("data-node")
            for g in svg_nodes(section, "step")
            if "input" in g.get("class").split()
        }
        assert {f"kept_k_{site.layer}", f"kept_v_{site.layer}"} <= step_inputs
        outputs = [g for g in svg_nodes(section, "prefill") if "output" in g.get("class").split()]
        assert len(outputs) == 1  # the kept K/V and votes became graph outputs
    assert "L_args_0_modules" not in text


def test_views_fit_a_third_of_the_page(report):
    from maskkv_compile.graph_view import MAX_ROW, PAD, site_views

    views = site_views(report.captured, report.graphs)
    assert set(views) >= {site.layer for site in report.sites}
    for row in views.values():
        for view in row:
            assert view.width <= MAX_ROW + 2 * PAD
            boxes = sorted((n.y, n.x, n.x + n.w) for n in view.nodes)
            for (y1, _, right), (y2, left, _) in zip(boxes, boxes[1:]):
                assert y1 != y2 or right <= left, "overlapping boxes"


def test_model_explorer_export_structure(report, tmp_path):
    import json

    path = tmp_path / "me.json"
    assert report.to_model_explorer(path) == str(path)
    data = json.loads(path.read_text())
    # the shape Model Explorer's JSON loader takes: a graph collection
    # {label, graphs: [{id, nodes}]}
    assert data["label"].startswith("MaskKV: ") and [g["id"] for g in data["graphs"]] == [
        "captured",
        "canonical",
        "prefill",
        "step",
    ]
    node_keys = {
        "id",
        "label",
        "namespace",
        "attrs",
        "incomingEdges",
        "outputsMetadata",
        "style",
    }  # graph_builder.GraphNode fields
    by_graph = {}
    for graph in data["graphs"]:
        assert set(graph) <= {"id", "nodes", "groupNodeAttributes"}
        ids = [n["id"] for n in graph["nodes"]]
        assert len(ids) == len(set(ids))
        for node in graph["nodes"]:
            assert set(node) <= node_keys and {"id", "label", "namespace", "incomingEdges"} <= set(
                node
            )
            assert all(
                set(e) == {"sourceNodeId", "sourceNodeOutputId", "targetNodeInputId"}
                and e["sourceNodeId"] in ids
                for e in node["incomingEdges"]
            )
            assert all(
                set(a) == {"key", "value"} and isinstance(a["value"], str) for a in node["attrs"]
            )
            assert not FLAT.search(node["label"] + node["namespace"])
        by_graph[graph["id"]] = {n["id"]: n for n in graph["nodes"]}
    # the same fx name is the same id in every graph (Model Explorer's "Match node id" sync)
    shared = set(by_graph["captured"]) & set(by_graph["step"])
    assert "input_ids" in {by_graph["step"][i]["label"] for i in shared}
    for graph, ops in SITE_OPS.items():
        inserted = [
            n
            for n in by_graph[graph].values()
            if n["label"].startswith("maskkv::") and "style" in n
        ]
        expected = sorted(op for g, _, op in report.inserted if g == graph)
        assert sorted(n["label"] for n in inserted if n["label"] != "maskkv::attention") == expected
        for site in report.sites:  # inserted ops are grouped under their attention module
            namespace = site.module_path.replace(".", "/")
            assert {n["label"] for n in inserted if n["namespace"] == namespace} >= ops
    q_proj = next(
        n
        for n in by_graph["prefill"].values()
        if n["namespace"] == "model/layers/0/self_attn/q_proj" and n["label"] == "weight"
    )
    assert {"key": "node", "value": "model.layers.0.self_attn.q_proj.weight"} in q_proj["attrs"]
    replaced = [n for n in by_graph["captured"].values() if "style" in n]
    assert len(replaced) == sum(len(s.matched) for s in report.site_diffs())
