"""``explain(model, input_ids, **options)``: what the MaskKV passes do to a model, without running
it.

    report = maskkv_compile.explain(model, input_ids, budget=64)
    print(report)                  # attention sites, pass runs, inserted ops, kept-KV plan
    print(report.diff("step"))     # line diff, captured -> rewritten step graph (module-path
                                   # names, folded)
    print(report.structural())     # per attention site: matched, inserted (maskkv:: ops),
                                   # inputs/outputs added
    report.to_html("maskkv.html")  # site table, each site's before/after drawn (SVG), node lists,
                                   # line diffs
    report.to_model_explorer("maskkv.json")  # the four graphs for Google's Model Explorer

The model is captured with dynamo exactly as ``optimize`` captures it (sequence length
symbolic, ``use_cache=False``, eval mode) by a backend that records the graph and stops the
compile: the model is not run, no dynamo cache entry is left behind, the caller's
``input_ids`` are not marked. The passes then run with ``strict=False``, so a site they
refuse is reported (``Report.skipped``) instead of raised. A model without any attention
still raises :class:`UnsupportedModelError`; a model whose every attention site is refused
gets a report with the reasons and no rewritten graphs.

The passes' own view, for any compile (``optimize``, ``backend="maskkv"`` or ``explain``):
``MASKKV_DEBUG_DIR=dir`` writes every graph before and after every pass as
``maskkv.<graph>.<i>.<Pass>.{before,after}.py`` (module-path names, wrapped: for reading);
``TORCH_LOGS="+maskkv_compile"`` logs the
same graphs (``maskkv_compile.graph`` logger, the format depyf reads) and one line per pass;
``TORCH_TRACE=dir`` records them as artifacts that ``tlparse`` shows.
"""

from __future__ import annotations

import difflib
import html
import inspect
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from maskkv_compile import _torch_private
from maskkv_compile._torch_private import example_value
from maskkv_compile.api import RECOMPILE_LIMIT  # explain's capture counts as a recompile too
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError
from maskkv_compile.graph_diff import SiteDiff, folded_diff, structural_diff, structural_text
from maskkv_compile.graph_view import LEGEND, site_table_html, site_views, sites_html
from maskkv_compile.naming import WIDTH, readable_code
from maskkv_compile.passes import (
    AttentionSite,
    FindAttentionPass,
    PassManager,
    UnsupportedModelError,
)
from maskkv_compile.pipeline import MaskKVGraphs, build_graphs, copy_graph_module

GRAPHS = ("canonical", "prefill", "step")
_OP_IN_CODE = re.compile(r"torch\.ops\.maskkv\.\w+(?:\.\w+)?")


@dataclass(frozen=True)
class PassRun:
    """One pass applied to one graph."""

    graph: str  # "canonical", "prefill" or "step"
    index: int  # position in that graph's pass list
    name: str
    matches: int
    changed: bool
    ms: float
    inserted: tuple[str, ...]  # maskkv:: ops the pass added, e.g. ("maskkv::mask_votes", ...)
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class KeptKV:
    """The prompt K/V one layer keeps: ``kv_heads`` x ``budget`` entries (the budget is the
    policy's average per KV head, clamped to the prompt length)."""

    layer: int
    module_path: str
    kv_heads: int
    budget: float
    entries: int  # kv_heads x budget, over the whole layer
    bytes: int  # K and V of those entries, every row of the batch


