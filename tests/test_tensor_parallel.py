"""MaskKV on tensor-parallel models: 2 ranks on CPU (gloo), against one process.

The Llama (MHA) and Qwen2 (GQA, q/k/v bias) stand-ins are sharded with PyTorch's own
``parallelize_module`` (q/k/v and MLP gate/up column-wise, o/down row-wise, local outputs),
so each rank's attention holds half the heads. In float64, through ``generate`` (the
optimized model's own loop):

* under a budget below the prompt, with a layer profile (fractional layer budgets) and heads
  made to prefer the prompt differently (ragged head budgets), the tokens equal the
  single-process MaskKV run and the kept positions of every global KV head are the same;
* ``torch.compile(sharded, backend="maskkv", options=...)`` (the eager backend option, a
  static first trace made symbolic by SymbolicLengthPass), driven by the same loop, gives the
  tokens of ``optimize`` on the same sharded model, through one MaskKV runtime (1 prefill, then
  steps) -- on the Llama stand-in only (each trace costs ~10 s of CPU per rank);
* with the whole prompt kept and a prefill every step, the tokens equal the uncached loop of
  the sharded model and of the unsharded one;
* refused with an error naming it: a head count the mesh does not divide (with the numbers),
  sequence parallelism (the usual SequenceParallel plan: sequence-sharded norms and residual
  stream), attention over DTensors (q/k/v with ``ColwiseParallel(use_local_output=False)``).

Everything runs in one pair of ranks (one spawn: the traces, not the spawn, are the cost).

The ranks are forked from the test process (torch and transformers are already imported
there: forking saves ~15 s of imports per rank on this machine).
"""

from __future__ import annotations

import copy
import datetime
import socket

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip(
        "torch.distributed with the gloo backend is not available in this torch build",
        allow_module_level=True,
    )

import maskkv_compile  # noqa: E402
from maskkv_compile.generate import generate  # noqa: E402
from maskkv_compile.profile import LayerProfile, model_fingerprint  # noqa: E402
from maskkv_compile.tensor_parallel import TensorParallelError  # noqa: E402
from maskkv_compile.tiny_models import tiny_dream, tiny_llada  # noqa: E402

WORLD = 2
PROMPT, GEN, BUDGET = (
    25,
    8,
    7,
)  # 33 tokens: no dim of the models (a static trace, torch.compile's, would refuse it)


