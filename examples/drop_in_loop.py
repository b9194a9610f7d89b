"""The drop-in contract: an unmodified LLaDA-style loop calling model(x).logits.

The loop below knows nothing about MaskKV; the optimized model recognises step 0 of the
prompt (masks present, prompt new) and computes only the response rows afterwards.
"""

import torch

import maskkv_compile
from maskkv_compile.tiny_models import tiny_llada

model = tiny_llada(layers=2, hidden=64)
mask_id = model.config.mask_token_id


def fill(net, x, steps):
    for _ in range(steps):
        mask_index = x == mask_id
        logits = net(x).logits  # (B, S, V); MaskKV puts zeros in the prompt rows
        confidence, tokens = torch.softmax(logits, -1).max(-1)
        confidence = torch.where(mask_index, confidence, float("-inf"))
        pick = confidence.argmax(-1)
        x[0, pick] = tokens[0, pick]
    return x


x = torch.randint(0, mask_id, (1, 40), generator=torch.Generator().manual_seed(1))
x[:, 16:24] = mask_id  # infilling: the masked span is in the middle
optimized = maskkv_compile.optimize(model, budget=6, backend="eager")
filled = fill(optimized, x.clone(), steps=8)
print("filled span:", filled[0, 16:24].tolist())
print(
    "calls:",
    optimized.cache_stats()["prefills"],
    "prefill,",
    optimized.cache_stats()["steps"],
    "steps",
)
