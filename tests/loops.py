"""Denoising loops written the way their authors' released code drives a model: they know
nothing about MaskKV and call ``model(x).logits`` on the whole sequence every step."""

import torch


@torch.no_grad()
def llada_loop(
    model,
    prompt: torch.Tensor,
    mask_id: int,
    gen_length: int,
    steps: int,
    cfg_scale: float = 0.0,
    batched_cfg: bool = True,
    **forward_kwargs,
) -> torch.Tensor:
    """LLaDA's loop (one block, low-confidence remasking, greedy). With ``cfg_scale > 0`` the
    unconditional input is ``x`` with the prompt masked: one batch ``cat([x, un_x])`` as LLaDA's
    released ``generate`` does, or two calls (``batched_cfg=False``)."""
    batch, prompt_len = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=prompt.dtype)], dim=1)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :prompt_len] = True
    per_step = [gen_length // steps + (i < gen_length % steps) for i in range(steps)]
    for count in per_step:
        mask_index = x == mask_id
        if cfg_scale > 0:
            un_x = x.clone()
            un_x[prompt_index] = mask_id
            if batched_cfg:
                logits, un_logits = torch.chunk(
                    model(torch.cat([x, un_x]), **forward_kwargs).logits, 2, dim=0
                )
            else:
                logits, un_logits = (
                    model(x, **forward_kwargs).logits,
                    model(un_x, **forward_kwargs).logits,
                )
            logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
        else:
            logits = model(x, **forward_kwargs).logits
        probs = torch.softmax(logits.double(), dim=-1)
        x0 = logits.argmax(-1)
        confidence = torch.where(
            mask_index, probs.gather(-1, x0[..., None]).squeeze(-1), float("-inf")
        )
        for row in range(batch):
            picked = confidence[row].topk(count).indices
            x[row, picked] = x0[row, picked]
    return x
