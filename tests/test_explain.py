"""explain(): sites, passes, diffs, HTML, debug dumps, graphs that follow the config, the `diff` CLI
and example."""

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import MODEL_KINDS, build, prompt_and_masks
from maskkv_compile.passes import (
    UnsupportedModelError,
)
from torch import nn

import maskkv_compile
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.explain import GRAPHS, Report
from maskkv_compile.naming import WIDTH

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN, GEN_LEN, BUDGET = 16, 8, 8
# what every graph's pass list is, in order (pipeline.build_graphs)
PASSES = {
    "canonical": ["FindAttentionPass"],
    "prefill": [
        "MaskPaddingPass",
        "CaptureVotesPass",
        "EvictKVPass",
        "MaskOnlyHeadPass",
        "PruneTailRowsPass",
    ],
    "step": ["SliceSequencePass", "CachedAttentionPass"],
}
BARE_ATTENTION = {"sdpa": "scaled_dot_product_attention", "eager": "softmax"}


def explain(family="llada", attn="sdpa", budget=BUDGET, prompt_len=PROMPT_LEN, **options) -> Report:
    model = build(family, attn)
    _, x = prompt_and_masks(model, prompt_len, GEN_LEN)
    return maskkv_compile.explain(model, x, budget=budget, **options)


def added(diff: str) -> str:
    return "\n".join(
        line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")
    )


def removed(diff: str) -> str:
    return "\n".join(
        line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")
    )


@pytest.mark.parametrize("family,attn", MODEL_KINDS)
def test_sites_passes_plan_and_diffs(family, attn):
    report = explain(family, attn)
    config = build(family, attn).config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    gqa = "+gqa" if kv_heads != heads else ""

    # one site per layer, with the right head counts and spelling
    assert [(s.layer, s.module_path, s.heads, s.kv_heads, s.spelling) for s in report.sites] == [
        (layer, f"model.layers.{layer}.self_attn", heads, kv_heads, attn + gqa)
        for layer in range(config.num_hidden_layers)
    ]
    assert report.skipped == () and report.rewritten

    # every pass run, in order, with what it did
    assert {g: [r.name for r in report.passes if r.graph == g] for g in PASSES} == PASSES
    for run in report.passes:
        assert run.changed and run.matches >= 1 and run.ms > 0
    inserted = {(graph, op) for graph, _, op in report.inserted}
    assert {
        ("canonical", "maskkv::attention"),
        ("prefill", "maskkv::mask_votes"),
        ("prefill", "maskkv::select_kv"),
        ("step", "maskkv::cached_attention"),
    } <= inserted
    votes = next(r for r in report.passes if r.name == "CaptureVotesPass")
    assert votes.inserted == ("maskkv::mask_votes",) * config.num_hidden_layers

    # kept-KV plan: KV heads x budget per layer (budget below the prompt length here)
    assert report.prompt_len == PROMPT_LEN
    assert [(p.layer, p.kv_heads, p.budget, p.entries) for p in report.plan] == [
        (layer, kv_heads, BUDGET, kv_heads * BUDGET) for layer in range(config.num_hidden_layers)
    ]
    head_dim = config.hidden_size // heads
    assert (
        report.kept_bytes == config.num_hidden_layers * kv_heads * BUDGET * 2 * head_dim * 4
    )  # K+V, float32

    # before: the bare attention; after: maskkv:: ops instead
    bare = BARE_ATTENTION[attn]
    assert bare in report.captured_code
    prefill, step = report.diff("prefill"), report.diff("step")
    assert prefill.startswith("--- captured\n+++ prefill\n") and step.startswith(
        "--- captured\n+++ step\n"
    )
    assert "torch.ops.maskkv.mask_votes" in added(
        prefill
    ) and "torch.ops.maskkv.select_kv" in added(prefill)
    assert "torch.ops.maskkv.cached_attention" in added(step)
    for graph, diff in (("prefill", prefill), ("step", step)):
        assert bare in removed(diff) and bare not in added(diff)
        assert bare not in report.code(graph)

    # the summary
    text = str(report)
    assert type(build(family, attn)).__name__ in text
    for needle in (
        "model.layers.1.self_attn",
        "CachedAttentionPass",
        "maskkv::mask_votes x2",
        f"{kv_heads} x {BUDGET} = {kv_heads * BUDGET}",
        attn + gqa,
    ):
        assert needle in text


def test_budget_is_clamped_to_the_prompt_length():
    report = explain("dream", "sdpa", budget=256, prompt_len=12)
    assert report.prompt_len == 12
    assert [(p.budget, p.entries) for p in report.plan] == [(12, 2 * 12)] * 2
    assert "2 x 12 = 24" in str(report)


