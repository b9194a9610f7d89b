"""LLaDA's sampling loop (semi-autoregressive low-confidence remasking), for any model
whose ``model(x).logits`` gives (B, S, V) logits, MaskKV or not.

Behaviour, as LLaDA documents it (Nie et al. 2025, "Large Language Diffusion Models"):
  * the response (``gen_length`` masks after the prompt) is split into blocks of
    ``block_length`` denoised left to right; ``steps`` are shared equally by the blocks;
  * in a block, step i unmasks n_i tokens: the block's masks divided by its steps, the
    remainder going one each to the first steps;
  * every step predicts all masked positions (argmax of the logits, after Gumbel noise in
    float64 when ``temperature > 0``), scores each prediction (``low_confidence``: its
    softmax probability; ``random``: a uniform draw), forbids positions after the current
    block, and commits the n_i best-scored masked positions;
  * ``cfg_scale > 0``: classifier-free guidance against the same sequence with the prompt
    masked, ``uncond + (cfg_scale + 1) * (cond - uncond)``.

Difference, stated: random draws (Gumbel noise, ``random`` scores) cover the response
positions only, so seeded samples differ from a loop that draws over the whole sequence.
The conditional and unconditional passes go in one batch of 2B, as in LLaDA's loop (the
unconditional rows are read as masked copies of the conditional ones, ``layout.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

REMASKING = ("low_confidence", "random")


def transfer_schedule(masks_per_row: torch.Tensor, steps: int) -> torch.Tensor:
    """(B,) mask counts -> (B, steps) tokens to unmask per step, remainder on the first steps."""
    base = masks_per_row // steps
    remainder = masks_per_row % steps
    schedule = base[:, None].expand(-1, steps).clone()
    schedule += (
        torch.arange(steps, device=masks_per_row.device)[None, :] < remainder[:, None]
    ).long()
    return schedule


def gumbel_perturb(
    logits: torch.Tensor, temperature: float, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """exp(logits) / (-log u)^temperature in float64; argmax of it samples at ``temperature``."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    uniform = torch.rand(
        logits.shape, dtype=torch.float64, device=logits.device, generator=generator
    )
    return logits.exp() / (-torch.log(uniform)) ** temperature


def check_prompt(prompt: torch.Tensor, mask_token_id: int, loop: str = "generate()") -> None:
    """(batch, prompt_len) integer ids without the mask token; ``loop`` names the caller in
    errors."""
    if (
        not isinstance(prompt, torch.Tensor)
        or prompt.dim() != 2
        or prompt.is_floating_point()
        or prompt.is_complex()
    ):
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(
            f"input_ids must be (batch, prompt_len) token ids, got {shape} "
            f"{getattr(prompt, 'dtype', '')}"
        )
    if bool((prompt == mask_token_id).any()):
        raise ValueError(
            f"the prompt contains the mask token {mask_token_id}; the response "
            f"is appended by {loop}"
        )


def check_positive_ints(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _validate(
    prompt, mask_token_id, gen_length, steps, block_length, temperature, cfg_scale, remasking
):
    check_prompt(prompt, mask_token_id)
    check_positive_ints(gen_length=gen_length, steps=steps, block_length=block_length)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})"
        )
    if steps % (gen_length // block_length):
        raise ValueError(
            f"steps ({steps}) must be a multiple of the number of blocks "
            f"({gen_length // block_length})"
        )
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature and cfg_scale must be >= 0, got {temperature}, {cfg_scale}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")


def _response_logits(model, x: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of the response rows (B, L, V): full-sequence logits are sliced, and a MaskKV
    model inside ``response_logits_only`` already returns its response rows."""
    logits = model(x).logits
    return logits[:, prompt_len:] if logits.shape[1] == x.shape[1] else logits


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    gen_length: int = 128,
    steps: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Fill ``gen_length`` masks after ``input_ids``; returns (B, prompt_len + gen_length)."""
    from maskkv_compile.runtime import response_logits_only

    _validate(
        input_ids, mask_token_id, gen_length, steps, block_length, temperature, cfg_scale, remasking
    )
    batch, prompt_len = input_ids.shape
    x = torch.full(
        (batch, prompt_len + gen_length),
        mask_token_id,
        dtype=input_ids.dtype,
        device=input_ids.device,
    )
    x[:, :prompt_len] = input_ids
    response = x[:, prompt_len:]  # a view: committing into it updates x
    steps_per_block = steps // (gen_length // block_length)
    with response_logits_only():
        for block_start in range(0, gen_length, block_length):
            block_end = block_start + block_length
            schedule = transfer_schedule(
                (response[:, block_start:block_end] == mask_token_id).sum(1), steps_per_block
            )
            for step in range(steps_per_block):
                if cfg_scale > 0:  # one batch [x ; x with the prompt masked], as LLaDA's loop does
                    unconditional = x.clone()
                    unconditional[:, :prompt_len] = mask_token_id
                    both = _response_logits(model, torch.cat([x, unconditional]), prompt_len)
                    logits, uncond_logits = both.chunk(2)
                    logits = uncond_logits + (cfg_scale + 1) * (logits - uncond_logits)
                else:
                    logits = _response_logits(model, x, prompt_len)
                predicted = gumbel_perturb(logits, temperature, generator).argmax(-1)  # (B, L)
                if remasking == "low_confidence":
                    probs = torch.softmax(logits, dim=-1)
                    score = probs.gather(-1, predicted[..., None]).squeeze(-1)
                else:
                    score = torch.rand(predicted.shape, device=x.device, generator=generator)
                masked = response == mask_token_id
                score = score.to(torch.float64)
                score[:, block_end:] = float("-inf")
                score = torch.where(masked, score, float("-inf"))
                for row in range(batch):
                    count = int(schedule[row, step])
                    if count:
                        chosen = torch.topk(score[row], count).indices
                        response[row, chosen] = predicted[row, chosen]
    return x
