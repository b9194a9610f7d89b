"""Dream's sampling loop (Ye et al. 2025, "Dream 7B"), for any model whose
``model(x, attention_mask=..., position_ids=...).logits`` gives (B, S, V) logits with Dream's
convention: NOT shifted by the model, token i is predicted at row i-1 (the loop shifts).

Behaviour, as Dream's ``diffusion_generate`` documents it:
  * ``x`` is the prompt followed by ``max_new_tokens`` masks; ``steps`` steps walk the
    timesteps ``linspace(1, eps, steps + 1)``; at step i, ``t, s = timesteps[i], timesteps[i+1]``;
  * every step predicts every masked position from the row before it, after temperature,
    top-p and top-k filtering (temperature 0: the most probable token);
  * ``alg="origin"``: each masked position is unmasked with probability ``1 - s/t`` (1 at the
    last step), independently, with a freshly sampled token;
  * ``maskgit_plus`` / ``topk_margin`` / ``entropy``: every masked position gets a token and a
    confidence (its probability / top-1 minus top-2 probability / negative entropy); the step
    unmasks ``int(masked * (1 - s/t))`` positions (all of them at the last step): the most
    confident ones, or, with ``alg_temp > 0``, positions drawn from ``softmax(conf / alg_temp)``;
  * padding: ``attention_mask`` (B, P) 0/1 marks LEFT padding; positions are
    ``cumsum(mask) - 1`` (pads get 1) and pad keys are masked out.

Differences from Dream's released loop, stated:
  * the model is called as ``model(x)`` without padding, and as ``model(x, attention_mask=m,
    position_ids=p)`` with a 2-D key-padding mask ``m`` (B, S) with padding; Dream passes
    ``"full"`` / a ``[B, 1, S, S]`` bool mask and positions positionally. The real rows see
    the same keys either way (pad keys are masked); only the unread pad rows differ;
  * the unmasking count is per row, from that row's masks; Dream uses the batch's mean
    masks per row. They are equal unless the model predicts the mask token itself: the
    prompt may not contain it, so every row starts with ``max_new_tokens`` masks and loses
    the same number each step (a committed mask-id prediction stays a mask, as in Dream);
  * temperature sampling is Gumbel-max in float64 on ``generator`` (the same distribution
    as a categorical draw, a different random stream), and ``alg_temp`` position draws cover
    each row's response only: seeded samples there differ from Dream's. ``origin``'s
    transfer draws are ``torch.rand(number of masks)`` in row-major order, as in Dream, so
    with ``generator=None``, the same global seed and temperature 0 it gives Dream's tokens;
  * negative entropy is computed exactly (``xlogy``: 0 log 0 = 0); a loop that regularises
    the log (``log(p + tiny)``) can order near-ties differently;
  * only the response's logits rows are read, and a step with no mask left calls nothing.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from maskkv_compile.generate import check_positive_ints, check_prompt, gumbel_perturb
from maskkv_compile.runtime import response_logits_only

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate(
    input_ids,
    mask_token_id,
    attention_mask,
    max_new_tokens,
    steps,
    alg,
    temperature,
    top_p,
    top_k,
    alg_temp,
    eps,
    generator,
):
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
        raise ValueError(f"mask_token_id must be an int, got {mask_token_id!r}")
    check_prompt(input_ids, mask_token_id, loop="dream_generate()")
    if input_ids.shape[1] == 0:
        raise ValueError(
            "the prompt is empty: Dream predicts the first response token from the last prompt row"
        )
    check_positive_ints(max_new_tokens=max_new_tokens, steps=steps)
    if alg not in ALGS:
        raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
    if not _is_number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if top_k is not None:
        check_positive_ints(top_k=top_k)
    if alg_temp is not None and (not _is_number(alg_temp) or alg_temp < 0):
        raise ValueError(f"alg_temp must be None or a number >= 0, got {alg_temp!r}")
    if not _is_number(eps) or not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(
        input_ids.shape
    ):
        shape = (
            tuple(attention_mask.shape)
            if isinstance(attention_mask, torch.Tensor)
            else type(attention_mask).__name__
        )
        raise ValueError(
            "attention_mask must be a tensor shaped like input_ids "
            f"{tuple(input_ids.shape)}, got {shape}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt tokens)")
    ones = attention_mask.long()
    if bool((ones[:, 1:] < ones[:, :-1]).any()) or not bool(ones[:, -1].all()):
        raise ValueError(
            "attention_mask must be LEFT padding: zeros, then ones up to the last "
            "column, in every row"
        )


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens until their probability mass exceeds top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = torch.cat(
        [torch.zeros_like(cumulative[..., :1], dtype=torch.bool), cumulative[..., :-1] > top_p], -1
    )
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_best, float("-inf"))


def sample_with_confidence(
    logits: torch.Tensor,
    *,
    alg: str,
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
):
    """(M, V) logits -> (confidence (M,), token (M,)) after temperature, top-p and top-k.

    The token is the most probable one at temperature 0, else a Gumbel-max draw; the
    confidence is its probability (``origin``, ``maskgit_plus``), the top-1 minus top-2
    probability (``topk_margin``) or the negative entropy (``entropy``).
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _filter_top_p(logits, top_p)
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = gumbel_perturb(torch.log_softmax(logits, dim=-1), 1.0, generator).argmax(-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if alg == "topk_margin":
        best = probs.topk(min(2, probs.shape[-1]), dim=-1).values
        confidence = best[:, 0] - (best[:, 1] if best.shape[-1] > 1 else 0)
    elif alg == "entropy":
        confidence = torch.special.xlogy(probs, probs).sum(-1)
    return confidence, tokens


def _shifted_response_logits(
    model, x: torch.Tensor, prompt_len: int, model_kwargs: dict
) -> torch.Tensor:
    """The predictions of the response (B, L, V): rows prompt_len-1 .. S-2 of the model's
    (B, S, V) logits; a MaskKV model inside ``response_logits_only`` returns them already."""
    with response_logits_only():
        logits = model(x, **model_kwargs).logits
    response_len = x.shape[1] - prompt_len
    if logits.dim() == 3 and tuple(logits.shape[:2]) == (x.shape[0], response_len):
        return logits
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(
            "the model must return (batch, seq, vocab) logits for every row of x "
            f"{tuple(x.shape)}, got {tuple(logits.shape)}"
        )
    return logits[:, prompt_len - 1 : x.shape[1] - 1]


@torch.no_grad()
def dream_generate(
    model,
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: int = 128,
    steps: int = 128,
    alg: str = "entropy",
    temperature: float = 0.0,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    alg_temp: Optional[float] = None,
    eps: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Fill ``max_new_tokens`` masks after ``input_ids`` (B, P), left-padded where
    ``attention_mask`` is 0; returns (B, P + max_new_tokens) ids, padding kept."""
    _validate(
        input_ids,
        mask_token_id,
        attention_mask,
        max_new_tokens,
        steps,
        alg,
        temperature,
        top_p,
        top_k,
        alg_temp,
        eps,
        generator,
    )
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    x = torch.full(
        (batch, prompt_len + max_new_tokens), mask_token_id, dtype=input_ids.dtype, device=device
    )
    x[:, :prompt_len] = input_ids
    response = x[:, prompt_len:]  # a view: writing into it updates x
    model_kwargs = {}
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = torch.ones(batch, max_new_tokens, dtype=torch.long, device=device)
        keys = torch.cat([attention_mask.to(device=device, dtype=torch.long), padding], dim=1)
        model_kwargs = {
            "attention_mask": keys,
            "position_ids": (keys.cumsum(-1) - 1).masked_fill(keys == 0, 1),
        }
    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
    for i in range(steps):
        masked = response == mask_token_id
        masks_per_row = masked.sum(1).tolist()
        if not any(masks_per_row):
            continue
        logits = _shifted_response_logits(model, x, prompt_len, model_kwargs)
        ratio = (
            1.0 if i == steps - 1 else 1 - timesteps[i + 1] / timesteps[i]
        )  # share of the masks to unmask
        if alg == "origin":
            draws = torch.rand(sum(masks_per_row), device=device, generator=generator)
            chosen = torch.zeros_like(masked)
            chosen[masked] = draws < ratio
            if bool(chosen.any()):
                response[chosen] = sample_with_confidence(logits[chosen], alg=alg, **sampling)[
                    1
                ].to(x.dtype)
            continue
        confidence, tokens = sample_with_confidence(logits[masked], alg=alg, **sampling)
        scores = torch.full(masked.shape, float("-inf"), dtype=confidence.dtype, device=device)
        scores[masked] = confidence
        proposal = torch.full_like(response, mask_token_id)
        proposal[masked] = tokens.to(x.dtype)
        for row, masks in enumerate(masks_per_row):
            count = masks if i == steps - 1 else int(masks * ratio)
            if count == 0:
                continue
            if alg_temp:
                picked = torch.multinomial(
                    torch.softmax(scores[row] / alg_temp, -1), count, generator=generator
                )
            else:
                picked = torch.topk(scores[row], count).indices
            response[row, picked] = proposal[row, picked]
    return x