@dataclass
class Report:
    """What :func:`explain` found. ``str(report)`` is a short summary."""

    model: str
    config: MaskKVConfig
    mask_token_id: int
    input_shape: tuple[int, ...]
    prompt_len: int
    sites: list[AttentionSite]
    passes: list[PassRun]
    skipped: tuple[str, ...]
    plan: list[KeptKV]
    captured_code: str
    codes: dict[str, str] = field(default_factory=dict)  # graph name -> rewritten code
    graphs: Optional[MaskKVGraphs] = None  # None when every attention site was refused
    captured: Optional[fx.GraphModule] = None  # the graph dynamo captured, before any pass

    # -- queries ---------------------------------------------------------------------------
    @property
    def rewritten(self) -> bool:
        return self.graphs is not None

    @property
    def inserted(self) -> list[tuple[str, str, str]]:
        """Every maskkv:: op inserted, as (graph, pass, op), in pass order."""
        return [(run.graph, run.name, op) for run in self.passes for op in run.inserted]

    @property
    def kept_entries(self) -> int:
        return sum(layer.entries for layer in self.plan)

    @property
    def kept_bytes(self) -> int:
        return sum(layer.bytes for layer in self.plan)

    def code(self, graph: str, readable: bool = True) -> str:
        """The code of ``graph``: "captured" (dynamo's, before any pass), or the rewritten
        "canonical", "prefill" or "step". ``readable``: parameters and buffers by module path,
        lines wrapped to :data:`~maskkv_compile.naming.WIDTH` (for reading); else the
        GraphModule's own code (dynamo's flattened names, runnable)."""
        if graph == "captured":
            code = self.captured_code
        elif graph not in GRAPHS:
            raise ValueError(f"graph must be 'captured' or one of {GRAPHS}, got {graph!r}")
        elif graph not in self.codes:
            raise ValueError(
                f"no {graph} graph: every attention site was refused, so nothing "
                "was rewritten. Why:\n  " + "\n  ".join(self.skipped)
            )
        else:
            code = self.codes[graph]
        return readable_code(code) if readable else code

    def diff(self, graph: str = "prefill", context: int = 3, width: int = WIDTH) -> str:
        """Diff of the captured graph's code -> the rewritten ``graph``'s code: parameters and
        buffers by module path, lines wrapped to ``width``, unchanged stretches folded to
        ``... N unchanged lines ...`` beyond ``context`` lines."""
        return folded_diff(
            self.captured_code,
            self.code(graph, readable=False),
            "captured",
            graph,
            context=context,
            width=width,
        )

    def site_diffs(self, graphs: tuple[str, ...] = ("prefill", "step")) -> list[SiteDiff]:
        """The structural diff: per attention site, the captured nodes matched, the canonical
        ``maskkv::attention`` that replaced them, and per rewritten graph the nodes inserted,
        removed, and the inputs/outputs added (last entry: outside every layer)."""
        if not self.rewritten:
            return []
        for graph in graphs:
            if graph not in GRAPHS:
                raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        return structural_diff(self.captured, self.graphs, graphs)

    def structural(self, graph: Optional[str] = None, width: int = WIDTH) -> str:
        """The structural diff as text (``graph`` None: prefill and step), every line at most
        ``width`` wide, inserted ``maskkv::`` ops marked ``*``."""
        graphs = ("prefill", "step") if graph is None else (graph,)
        if not self.rewritten:
            return self.code(graphs[0])  # raises with the reasons
        return structural_text(self.site_diffs(graphs), width=width)

    # -- rendering -------------------------------------------------------------------------
    def site_rows(self) -> list[list[Any]]:
        plan = {layer.layer: layer for layer in self.plan}
        rows = []
        for site in self.sites:
            kept = plan.get(site.layer)
            rows.append(
                [
                    site.layer,
                    site.module_path,
                    site.heads,
                    site.kv_heads,
                    site.head_dim,
                    site.spelling,
                    f"{kept.kv_heads} x {_num(kept.budget)} = {kept.entries}" if kept else "-",
                ]
            )
        return rows

    def pass_rows(self) -> list[list[Any]]:
        return [
            [
                run.graph,
                run.index,
                run.name,
                run.matches,
                "yes" if run.changed else "no",
                f"{run.ms:.1f}",
                _counted(run.inserted) or "-",
            ]
            for run in self.passes
        ]

    SITE_HEADERS = [
        "layer",
        "module",
        "heads",
        "kv heads",
        "head dim",
        "attention",
        "kept KV (heads x budget)",
    ]
    PASS_HEADERS = ["graph", "#", "pass", "matches", "changed", "ms", "inserted"]

    def summary(self) -> str:
        response = self.input_shape[-1] - self.prompt_len
        options = ", ".join(f"{k}={v!r}" for k, v in _options(self.config).items())
        lines = [
            f"MaskKV explain: {self.model}, input {tuple(self.input_shape)} = prompt "
            f"{self.prompt_len} + {response} masked (mask id {self.mask_token_id}); {options}",
            f"layer allocation: {self.config.layer_allocation}",
            "",
            f"attention sites: {len(self.sites)} rewritten, {len(self.skipped)} skipped",
        ]
        if self.sites:
            lines.append(_table(self.site_rows(), self.SITE_HEADERS))
        lines += ["", "passes:", _table(self.pass_rows(), self.PASS_HEADERS)]
        if self.plan:
            lines += [
                "",
                f"kept KV per prompt: {self.kept_entries} entries, {_human(self.kept_bytes)}",
            ]
        if self.skipped:
            lines += [
                "",
                "skipped sites (left as they are):",
                *(f"  {reason}" for reason in self.skipped),
            ]
        if not self.rewritten:
            lines += ["", "nothing was rewritten: every attention site was refused"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_html(self, path, graphs: tuple[str, ...] = ("prefill", "step")) -> str:
        """Write one self-contained page (no script, no network): the site table, each site's
        subgraph drawn before (captured) and after (each rewritten graph) side by side, its
        matched nodes and its rewritten graphs' node lists with the inserted ``maskkv::`` ops
        highlighted, then the summary and the line diffs (readable names, wrapped, folded).
        Returns ``path``."""
        sections = [
            f"<h1>MaskKV explain: {html.escape(self.model)}</h1>",
            f"<p class='lead'>{html.escape(self.summary().splitlines()[0])}</p>",
        ]
        if self.rewritten:
            site_diffs = self.site_diffs(graphs)
            views = site_views(self.captured, self.graphs, graphs)
            sections += [
                site_table_html(site_diffs),
                f"<p class='legend'>{LEGEND}</p>",
                sites_html(site_diffs, views),
            ]
        else:
            sections.append("<p>nothing was rewritten: every attention site was refused</p>")
        sections.append(
            "<details open><summary>summary</summary><pre "
            f"class='summary'>{html.escape(self.summary())}</pre></details>"
        )
        differ = difflib.HtmlDiff(tabsize=4)
        captured = readable_code(self.captured_code, 80).splitlines()
        for graph in graphs if self.rewritten else ():
            table = differ.make_table(
                captured,
                readable_code(self.code(graph, readable=False), 80).splitlines(),
                "captured",
                graph,
                context=True,
                numlines=3,
            )
            sections.append(
                f"<details><summary>{graph} graph: line diff of the "
                f"code</summary>\n{_highlight(table)}</details>"
            )
        page = _PAGE.format(
            title=html.escape(f"MaskKV explain: {self.model}"), body="\n".join(sections)
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
        return str(path)

    def to_model_explorer(self, path) -> str:
        """Write the captured, canonical, prefill and step graphs as one Model Explorer graph
        collection (JSON; open with ``model-explorer PATH``, package ``ai-edge-model-explorer``,
        not needed to write it). Node ids are fx names, shared by the graphs, so the split view's
        "Match node id" sync lines them up. Returns ``path``."""
        if not self.rewritten:
            self.code("prefill")  # raises with the reasons
        from maskkv_compile.model_explorer import write

        return write(path, self.captured, self.graphs, f"MaskKV: {self.model}")


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8">\
<meta name="viewport" content="width=device-width"><title>{title}</title>
<style>
body {{ font-family: sans-serif; font-size: 14px; max-width: 1240px; margin: 0 auto; \
padding: 0 12px; }}
h1 {{ font-size: 20px; margin: 10px 0 4px; }} h3 {{ font-size: 15px; margin: 6px 0; }}
p.lead {{ margin: 0 0 8px; color: #444; }}
code {{ font-size: 12px; overflow-wrap: anywhere; }}
table.sites {{ border-collapse: collapse; margin-bottom: 10px; }}
table.sites td, table.sites th {{ border: 1px solid #ccc; padding: 2px 6px; \
text-align: left; vertical-align: top; }}
table.sites code {{ white-space: nowrap; }}
section.site {{ border: 1px solid #ddd; border-radius: 4px; padding: 4px 8px; \
margin-bottom: 10px; }}
table.side {{ width: 100%; table-layout: fixed; border-collapse: collapse; }}
table.side th {{ background: #eee; text-align: left; padding: 2px 6px; }}
table.side td {{ vertical-align: top; padding: 2px 6px; border-right: 1px solid #ddd; }}
div.views {{ display: flex; gap: 8px; align-items: flex-start; margin: 4px 0; }}
figure.view {{ flex: 1 1 0; min-width: 0; margin: 0; border: 1px solid #eee; \
padding: 2px 4px; overflow-x: auto; }}
figure.view figcaption {{ font-size: 12px; color: #333; font-weight: bold; }}
figure.view svg {{ display: block; margin: 2px auto; max-width: 100%; height: auto; }}
p.legend {{ margin: 2px 0 6px; font-size: 12px; }} p.legend svg {{ vertical-align: middle; }}
ul.nodes {{ margin: 2px 0; padding-left: 16px; }} ul.nodes li {{ margin: 0; }}
li.add.op {{ background: #f3e6ff; }} li.del {{ color: #8a1f1f; }} \
p.none {{ color: #888; margin: 2px 0; }}
section.site p {{ margin: 3px 0; }}
pre.summary {{ background: #f6f6f6; padding: 1em; white-space: pre-wrap; }}
table.diff {{ font-family: monospace; font-size: 12px; border: 1px solid #ccc; }}
table.diff td {{ vertical-align: top; }}
.diff_header {{ background-color: #e0e0e0; }}
td.diff_header {{ text-align: right; }}
.diff_next {{ background-color: #c0c0c0; }}
.diff_add {{ background-color: #aaffaa; }}
.diff_chg {{ background-color: #ffff77; }}
.diff_sub {{ background-color: #ffaaaa; }}
tr.maskkv-row td {{ border-top: 1px solid #c080ff; border-bottom: 1px solid #c080ff; }}
mark.maskkv {{ background-color: #e0b0ff; font-weight: bold; }}
</style></head>
<body>
{body}
<p>Legend: <span class="diff_add">added</span> <span class="diff_chg">changed</span>
<span class="diff_sub">deleted</span> <mark class="maskkv">maskkv:: op</mark></p>
</body></html>
"""


def _highlight(table: str) -> str:
    """Mark maskkv:: op names and the rows that hold them in an HtmlDiff table."""

    def row(match: re.Match) -> str:
        text = html.unescape(re.sub(r"<[^>]+>", "", match.group(0))).replace("\xa0", " ")
        content = match.group(0)
        if "torch.ops.maskkv." in text:
            content = content.replace("<tr>", '<tr class="maskkv-row">', 1)
        return _OP_IN_CODE.sub(lambda m: f'<mark class="maskkv">{m.group(0)}</mark>', content)

    return re.sub(r"<tr>.*?</tr>", row, table, flags=re.S)


def _num(value: float):
    return int(value) if float(value).is_integer() else round(value, 2)


def _op_name(target: str) -> str:
    """ "maskkv.mask_votes.default" -> "maskkv::mask_votes"."""
    parts = target.split(".")
    return f"{parts[0]}::{parts[1]}" if len(parts) >= 2 else target


def _counted(ops) -> str:
    return ", ".join(f"{op} x{count}" if count > 1 else op for op, count in Counter(ops).items())


def _human(nbytes: float) -> str:
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "GiB":
            break
    return f"{nbytes:.1f} {unit}"


def _table(rows, headers) -> str:
    try:
        from tabulate import tabulate

        return tabulate(rows, headers=headers)
    except ImportError:  # tabulate is optional: plain columns
        cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells
        )


def _options(config: MaskKVConfig) -> dict[str, Any]:
    """The options that differ from the defaults (budget always shown)."""
    defaults = MaskKVConfig()
    shown = {"budget": config.budget}
    for name in MaskKVConfig.option_names():
        value = getattr(config, name)
        if name != "budget" and value != getattr(defaults, name) and name != "profile":
            shown[name] = value
    if getattr(config, "profile", None) is not None:
        shown["profile"] = "set"
    return shown


# -- capture ---------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the recording backend once it has the graph: stops the compile there."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__("graph captured")
        self.gm = gm


def _record(gm, example_inputs):
    raise _Captured(gm)


def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> fx.GraphModule:
    """The dynamo graph of ``model(input_ids)`` as optimize() would see it (eval mode, no
    grad, sequence dim symbolic, ``use_cache=False`` where the forward takes it)."""
    ids = input_ids.clone()  # mark_dynamic marks the tensor object: leave the caller's alone
    _torch_private.mark_dynamic(ids, 1)
    kwargs: dict[str, Any] = {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if (
        "use_cache" in params
    ):  # as optimize(): a returned KV cache is not part of the graph MaskKV rewrites
        kwargs["use_cache"] = False
    args: tuple = ()
    if "input_ids" in params:
        kwargs["input_ids"] = ids
    else:
        args = (ids,)
    training = {module: module.training for module in model.modules()}
    model.eval()
    compiled = torch.compile(model, backend=_record, fullgraph=True)
    try:
        with (
            torch.no_grad(),
            _torch_private.dynamo_config.patch(
                recompile_limit=RECOMPILE_LIMIT,
                accumulated_recompile_limit=RECOMPILE_LIMIT,
                suppress_errors=False,
            ),
        ):
            compiled(*args, **kwargs)
    except _torch_private.BackendCompilerFailed as failure:
        if isinstance(failure.inner_exception, _Captured):
            return failure.inner_exception.gm
        raise
    except _Captured as captured:  # a dynamo that does not wrap backend errors
        return captured.gm
    finally:
        for module, mode in training.items():
            module.training = mode
    raise RuntimeError("dynamo ran the model without handing a graph to the recording backend")


# -- explain -----------------------------------------------------------------------------------


def explain(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    config: Optional[MaskKVConfig] = None,
    **options,
) -> Report:
    """Capture ``model`` on ``input_ids`` (a prompt followed by mask tokens, as at step 0),
    run the MaskKV passes and report what they did; the model is neither run nor changed.

    Options as for :func:`maskkv_compile.optimize` (budget, mask_token_id (default
    ``model.config.mask_token_id``), backend, prompt_refresh, ...; ``config`` a full
    :class:`MaskKVConfig` they override). An unknown option is an error naming it.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"explain() takes a torch.nn.Module, got {type(model).__name__}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
    ):
        shape = (
            tuple(input_ids.shape)
            if isinstance(input_ids, torch.Tensor)
            else type(input_ids).__name__
        )
        raise ValueError(f"input_ids must be (batch, seq) integer token ids, got {shape}")
    config = MaskKVConfig.from_options(
        {k: v for k, v in options.items() if v is not None}, base=config
    )
    token = config.mask_token_id
    if token is None:
        token = getattr(getattr(model, "config", None), "mask_token_id", None)
    if token is None:
        raise MaskKVConfigError(
            "mask_token_id is not set and the model config has none: pass explain(model, "
            "ids, mask_token_id=...)"
        )
    masked = input_ids[0] == token
    if not bool(masked.any()):
        from maskkv_compile.runtime import NoMaskTokenError

        raise NoMaskTokenError(
            f"input_ids hold no mask token (id {token}): explain needs the step-0 input, a "
            "prompt followed by masks"
        )
    prompt_len = int((~masked).sum())

    gm = capture(model, input_ids)
    try:
        graphs = build_graphs(gm, config, strict=False)
    except UnsupportedModelError:
        refused = _refused_sites(gm)
        if not refused:
            raise
        return _report(model, config, int(token), input_ids, prompt_len, gm, None, refused)
    return _report(model, config, int(token), input_ids, prompt_len, gm, graphs, None)


def _refused_sites(gm: fx.GraphModule) -> Optional[PassManager]:
    """The canonical pass alone, when attention was seen but every site refused."""
    manager = PassManager("canonical", [FindAttentionPass()])
    manager(copy_graph_module(gm))
    result = manager.records[0].result
    return manager if result.matches == 0 and result.skipped else None


def _report(
    model, config, token, input_ids, prompt_len, gm, graphs: Optional[MaskKVGraphs], refused
) -> Report:
    records = graphs.records if graphs is not None else {"canonical": refused.records}
    runs = [
        PassRun(
            graph=graph,
            index=record.index,
            name=record.name,
            matches=record.result.matches,
            changed=record.result.changed,
            ms=record.result.ms,
            inserted=tuple(_op_name(op) for op in record.result.inserted),
            skipped=record.result.skipped,
        )
        for graph, graph_records in records.items()
        for record in graph_records
    ]
    skipped = graphs.skipped if graphs is not None else refused.records[0].result.skipped
    codes = {name: getattr(graphs, name).code for name in GRAPHS} if graphs is not None else {}
    return Report(
        model=type(model).__name__,
        config=config,
        mask_token_id=token,
        input_shape=tuple(input_ids.shape),
        prompt_len=prompt_len,
        sites=list(graphs.sites) if graphs is not None else [],
        passes=runs,
        skipped=tuple(skipped),
        plan=_plan(graphs, config, prompt_len, int(input_ids.shape[0]))
        if graphs is not None
        else [],
        captured_code=gm.code,
        codes=codes,
        graphs=graphs,
        captured=gm,
    )


def _layer_budgets(config: MaskKVConfig, kv_heads: list[int]) -> list[float]:
    """Average budget per KV head of every layer: the policy's layer split where the passes
    have one, else ``config.budget`` everywhere."""
    try:
        from maskkv_compile.passes.evict_kv import layer_budgets
    except ImportError:
        return [float(config.budget)] * len(kv_heads)
    passes_log = logging.getLogger("maskkv_compile.passes")
    quiet = _DropWarnings()  # the pass already warned about this config
    passes_log.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [float(b) for b in layer_budgets(config, kv_heads)]
    finally:
        passes_log.removeFilter(quiet)


class _DropWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def _plan(graphs: MaskKVGraphs, config: MaskKVConfig, prompt_len: int, batch: int) -> list[KeptKV]:
    nodes = {n.name: n for n in graphs.canonical.graph.nodes}
    plan = []
    budgets = _layer_budgets(config, [site.kv_heads for site in graphs.sites])
    for site, layer_budget in zip(graphs.sites, budgets):
        budget = min(layer_budget, float(prompt_len))
        entries = min(int(round(site.kv_heads * layer_budget)), site.kv_heads * prompt_len)
        node = nodes.get(site.node)
        k = example_value(node.args[1]) if node is not None else None
        v = example_value(node.args[2]) if node is not None else None
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor):
            entry_bytes = (
                int(k.shape[-1]) * k.element_size() + int(v.shape[-1]) * v.element_size()
            ) * batch
        else:
            entry_bytes = 0
        plan.append(
            KeptKV(
                site.layer, site.module_path, site.kv_heads, budget, entries, entries * entry_bytes
            )
        )
    return plan


__all__ = ["KeptKV", "PassRun", "Report", "capture", "explain"]
