"""optimize() + generate(): MaskKV on a small LLaDA-style model, against the uncached loop.

python examples/optimize_generate.py [--backend eager|inductor]
"""

import argparse

import torch

import maskkv_compile
from maskkv_compile.generate import generate
from maskkv_compile.tiny_models import tiny_llada

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
args = parser.parse_args()

model = tiny_llada(layers=2, hidden=64)
mask_id = model.config.mask_token_id
prompt = torch.randint(0, mask_id, (1, 48), generator=torch.Generator().manual_seed(0))

# budget >= prompt length: the cache holds the whole prompt; refreshing every step is exact
exact = maskkv_compile.optimize(model, budget=64, backend=args.backend, prompt_refresh=1)
ours = exact.generate(prompt, gen_length=16, steps=16, block_length=8)
uncached = generate(model, prompt, mask_token_id=mask_id, gen_length=16, steps=16, block_length=8)
print("refresh every step, full budget == uncached:", torch.equal(ours, uncached))

# the real setting: 8 prompt KV pairs per head and layer, prompt computed once
small = maskkv_compile.optimize(model, budget=8, backend=args.backend)
out = small.generate(prompt, gen_length=16, steps=16, block_length=8)
stats = small.cache_stats()
print("generated:", out[0, 48:].tolist())
print(
    f"kept per layer and KV head: {[layer['kept_per_kv_head'] for layer in stats['layers']]}, "
    f"{stats['bytes']} bytes, prompt {stats['prompt_len']} tokens, "
    f"{stats['prefills']} prefill(s), {stats['steps']} steps"
)
