"""Tensor parallelism: what MaskKV reads from a model sharded with ``torch.distributed``.

A model sharded with PyTorch's tensor parallelism (``parallelize_module`` with
``ColwiseParallel`` on q/k/v and MLP up/gate, ``RowwiseParallel`` on o/down, outputs as local
tensors) traces into one graph per rank in which each attention site holds the rank's local
heads. Two spellings of the row-wise reduction after the attention are recognised:

* DTensor (``parallelize_module``): ``from_local(attn_out, mesh, (Shard(-1),))`` -> linear ->
  ``redistribute(Replicate)`` (the all-reduce lives inside the redistribute);
* functional collectives (transformers' inference path, ``dist.all_reduce`` traced by
  dynamo): linear -> ``_c10d_functional.all_reduce(x, "sum", group)`` -> ``wait_tensor``.

:func:`head_sharding` walks forward from an attention site to that reduction and returns
the process group its heads are split over (``None``: the site holds every head). The
passes keep each rank's graphs local -- votes, selection and the kept cache are per local KV
head -- except for the head allocation, which needs every head's prompt preference:
``ShardBudgetsPass`` gathers it (``maskkv::gather_heads``) and takes the rank's share of
the single-device allocation.

Invariants checked here: :func:`collective_signature` is the same in the captured, prefill
and step graphs (the passes never move, drop or duplicate a collective), and no tensor is
sharded along the sequence (:func:`check_no_sequence_sharding`: sequence parallelism is
refused). :func:`check_model` refuses, before tracing, head counts the mesh does not divide.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from maskkv_compile._torch_private import example_value, resolve_process_group, sym_expr

# ops that pass the attention output on to the row-wise projection unchanged in content
_LAYOUT_METHODS = ("reshape", "view", "transpose", "contiguous", "permute", "flatten", "to")
_LAYOUT_FUNCTIONS = (torch.reshape, torch.transpose, torch.flatten, torch.permute)


class TensorParallelError(ValueError):
    """A sharding MaskKV does not support; the message names it and what to do."""


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(value) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(value, cls)


def fake_like(value, shape) -> torch.Tensor:
    """A zero tensor standing in for a graph input whose recorded value is ``value``, with the
    (global) ``shape``. A DTensor input (a sharded parameter) becomes a DTensor with the same
    mesh, placements and local shape, so the sharded ops in the graph see what they expect;
    its shape must be the recorded one (parameters never carry the sequence length)."""
    if not is_dtensor(value):
        return torch.zeros(shape, dtype=value.dtype)
    from torch.distributed.tensor import DTensor

    if tuple(shape) != tuple(value.shape):
        raise TensorParallelError(
            f"a DTensor graph input of shape {tuple(value.shape)} varies with the sequence length; "
            "MaskKV supports tensor parallelism of the weights only (no sequence parallelism)"
        )
    local = torch.zeros(value.to_local().shape, dtype=value.dtype)
    return DTensor.from_local(
        local,
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=value.shape,
        stride=value.stride(),
    )


def real_object(value):
    """The real object behind a traced opaque input (dynamo records a DeviceMesh input as a
    FakeScriptObject wrapping it); anything else as it is."""
    return getattr(value, "real_obj", value)


# ---------------------------------------------------------------- heads of an attention site


@dataclass(frozen=True)
class HeadShard:
    """The process group an attention site's heads are split over, evenly and in rank order."""

    group_name: str
    rank: int  # this rank's index in the group
    world: int


def _mesh_shard(mesh, placements) -> Optional[HeadShard]:
    """The mesh dim a last-dim Shard placement splits over (the others must replicate)."""
    mesh = real_object(mesh)
    dims = [i for i, p in enumerate(placements) if p.is_shard()]
    if not dims:
        return None
    if len(dims) > 1:
        raise TensorParallelError(
            f"the attention output is sharded over several mesh dims ({placements}); "
            "MaskKV supports heads split over one mesh dim"
        )
    dim = dims[0]
    return HeadShard(
        mesh.get_group(dim).group_name, int(mesh.get_local_rank(dim)), int(mesh.size(dim))
    )


def _group_shard(group_name: str) -> HeadShard:
    import torch.distributed as dist

    group = resolve_process_group(group_name)
    return HeadShard(group_name, dist.get_rank(group), dist.get_world_size(group))


def _is_funcol(node: fx.Node, name: str) -> bool:
    return node.op == "call_function" and str(node.target).startswith(f"_c10d_functional.{name}")


def head_sharding(node: fx.Node) -> Optional[HeadShard]:
    """How the heads of the attention site ``node`` are split: follow its output through
    layout ops to the row-wise projection; if that projection's result is all-reduced (or its
    input is declared a last-dim shard of a DTensor), the heads are a shard over that group.
    ``None`` when the output reaches anything else first (an unsharded attention)."""
    frontier = [node]
    for _ in range(16):  # reshape/transpose/contiguous/linear/bias: a handful of nodes
        following = []
        for current in frontier:
            for user in current.users:
                if (
                    user.op == "call_function"
                    and getattr(user.target, "__name__", "") == "from_local"
                ):
                    placements = (
                        user.args[2] if len(user.args) > 2 else user.kwargs.get("placements")
                    )
                    mesh = user.args[1] if len(user.args) > 1 else user.kwargs.get("device_mesh")
                    return _mesh_shard(
                        example_value(mesh) if isinstance(mesh, fx.Node) else mesh, placements
                    )
                if _is_funcol(user, "all_reduce"):
                    return _group_shard(user.args[2])
                layout = (user.op == "call_method" and user.target in _LAYOUT_METHODS) or (
                    user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS
                )
                projection = user.op == "call_function" and user.target in (
                    torch._C._nn.linear,
                    torch.nn.functional.linear,
                    torch.matmul,
                    operator.matmul,
                    operator.add,
                )
                if layout or projection:
                    following.append(user)
        if not following:
            return None
        frontier = following
    return None


