"""MaskKV on a tensor-parallel model: each rank holds half the heads and its own kept cache.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py          # CPU, gloo
    torchrun --nproc-per-node 2 examples/tensor_parallel.py --cuda   # one GPU per rank, nccl

The model is sharded with PyTorch's own tensor parallelism (q/k/v and MLP gate/up
column-wise, o/down row-wise; outputs as local tensors so attention sees the rank's heads),
then optimized like any other model. Every rank runs the same loop on the same prompt.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.tiny_models import tiny_llada

parser = argparse.ArgumentParser()
parser.add_argument(
    "--cuda", action="store_true", help="one GPU per rank (nccl) instead of CPU (gloo)"
)
parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
args = parser.parse_args()

device = "cuda" if args.cuda else "cpu"
dist.init_process_group("nccl" if args.cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
if args.cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
mesh = init_device_mesh(device, (world,))

model = tiny_llada(layers=2, hidden=64, heads=4, dtype=torch.float64).to(
    device
)  # same seed: same weights on every rank
plan = {}
for i in range(len(model.model.layers)):
    layer = f"model.layers.{i}."
    plan.update({layer + f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"})
    plan[layer + "self_attn.o_proj"] = RowwiseParallel()
    plan.update({layer + f"mlp.{n}_proj": ColwiseParallel() for n in ("gate", "up")})
    plan[layer + "mlp.down_proj"] = RowwiseParallel()
parallelize_module(model, mesh, plan)

mask_id = model.config.mask_token_id
prompt = torch.randint(0, mask_id, (1, 48), generator=torch.Generator().manual_seed(0)).to(device)
loop = dict(gen_length=16, steps=16, block_length=8)

optimized = maskkv_compile.optimize(model, budget=8, backend=args.backend)
out = optimized.generate(prompt, **loop)
stats = optimized.cache_stats()
kept = [layer["kept_per_kv_head"] for layer in stats["layers"]]
every = [None] * world
dist.all_gather_object(every, (out[0, 48:].tolist(), kept))
if rank == 0:
    print(
        f"{world} ranks, {model.config.num_attention_heads} heads: "
        "each rank's cache holds its local KV heads"
    )
    for r, (_, rank_kept) in enumerate(every):
        print(f"rank {r} kept per layer and local KV head: {rank_kept}")
    print("same tokens on every rank:", all(tokens == every[0][0] for tokens, _ in every))
    print("generated:", every[0][0])
    print(f"calls: {stats['prefills']} prefill, {stats['steps']} steps")

exact = maskkv_compile.optimize(model, budget=64, backend=args.backend, prompt_refresh=1)
same = torch.equal(
    exact.generate(prompt, **loop), generate(model, prompt, mask_token_id=mask_id, **loop)
)
if rank == 0:
    print("full budget + refresh every step == uncached sharded model:", same)
dist.destroy_process_group()