def shard(model, mesh, local_attention: bool = True):
    """PyTorch tensor parallelism of a Llama/Qwen2-style decoder: heads and MLP columns split.
    ``local_attention=False``: q/k/v return DTensors (attention over DTensors, refused)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {}
    for i in range(len(model.model.layers)):
        prefix = f"model.layers.{i}."
        plan.update(
            {
                prefix + f"self_attn.{n}_proj": ColwiseParallel(use_local_output=local_attention)
                for n in "qkv"
            }
        )
        plan[prefix + "self_attn.o_proj"] = RowwiseParallel()
        plan.update({prefix + f"mlp.{n}_proj": ColwiseParallel() for n in ("gate", "up")})
        plan[prefix + "mlp.down_proj"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def shard_sequence(model, mesh):
    """Sequence parallelism on top of the head split (torch's recipe for Llama-style models):
    the embedding output, norms and residual stream sharded along the sequence (Shard(1)),
    gathered before attention and the MLP, reduce-scattered after o/down, gathered for the head."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    gather = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    plan = {
        "model.embed_tokens": RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False
        ),
        "model.norm": SequenceParallel(),
        "lm_head": PrepareModuleInput(input_layouts=(Shard(1),), **gather),
    }
    for i in range(len(model.model.layers)):
        prefix = f"model.layers.{i}."
        plan[prefix + "input_layernorm"] = SequenceParallel()
        plan[prefix + "post_attention_layernorm"] = SequenceParallel()
        plan[prefix + "self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
            use_local_output=True,
        )
        plan[prefix + "mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), **gather)
        plan.update({prefix + f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"})
        plan[prefix + "self_attn.o_proj"] = RowwiseParallel(
            output_layouts=Shard(1), use_local_output=False
        )
        plan.update({prefix + f"mlp.{n}_proj": ColwiseParallel() for n in ("gate", "up")})
        plan[prefix + "mlp.down_proj"] = RowwiseParallel(
            output_layouts=Shard(1), use_local_output=False
        )
    return parallelize_module(model, mesh, plan)


def sharpen_first_head(model):
    """Random-init attention is near uniform, so every head prefers the prompt alike; a much
    sharper first head makes the prompt-preference head budgets ragged."""
    with torch.no_grad():
        for layer in model.model.layers:
            d = layer.self_attn.head_dim
            layer.self_attn.q_proj.weight[:d] *= 30.0
            layer.self_attn.k_proj.weight[:d] *= 30.0
    return model


def every_rank(tensor: torch.Tensor) -> torch.Tensor:
    """(WORLD, *shape): ``tensor`` from every rank (all the same shape)."""
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def global_kept(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept_len (B, Hkv), kept_pos (B, Hkv, PROMPT)) over every rank's KV heads, in order."""
    pos = torch.nn.functional.pad(cache.kept_pos, (0, PROMPT - cache.kept_pos.shape[-1]), value=-1)
    lens, poss = every_rank(cache.kept_len), every_rank(pos)
    return torch.cat(list(lens), 1), torch.cat(list(poss), 1)


def check_family(build, rank, mesh, compile_path=False):
    base = sharpen_first_head(build(layers=3, dtype=torch.float64))
    single = copy.deepcopy(base)
    sharded = shard(base, mesh)
    mask = single.config.mask_token_id
    prompt = torch.randint(0, mask, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    loop = dict(gen_length=GEN, steps=GEN, block_length=GEN)
    profile = LayerProfile((0.5, 0.1, 0.3), model_fingerprint(single.config, type(single).__name__))
    config = maskkv_compile.MaskKVConfig(
        budget=BUDGET, backend="eager", policy="maskkv", profile=profile
    )

    # budget below the prompt: the same tokens and kept entries as one process
    ours = maskkv_compile.optimize(sharded, config=config)
    tokens = ours.generate(prompt, **loop)
    counts = ours.runtime.counts
    assert (counts.prefills, counts.steps) == (1, GEN - 1)  # the step graph ran
    shard_pass = [
        r for r in ours.runtime.graphs.records["prefill"] if r.name == "ShardBudgetsPass"
    ][0]
    assert shard_pass.result.matches == 3  # every layer's budgets came from every rank's heads
    assert torch.equal(every_rank(tokens)[0], every_rank(tokens)[1])
    kept = [global_kept(cache) for cache in ours.runtime.last_session.layers]
    assert all(
        cache.kept_len.shape[1] * WORLD == lens.shape[1]
        for cache, (lens, _) in zip(ours.runtime.last_session.layers, kept)
    )  # each rank holds its local KV heads only
    if rank == 0:
        reference = maskkv_compile.optimize(single, config=config)
        assert torch.equal(tokens, reference.generate(prompt, **loop))
        ragged = False
        for (lens, pos), theirs in zip(kept, reference.runtime.last_session.layers):
            assert torch.equal(lens, theirs.kept_len)
            assert torch.equal(
                pos,
                torch.nn.functional.pad(
                    theirs.kept_pos, (0, PROMPT - theirs.kept_pos.shape[-1]), value=-1
                ),
            )
            ragged |= len(set(lens[0].tolist())) > 1
        assert ragged  # the head allocation really depended on every head's preference
        assert (
            int(sum(lens.sum() for lens, _ in kept))
            < 3 * PROMPT * single.config.num_key_value_heads
        )

    # torch.compile's spelling, same loop, same sharded model: optimize's tokens, MaskKV every call
    if compile_path:
        compiled = torch.compile(
            sharded,
            backend="maskkv",
            options=dict(
                budget=BUDGET, backend="eager", policy="maskkv", profile=profile, mask_token_id=mask
            ),
        )
        before = set(maskkv_compile.runtimes(sharded))  # optimize's runtimes of this model
        assert torch.equal(generate(compiled, prompt, mask_token_id=mask, **loop), tokens)
        new = [r for r in maskkv_compile.runtimes(compiled) if r not in before]
        assert [(r.counts.prefills, r.counts.steps) for r in new] == [(1, GEN - 1)]

    # whole prompt, a prefill every step: the uncached loop of either model
    exact = maskkv_compile.optimize(sharded, budget=64, backend="eager", prompt_refresh=1)
    tokens = exact.generate(prompt, **loop)
    assert (exact.runtime.counts.prefills, exact.runtime.counts.steps) == (GEN, 0)
    assert torch.equal(tokens, generate(sharded, prompt, mask_token_id=mask, **loop))
    if rank == 0:
        assert torch.equal(tokens, generate(single, prompt, mask_token_id=mask, **loop))


def check_gather_heads(rank):
    """maskkv::gather_heads against torch.cat of every rank's block (over the mesh's group)."""
    from torch.distributed.distributed_c10d import _get_default_group

    blocks = [
        torch.arange(12, dtype=torch.float64).view(2, 3, 2) + 100 * r for r in range(WORLD)
    ]  # (B, h, P)
    got = torch.ops.maskkv.gather_heads(blocks[rank], _get_default_group().group_name, WORLD)
    assert torch.equal(got, torch.cat(blocks, 1))  # (B, WORLD*h, P), rank order


def check_refusals(mesh):
    # 3 KV heads (6 query heads of 16 dims) cannot be split over 2 ranks
    uneven = shard(tiny_dream(layers=1, hidden=96, heads=6, kv_heads=3, dtype=torch.float64), mesh)
    with pytest.raises(TensorParallelError, match="3 KV heads.*size 2 does not divide"):
        maskkv_compile.optimize(uneven, budget=4, backend="eager")
    prompt = torch.randint(0, 255, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    # sequence parallelism: the model runs (eagerly) with its residual stream split along the
    # sequence
    sequence = shard_sequence(tiny_llada(layers=1, dtype=torch.float64), mesh)
    assert sequence(prompt).logits.shape == (1, PROMPT, 256)
    with pytest.raises(
        TensorParallelError,
        match=r"sharded along the sequence \(placement S\(1\)\): sequence parallelism",
    ):
        maskkv_compile.optimize(sequence, budget=4, backend="eager")(prompt)
    # q/k/v as DTensors: the rotary embedding mixes them with plain tensors, under dynamo as in
    # eager
    dtensors = shard(tiny_llada(layers=1, dtype=torch.float64), mesh, local_attention=False)
    with pytest.raises(
        TensorParallelError, match=r"attention over DTensors \(use_local_output=False\)"
    ):
        maskkv_compile.optimize(dtensors, budget=4, backend="eager")(prompt)


def worker(rank: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    # A forked child must not enter OpenMP: the parent's thread pool did not come with it, and
    # libgomp waits on it forever (seen here once an earlier test ran a parallel SDPA). One
    # thread per rank runs every op inline, and two ranks fill this machine's two cores.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(minutes=5),
    )  # a rank left behind fails instead of hanging
    try:
        torch._dynamo.reset()
        mesh = init_device_mesh("cpu", (WORLD,))
        check_gather_heads(rank)
        check_family(tiny_llada, rank, mesh, compile_path=True)
        check_family(tiny_dream, rank, mesh)
        check_refusals(mesh)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process():
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(free_port(),), nprocs=WORLD, start_method="fork", join=True)


def test_gather_heads_opcheck_single_rank():
    from torch.library import opcheck

    x = torch.randn(2, 3, 5)
    opcheck(
        torch.ops.maskkv.gather_heads.default, (x, "unused", 1)
    )  # one rank: no group is touched
    assert torch.equal(torch.ops.maskkv.gather_heads(x, "unused", 1), x)