def test_explain_leaves_model_and_input_alone_and_optimize_still_works():
    model = build("llada", "sdpa")
    model.train()
    model.model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    _, x = prompt_and_masks(model, PROMPT_LEN, GEN_LEN)
    report = maskkv_compile.explain(model, x, budget=BUDGET)
    assert len(report.sites) == 2
    assert calls == []  # captured, not run
    assert [m.training for m in model.modules()] == modes
    assert not hasattr(x, "_dynamo_dynamic_indices")
    for _ in range(2):  # again, then the real thing: no stale cache entry in the way
        maskkv_compile.explain(model, x, budget=BUDGET)
    optimized = maskkv_compile.optimize(model, budget=BUDGET, backend="eager")
    assert optimized(x).logits.shape == (1, PROMPT_LEN + GEN_LEN, 256)


def test_explain_errors():
    model = build("llada", "sdpa")
    prompt, x = prompt_and_masks(model, PROMPT_LEN, GEN_LEN)
    with pytest.raises(maskkv_compile.MaskKVConfigError, match="bugdet"):
        maskkv_compile.explain(model, x, bugdet=3)
    with pytest.raises(maskkv_compile.NoMaskTokenError, match="no mask token"):
        maskkv_compile.explain(model, prompt)


# -- counter-examples: a model whose attention probabilities are also an output ------------------


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(d // self.heads)), dim=-1)
        return self.out((probs @ v).transpose(1, 2).reshape(b, s, d)), probs


class LeakyProbs(nn.Module):
    """Bidirectional eager attention; the layers in ``leak`` return their probabilities too."""

    def __init__(self, layers=2, leak=(1,), dim=32, vocab=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, 4) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)
        self.leak = leak

    def forward(self, input_ids, **kwargs):
        x = self.embed(input_ids)
        leaked = []
        for i, layer in enumerate(self.layers):
            out, probs = layer(x)
            x = x + out
            if i in self.leak:
                leaked.append(probs)
        return (self.head(x), *leaked)


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.head = nn.Linear(16, 32)

    def forward(self, input_ids):
        return self.head(torch.relu(self.embed(input_ids)))


MASK = 31


def leaky_input():
    x = torch.randint(0, MASK, (1, 12), generator=torch.Generator().manual_seed(0))
    x[:, 8:] = MASK
    return x


def test_site_whose_probabilities_are_also_returned_is_skipped_with_the_reason():
    torch.manual_seed(0)
    report = maskkv_compile.explain(
        LeakyProbs().eval(), leaky_input(), budget=4, mask_token_id=MASK
    )
    assert [(s.layer, s.module_path, s.spelling) for s in report.sites] == [
        (0, "layers.0", "eager")
    ]
    assert len(report.skipped) == 1
    reason = report.skipped[0]
    assert (
        reason.startswith("layers.1 (")
        and "attention probabilities" in reason
        and "also used by" in reason
    )
    find = next(r for r in report.passes if r.name == "FindAttentionPass")
    assert find.matches == 1 and find.skipped == report.skipped
    text = str(report)
    assert "1 rewritten, 1 skipped" in text and "also used by" in text
    # the rewritten graph still holds the refused layer's softmax, the other one is gone
    assert (
        report.code("prefill").count("torch.softmax") == 1
        and report.captured_code.count("torch.softmax") == 2
    )


def test_strict_pipeline_refuses_what_explain_reports():
    torch.manual_seed(0)
    optimized = maskkv_compile.optimize(
        LeakyProbs().eval(), budget=4, mask_token_id=MASK, backend="eager"
    )
    with pytest.raises(UnsupportedModelError, match="also used by"):
        optimized(leaky_input())


def test_every_site_refused_gives_a_report_without_rewritten_graphs():
    torch.manual_seed(0)
    report = maskkv_compile.explain(
        LeakyProbs(layers=1, leak=(0,)).eval(), leaky_input(), budget=4, mask_token_id=MASK
    )
    assert not report.rewritten and report.sites == [] and report.plan == []
    assert len(report.skipped) == 1 and "also used by" in report.skipped[0]
    assert "nothing was rewritten" in str(report)
    with pytest.raises(ValueError, match="also used by"):
        report.diff("prefill")


def test_model_without_attention_raises():
    with pytest.raises(UnsupportedModelError, match="no attention found"):
        maskkv_compile.explain(NoAttention().eval(), leaky_input(), mask_token_id=MASK)


# -- HTML, dumps, logs ---------------------------------------------------------------------------


def test_to_html_highlights_the_inserted_ops(tmp_path):
    report = explain("dream", "eager")
    path = tmp_path / "explain.html"
    assert report.to_html(path) == str(path)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('<table class="diff"') == 2
    for op in ("mask_votes", "select_kv", "cached_attention"):
        assert f'<mark class="maskkv">torch.ops.maskkv.{op}.default</mark>' in page
    assert '<tr class="maskkv-row">' in page
    assert "model.layers.0.self_attn" in page  # the summary


