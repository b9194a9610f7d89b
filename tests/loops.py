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


@torch.no_grad()
def block_loop(
    model,
    prompt: torch.Tensor,
    mask_id: int,
    gen_length: int,
    block_length: int,
    per_step: int = 1,
    before_call=None,
    check=None,
) -> torch.Tensor:
    """LLaDA's semi-autoregressive loop, drop-in: blocks of ``block_length`` left to right,
    ``per_step`` most confident masked positions of the current block committed per call.
    ``before_call(step)`` runs before each call (to lose the session, say); ``check(x, logits,
    block)`` sees every call's input, logits and the current block's positions."""
    batch, prompt_len = prompt.shape
    x = torch.cat([prompt, torch.full((batch, gen_length), mask_id, dtype=prompt.dtype)], dim=1)
    step = 0
    for start in range(prompt_len, prompt_len + gen_length, block_length):
        block = torch.arange(start, start + block_length)
        while bool((x[:, block] == mask_id).any()):
            if before_call is not None:
                before_call(step)
            logits = model(x).logits
            if check is not None:
                check(x, logits, block)
            confidence = torch.softmax(logits.double(), -1).amax(-1)  # (B, S)
            predicted = logits.argmax(-1)
            for row in range(batch):
                masked = block[x[row, block] == mask_id]
                if masked.numel():
                    picked = masked[
                        confidence[row, masked].topk(min(per_step, masked.numel())).indices
                    ]
                    x[row, picked] = predicted[row, picked]
            step += 1
    return x


def interleaved(generators) -> list:
    """Run loops written as generators (each yields after every model call) a call each in
    turn, as a server serves requests; their return values."""
    results, live = [None] * len(generators), dict(enumerate(generators))
    while live:
        for i, gen in list(live.items()):
            try:
                next(gen)
            except StopIteration as done:
                results[i] = done.value
                del live[i]
    return results
