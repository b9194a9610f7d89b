"""torch.compile(model, backend="maskkv"): the backend is found through its entry point.

The sequence length must be symbolic from the first call: mark it dynamic on the token
tensor (``dynamic=True`` works too, with options backend="eager": it turns the model's float
constants into tensors, which Inductor cannot take as the attention scale yet). The backend
has no model config to read the mask token from, so it comes in the options.
"""

import torch

from maskkv_compile.models import tiny_dream  # only to build the model; the backend needs no import

model = tiny_dream(layers=2, hidden=64)
mask_id = model.config.mask_token_id
compiled = torch.compile(model, backend="maskkv", options={"budget": 8, "mask_token_id": mask_id})

x = torch.randint(0, mask_id, (1, 40), generator=torch.Generator().manual_seed(2))
x[:, 32:] = mask_id
torch._dynamo.mark_dynamic(x, 1)
for _ in range(4):
    logits = compiled(x, use_cache=False).logits
    masked = (x == mask_id).nonzero()[:, 1]
    best = logits[0, masked].softmax(-1).max(-1)
    position = masked[best.values.argmax()]
    x[0, position] = logits[0, position].argmax()
print("after 4 steps:", x[0, 32:].tolist())
