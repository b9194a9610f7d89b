"""Dream's convention (token i predicted at row i-1) on a left-padded batch, and CFG.

A Qwen2 stand-in for Dream (``family="dream"``: a real Dream checkpoint is detected from its
``config.model_type``) fills 6 tokens after three prompts of different lengths with the
project's Dream loop, ``dream_generate``; the padding comes as a tokenizer's 2-D attention
mask. Each row is then generated alone: batch invariance means the same tokens. Last,
LLaDA's classifier-free guidance in one batch ``cat([x, un_x])``: both halves are cached.
"""

import torch

import maskkv_compile
from maskkv_compile.dream import dream_generate
from maskkv_compile.tiny_models import tiny_dream, tiny_llada

# float64, as the tests check batch invariance: the batch's matmuls and a single row's round
# differently in float32, and at a budget of 4 a near-tie in the votes or the logits can flip
# (seen on one of this project's CPUs, not on another)
model = tiny_dream(layers=2, hidden=64, dtype=torch.float64)
mask_id, pad_id = model.config.mask_token_id, 0
lengths = [5, 12, 9]
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(1, mask_id, (n,), generator=gen) for n in lengths]
ids = torch.full((3, max(lengths)), pad_id)
attention_mask = torch.zeros_like(ids)
for row, prompt in enumerate(prompts):  # left padding, as Dream's tokenizer does
    ids[row, -len(prompt) :] = prompt
    attention_mask[row, -len(prompt) :] = 1

optimized = maskkv_compile.optimize(model, budget=4, backend="eager", family="dream")
kwargs = dict(mask_token_id=mask_id, max_new_tokens=6, steps=6, alg="entropy")
batched = dream_generate(optimized, ids, attention_mask=attention_mask, **kwargs)
stats = optimized.cache_stats()
print("prompt lengths:", stats["prompt_lens"], "| transitions:", stats["transitions"])
alone = [dream_generate(optimized, prompt[None], **kwargs)[0, -6:] for prompt in prompts]
print("each row as alone:", all(torch.equal(batched[row, -6:], alone[row]) for row in range(3)))

llada = tiny_llada(layers=2, hidden=64)
cfg = maskkv_compile.optimize(llada, budget=4, backend="eager")
x = torch.cat([prompts[1][None], torch.full((1, 6), llada.config.mask_token_id)], dim=1)
for _ in range(6):  # LLaDA's CFG: the unconditional row is x with its prompt masked
    un_x = x.clone()
    un_x[:, : len(prompts[1])] = llada.config.mask_token_id
    logits, un_logits = torch.chunk(cfg(torch.cat([x, un_x])).logits, 2)
    logits = un_logits + 2.0 * (logits - un_logits)
    masked = (x[0] == llada.config.mask_token_id).nonzero().flatten()
    confidence, token = logits[0, masked].softmax(-1).max(-1)
    x[0, masked[confidence.argmax()]] = token[confidence.argmax()]
print(
    "CFG in one batch:",
    cfg.cache_stats()["transitions"],
    "| unconditional row's prompt:",
    cfg.cache_stats()["prompt_lens"][1],
    "masks",
)