def check_divides(node: fx.Node, heads: int, kv_heads: int, shard: HeadShard) -> None:
    """Even split: each rank holds ``heads`` query and ``kv_heads`` KV heads, so the global
    counts are ``world`` times these. (An uneven split fails in the gather; see check_model.)"""
    if heads % kv_heads:
        raise TensorParallelError(
            f"{node.name}: {heads} local query heads are not a multiple of "
            f"{kv_heads} local KV heads"
        )


# ---------------------------------------------------------------- graph-wide checks


def collective_signature(gm: fx.GraphModule) -> list[str]:
    """The collectives of a graph in order: functional collectives (op and group) and DTensor
    redistributions / local-global conversions (with their placements)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("_c10d_functional."):
            out.append(
                f"{node.target}{tuple(a for a in node.args[1:] if not isinstance(a, fx.Node))}"
            )
        elif node.op == "call_method" and node.target == "redistribute":
            out.append(f"redistribute{node.kwargs.get('placements', node.args[1:])}")
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "from_local":
            out.append(
                f"from_local{node.args[2] if len(node.args) > 2 else node.kwargs.get('placements')}"
            )
    return out


def check_collectives_preserved(captured: fx.GraphModule, **derived: fx.GraphModule) -> None:
    """Every derived graph runs the captured graph's collectives, in the same order, once each."""
    want = collective_signature(captured)
    for name, gm in derived.items():
        got = collective_signature(gm)
        if got != want:
            raise RuntimeError(
                f"the {name} graph's collectives differ from the captured graph's (a pass "
                "moved, dropped or duplicated one; please report this):\n  captured: "
                f"{want}\n  {name}: {got}"
            )


def check_local_attention(sites) -> None:
    """Refuse attention over DTensors: MaskKV's ops work on each rank's local heads."""
    for node, site in sites:
        if any(is_dtensor(example_value(arg)) for arg in node.args[:3] if isinstance(arg, fx.Node)):
            raise TensorParallelError(
                f"the attention at {site.module_path} computes on DTensors; MaskKV needs each "
                "rank's local heads as plain tensors: shard q/k/v with "
                "ColwiseParallel(use_local_output=True) (the default)"
            )


_MIXED = "mixed torch.Tensor and DTensor"


def mixed_dtensor_error(error: BaseException) -> Optional[TensorParallelError]:
    """The error to raise instead of torch's when tracing a sharded model failed on an op mixing
    DTensors and plain tensors (``None`` for any other failure). A transformers model whose q/k/v
    projections return DTensors (``ColwiseParallel(use_local_output=False)``) fails this way at
    its rotary embedding, before any MaskKV pass sees the graph -- and in eager too."""
    if _MIXED not in str(error):
        return None
    first = next((line.strip() for line in str(error).splitlines() if _MIXED in line), "")
    return TensorParallelError(
        "tracing the tensor-parallel model failed on an op mixing DTensors and plain tensors "
        "(attention over DTensors?). MaskKV runs attention on each rank's local heads as plain "
        "tensors: shard q/k/v with ColwiseParallel(use_local_output=True) (the default) and o with "
        "RowwiseParallel(); attention over DTensors (use_local_output=False) and sequence "
        f"parallelism are not supported. torch said: {first[:400]}"
    )


def check_no_sequence_sharding(gm: fx.GraphModule, seq_expr) -> None:
    """Refuse sequence parallelism: a DTensor sharded along a dimension of length S."""
    for node in gm.graph.nodes:
        value = example_value(node)
        if not is_dtensor(value):
            continue
        for placement in value.placements:
            if placement.is_shard():
                dim = placement.dim % value.dim()
                if sym_expr(value.shape[dim]) == seq_expr:
                    raise TensorParallelError(
                        f"{node.name} is a DTensor sharded along the sequence (placement "
                        f"{placement}): sequence parallelism is not supported by MaskKV (each "
                        "rank must see the whole sequence; the step graph computes only the "
                        "response rows). Shard the weights only (ColwiseParallel / "
                        "RowwiseParallel without SequenceParallel)"
                    )


def check_model(model: torch.nn.Module) -> None:
    """Before tracing: a model with DTensor parameters must split its heads evenly.

    Reads the attention head counts from the model config (``num_attention_heads`` /
    ``num_key_value_heads``, or LLaDA's ``n_heads`` / ``n_kv_heads``) and the mesh from the
    sharded parameters; a count the mesh does not divide is refused here, with the numbers,
    instead of failing inside the model's reshape or in a collective.
    """
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if is_dtensor(p)}
    if not meshes:
        return
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", None))
    kv_heads = getattr(config, "num_key_value_heads", getattr(config, "n_kv_heads", None)) or heads
    for mesh in meshes.values():
        for dim in range(mesh.ndim):
            world = int(mesh.size(dim))
            for what, count in (("query heads", heads), ("KV heads", kv_heads)):
                if isinstance(count, int) and world > 1 and count % world:
                    raise TensorParallelError(
                        f"the model has {count} {what}, which its tensor-parallel mesh dim "
                        f"{dim} of size {world} does not divide: each rank must hold whole "
                        "heads, the same number on every rank. Use a tensor-parallel size "
                        f"that divides {count}"
                    )
