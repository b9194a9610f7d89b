"""From one captured graph to the two MaskKV graphs (prefill and step).

    captured --FindAttentionPass--> canonical --+--> prefill (MaskPadding, CaptureVotes, EvictKV,
                                                |             MaskOnlyHead)
                                                +--> step    (SliceSequence, CachedAttention[,
                                                              ResponseKVOutputs])

ResponseKVOutputs runs on the step graph only with ``config.block_length`` (the dual cache needs
the response K/V); otherwise it runs on a copy, ``step_kv``, which block diffusion's extend runs
(``block_diffusion.py``).
With ``config.revote`` the prefill also runs KeepPromptKV (each layer's prompt K/V as outputs: the
second tier). A third graph is derived from the step graph, the one that re-selects (from the
second tier with ``revote``; from each head's [kept prefix ; finished block] at a block
diffusion window's growth otherwise), with the response K/V out as ``step_kv``; it is compiled
only if it runs:

                                                     step_kv --> revote (RevoteKV)

Each derived graph is a copy, so the canonical graph stays available to ``explain``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from maskkv_compile import tensor_parallel as distributed
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.passes import (
    AttentionSite,
    CachedAttentionPass,
    CaptureVotesPass,
    EvictKVPass,
    FindAttentionPass,
    GraphInfo,
    KeepPromptKVPass,
    MaskOnlyHeadPass,
    MaskPaddingPass,
    PassManager,
    PruneTailRowsPass,
    ResponseKVOutputsPass,
    RevoteKVPass,
    ShardBudgetsPass,
    SliceSequencePass,
    UnsupportedModelError,
    analyse,
    attention_sites,
)
from maskkv_compile.passes.base import OUTPUT_GROUPS, PassRecord, extra_inputs
from maskkv_compile.passes.dead_code import eliminate_dead_code


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (nodes, their meta, and the output names of ``append_outputs``)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    node = graph.output(out)
    node.meta.update(next(n for n in reversed(gm.graph.nodes) if n.op == "output").meta)
    return fx.GraphModule(gm, graph)


@dataclass
class MaskKVGraphs:
    info: GraphInfo
    sites: list[AttentionSite]
    num_inputs: int  # placeholders of the captured graph
    captured_code: str
    canonical: fx.GraphModule
    prefill: fx.GraphModule
    step: fx.GraphModule
    prefill_inputs: list[str]  # names of the placeholders the passes appended, in order
    step_inputs: list[str]
    head_sliced: bool
    records: dict[str, list[PassRecord]] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    step_kv: Optional[fx.GraphModule] = None  # the step graph with each layer's response K/V out
    revote: Optional[fx.GraphModule] = None  # the step graph that re-selects
    revote_inputs: list[str] = field(default_factory=list)
    # the masks the model builds from the length alone (FindAttentionPass dropped them from the
    # sites): the captured graph cut down to them, called with the call's own inputs
    mask_fn: Optional[fx.GraphModule] = None


def mask_graph(gm: fx.GraphModule, sites: list[AttentionSite]) -> Optional[fx.GraphModule]:
    """The captured graph cut down to the masks the sites' ``graph_mask`` name (one output per
    distinct mask), or None when no site has one. Every site must have one: a model with some
    layers masked and others not needs a key limit per layer, which the runtime has not."""
    names = list(dict.fromkeys(site.graph_mask for site in sites))
    if names == [None]:
        return None
    if None in names:
        masked = [site.module_path for site in sites if site.graph_mask is not None]
        plain = [site.module_path for site in sites if site.graph_mask is None]
        raise UnsupportedModelError(
            f"the model builds an attention mask inside forward for some layers ({masked}) and "
            f"none for others ({plain}); MaskKV needs one mask for every layer"
        )
    cut = copy_graph_module(gm)
    nodes = {n.name: n for n in cut.graph.nodes}
    out = next(n for n in reversed(cut.graph.nodes) if n.op == "output")
    out.args = (tuple(nodes[name] for name in names),)
    out.meta.pop(OUTPUT_GROUPS, None)
    eliminate_dead_code(cut.graph)
    cut.recompile()
    return cut


def _seen_ops(gm: fx.GraphModule) -> str:
    ops = Counter(
        getattr(n.target, "__name__", str(n.target))
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method")
    )
    return ", ".join(f"{name} x{count}" for name, count in ops.most_common(25))


def build_graphs(gm: fx.GraphModule, config: MaskKVConfig, *, strict: bool = True) -> MaskKVGraphs:
    """Run the passes. ``strict`` (what optimize/the backend use) turns refusals into errors;
    ``explain`` passes ``strict=False`` to report them instead."""
    info = analyse(gm)
    distributed.check_no_sequence_sharding(gm, info.seq_expr)
    num_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    canonical = copy_graph_module(gm)
    find = PassManager("canonical", [FindAttentionPass()])
    find(canonical)
    result = find.records[0].result
    if strict and result.skipped:
        raise UnsupportedModelError(
            "maskkv cannot rewrite these attention sites safely:\n  " + "\n  ".join(result.skipped)
        )
    if result.matches == 0:
        raise UnsupportedModelError(
            "no attention found in the model's graph; ops seen: " + _seen_ops(gm)
        )
    sites = attention_sites(canonical)
    distributed.check_local_attention(sites)
    sites = [site for _, site in sites]
    mask_fn = mask_graph(gm, sites)
    prefill = copy_graph_module(canonical)
    keep_prompt = [KeepPromptKVPass()] if config.revote is not None else []
    # a tensor-parallel model (its graph runs collectives): every rank's budgets from every head
    shard_budgets = [ShardBudgetsPass(config)] if distributed.collective_signature(gm) else []
    prefill_passes = PassManager(
        "prefill",
        [
            MaskPaddingPass(),
            CaptureVotesPass(config),
            EvictKVPass(config),
            *shard_budgets,
            *keep_prompt,
            MaskOnlyHeadPass(info),
            PruneTailRowsPass(info),
        ],
    )
    prefill_passes(prefill)
    step = copy_graph_module(canonical)
    step_pipeline = [SliceSequencePass(info), CachedAttentionPass()]
    if config.block_length is not None:
        step_pipeline.append(ResponseKVOutputsPass())
    step_passes = PassManager("step", step_pipeline)
    step_passes(step)
    step_kv = step
    if config.block_length is None:  # block diffusion's extend needs the response K/V out
        step_kv = copy_graph_module(step)
        PassManager("step_kv", [ResponseKVOutputsPass()])(step_kv)
    records = {
        "canonical": find.records,
        "prefill": prefill_passes.records,
        "step": step_passes.records,
    }
    # the step graph that re-selects (revote.py: from the second tier; block_diffusion.py:
    # from each head's [kept prefix ; finished block]); runs only when the runtime asks for it.
    # It returns the computed rows' K/V too: a block's first step, which re-selects, is also
    # where Fast-dLLM v2's block cache takes the block's K/V (block_buffer.py)
    revote = copy_graph_module(step_kv)
    revote_passes = PassManager("revote", [RevoteKVPass(config)])
    revote_passes(revote)
    records["revote"] = revote_passes.records
    derived = {"prefill": prefill, "step": step, "revote": revote}
    distributed.check_collectives_preserved(gm, **derived)
    return MaskKVGraphs(
        info=info,
        sites=sites,
        num_inputs=num_inputs,
        captured_code=gm.code,
        canonical=canonical,
        prefill=prefill,
        step=step,
        step_kv=step_kv,
        prefill_inputs=extra_inputs(prefill, num_inputs),
        step_inputs=extra_inputs(step, num_inputs),
        head_sliced=next(
            r.result.changed for r in prefill_passes.records if r.result.name == "MaskOnlyHeadPass"
        ),
        records=records,
        skipped=result.skipped,
        revote=revote,
        revote_inputs=extra_inputs(revote, num_inputs),
        mask_fn=mask_fn,
    )
