"""torch.compile(model, backend="maskkv"): the backend is found through its entry point.

The plain spelling works in an unmodified denoising loop: no ``mark_dynamic`` (the first
call's length is traced as a constant and the backend makes it symbolic; another length
recompiles), ``dynamic=True`` works too, and a torch.compile mode goes among the options
(torch.compile takes mode= or options=, not both). The backend has no model config to read
the mask token from, so it comes in the options. Inductor compiles the rewritten graphs.
"""

import torch

from maskkv_compile.tiny_models import (
    tiny_dream,
)  # only to build the model; the backend needs no import

model = tiny_dream(layers=2, hidden=64)
mask_id = model.config.mask_token_id
compiled = torch.compile(model, backend="maskkv", options={"budget": 8, "mask_token_id": mask_id})

x = torch.randint(0, mask_id, (1, 40), generator=torch.Generator().manual_seed(2))
x[:, 32:] = mask_id
for _ in range(4):
    logits = compiled(x, use_cache=False).logits
    masked = (x == mask_id).nonzero()[:, 1]
    best = logits[0, masked].softmax(-1).max(-1)
    position = masked[best.values.argmax()]
    x[0, position] = logits[0, position].argmax()
print("after 4 steps:", x[0, 32:].tolist())

import maskkv_compile  # noqa: E402  (after compiling: only to ask which runtimes ran)

counts = [(r.counts.prefills, r.counts.steps) for r in maskkv_compile.runtimes(compiled)]
print(
    "MaskKV runtimes (prefills, steps):", counts
)  # [(1, 3)]: every call ran MaskKV, no eager fallback