def expected_dump_names():
    # step_kv: the step graph with the response K/V out, which block diffusion's extend runs;
    # revote: the step graph that re-selects (re-votes, and a block window's growth)
    graphs = {**PASSES, "step_kv": ["ResponseKVOutputsPass"], "revote": ["RevoteKVPass"]}
    return {
        f"maskkv.{graph}.{i}.{name}.{when}.py"
        for graph, names in graphs.items()
        for i, name in enumerate(names)
        for when in ("before", "after")
    }


def without_comments(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))


FLAT = re.compile(
    r"\b[Ll]_(?:args|self|kwargs)_|_(?:modules|parameters|buffers)_"
)  # dynamo's flattened names


def assert_readable(text: str):
    """Module-path names, no line wider than graph_diff.WIDTH."""
    assert not FLAT.search(text), [line for line in text.splitlines() if FLAT.search(line)][:3]
    assert "model.layers.0.self_attn.q_proj.weight" in text
    assert max(len(line) for line in text.splitlines()) <= WIDTH


def test_debug_dir_dumps_every_graph_before_and_after_every_pass_readably(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKKV_DEBUG_DIR", str(tmp_path / "dumps"))
    explain("llada", "sdpa")
    files = {p.name: p.read_text() for p in (tmp_path / "dumps").iterdir()}
    assert set(files) == expected_dump_names()
    for name, source in files.items():
        assert source.startswith(f"# {name[:-3]}: written by maskkv_compile")
        assert "class GraphModule(torch.nn.Module):" in source and "def forward(self" in source
        assert_readable(source)
        assert (
            " = model.layers.0.self_attn.q_proj.weight\n" not in source
        )  # dynamo's rebinding lines dropped
    code = {
        name: without_comments(source) for name, source in files.items()
    }  # comments quote the model source
    assert "scaled_dot_product_attention" in code["maskkv.canonical.0.FindAttentionPass.before.py"]
    assert (
        "scaled_dot_product_attention" not in code["maskkv.canonical.0.FindAttentionPass.after.py"]
    )
    assert "torch.ops.maskkv.mask_votes" not in code["maskkv.prefill.1.CaptureVotesPass.before.py"]
    assert "torch.ops.maskkv.mask_votes" in code["maskkv.prefill.1.CaptureVotesPass.after.py"]
    assert "torch.ops.maskkv.cached_attention" in code["maskkv.step.1.CachedAttentionPass.after.py"]
    # a pass's "before" is the previous pass's "after"
    assert (
        files["maskkv.prefill.2.EvictKVPass.before.py"].split("\n", 1)[1]
        == files["maskkv.prefill.1.CaptureVotesPass.after.py"].split("\n", 1)[1]
    )


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_graphs_go_to_the_graph_logger_and_to_structured_trace(tmp_path, monkeypatch):
    from torch._logging import _internal

    graph_log = logging.getLogger("maskkv_compile.graph")
    trace_log = logging.getLogger("torch.__trace")  # what TORCH_TRACE / tlparse read
    graph_handler, trace_handler = Collect(), Collect()
    tlparse = _internal.LazyTraceHandler(str(tmp_path))  # what TORCH_TRACE=<dir> installs
    monkeypatch.setattr(_internal, "LOG_TRACE_HANDLER", tlparse)
    level = graph_log.level
    graph_log.setLevel(logging.DEBUG)
    graph_log.addHandler(graph_handler)
    trace_log.addHandler(tlparse)
    trace_log.addHandler(trace_handler)
    try:
        explain("llada", "eager")
    finally:
        graph_log.removeHandler(graph_handler)
        graph_log.setLevel(level)
        trace_log.removeHandler(trace_handler)
        trace_log.removeHandler(tlparse)
        tlparse.close()
    names = {stem[:-3] for stem in expected_dump_names()}
    logged = [record.getMessage() for record in graph_handler.records]
    assert len(logged) == len(names)
    for message in logged:  # lazy_format_graph_code's format, which depyf and TORCH_LOGS show
        assert (
            message.startswith("TRACED GRAPH\n ===== maskkv.")
            and "class GraphModule(torch.nn.Module)" in message
        )
        assert_readable(message)
    assert any(
        "===== maskkv.prefill.1.CaptureVotesPass.after =====" in m
        and "torch.ops.maskkv.mask_votes" in m
        for m in logged
    )
    artifacts = {
        r.metadata["artifact"]["name"]: r.payload
        for r in trace_handler.records
        if "artifact" in getattr(r, "metadata", {})
        and r.metadata["artifact"]["name"].startswith("maskkv.")
    }
    assert set(artifacts) == names
    assert (
        "torch.ops.maskkv.cached_attention" in artifacts["maskkv.step.1.CachedAttentionPass.after"]
    )
    for payload in artifacts.values():
        assert_readable(payload)


def test_without_a_trace_no_graph_is_formatted(monkeypatch):
    """A handler on the trace logger that is not torch's trace (pytest's log capture adds some)
    formats nothing: the readable dumps cost more than the passes that made the graphs."""
    from maskkv_compile.passes import base

    trace_log = logging.getLogger("torch.__trace")
    stray = Collect()
    trace_log.addHandler(stray)

    def refuse(gm):
        raise AssertionError("a graph was formatted with no trace to read it")

    monkeypatch.setattr(base, "_readable", refuse)
    try:
        explain("llada", "eager")
    finally:
        trace_log.removeHandler(stray)
    assert not any(
        "artifact" in getattr(r, "metadata", {}) and "maskkv." in str(r.metadata)
        for r in stray.records
    )


# -- graphs follow the config ---------------------------------------------------------------------
# (The passes once carried vLLM-style uuid() hashes for a compile cache key that nothing read.
# What they stood for is a property of the graphs: the options are constants of the rewritten
# graphs, so a graph built for one config is never the graph of another.)


def second_option() -> dict:
    """policy where MaskKVConfig has it (a policy other than the default), else prompt_refresh."""
    if "policy" in MaskKVConfig.option_names():
        from maskkv_compile.policies import POLICIES

        return {"policy": next(name for name in POLICIES if name != MaskKVConfig().policy)}
    return {"prompt_refresh": 4}


def test_rewritten_graphs_are_deterministic_and_follow_the_config():
    first, again = explain("dream", "sdpa"), explain("dream", "sdpa")
    assert [r.name for r in first.passes] == [r.name for r in again.passes]
    for graph in GRAPHS:
        assert first.code(graph, readable=False) == again.code(graph, readable=False), graph
    for changed in ({"budget": BUDGET + 1}, second_option()):
        other = explain("dream", "sdpa", **changed)
        assert other.config != first.config
        assert other.code("prefill", readable=False) != first.code("prefill", readable=False), (
            changed
        )


# -- CLI and example ------------------------------------------------------------------------------


def test_cli_diff(tmp_path, cli):
    html = tmp_path / "diff.html"
    out = cli(
        "diff",
        "--model",
        "tiny-qwen2",
        "--attn",
        "eager",
        "--budget",
        "8",
        "--prompt-len",
        "16",
        "--gen-length",
        "8",
        "--html",
        str(html),
        "--model-explorer",
        str(tmp_path / "me.json"),
    )
    assert "MaskKV explain: Qwen2ForCausalLM" in out and "eager+gqa" in out and "2 x 8 = 16" in out
    assert (
        "=== prefill graph: captured -> rewritten ===" in out
        and "=== step graph: captured -> rewritten ===" in out
    )
    assert "+++ prefill" in out and "+++ step" in out
    assert "=== per attention site: what was matched and inserted ===" in out
    assert (
        "== layer 1: model.layers.1.self_attn (eager+gqa) ==" in out
        and "unchanged lines ..." in out
    )
    assert "_modules_" not in out and "_parameters_" not in out
    assert "torch.ops.maskkv.mask_votes" in out and "torch.ops.maskkv.cached_attention" in out
    page = html.read_text()
    assert (
        '<mark class="maskkv">' in page and page.count("<svg xmlns") == 3 * 2 + 3
    )  # 3 views per layer, + outside
    graphs = json.loads((tmp_path / "me.json").read_text())["graphs"]
    assert [g["id"] for g in graphs] == ["captured", "canonical", "prefill", "step"]
    assert f"Model Explorer graphs written to {tmp_path / 'me.json'}" in out


def test_cli_diff_help(capsys):
    from maskkv_compile.cli import main as cli_main

    for argv in (["diff", "--help"], ["--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        if argv[0] == "diff":
            options = (
                "--model",
                "tiny-llama",
                "tiny-qwen2",
                "--budget",
                "--html",
                "--attn",
                "--model-explorer",
            )
            for option in options:
                assert option in out
    assert "diff" in out


def test_explain_diff_example(tmp_path, script):
    html = tmp_path / "example.html"
    out = script(
        "examples/explain_diff.py",
        "--html",
        str(html),
        "--model-explorer",
        str(tmp_path / "me.json"),
    )
    assert "attention sites: 2 rewritten, 0 skipped" in out and "eager+gqa" in out
    assert "inserted ops: maskkv::attention, maskkv::cached_attention" in out
    assert "+++ step" in out and "torch.ops.maskkv.cached_attention" in out
    assert (
        html.exists()
        and json.loads((tmp_path / "me.json").read_text())["label"] == "MaskKV: Qwen2ForCausalLM"
    )
