"""Reference block-diffusion loops for tests (issue 23), uncached.

* :func:`block_causal_mask`: the 4-D block-causal mask these loops (and LLaDA2's) build.
* :func:`sdar_generate`: an SDAR-style drop-in loop for any HF causal LM made bidirectional
  (``is_causal=False``): called on the growing window ``[prompt ; finished blocks ; current
  block]`` with a block-causal 4-D mask and explicit position ids, ``model(x, attention_mask=...,
  position_ids=...)``.
* ``tiny_qwen2`` / ``tiny_qwen3`` (from ``maskkv_compile.tiny_models``): random-weight Qwen2 / Qwen3
  causal LMs switched to ``is_causal=False``.
* :func:`tiny_self_blocked_qwen3`: a Qwen3 that builds its block-causal mask inside ``forward``
  from a ``block_size`` in its config when called without one (Fast-dLLM v2- and SDAR-style
  modeling code); ``sdar_generate(..., mask_kind="none")`` calls it so.

LLaDA2's own loop (with LLaDA2.1 editing as an option) is ``LLaDA2StyleModel.generate`` in
``maskkv_compile/llada2_standin.py``.

Conventions (from SDAR's and LLaDA2's released generation code, read, not copied): the block grid
starts at position 0, the prompt occupies ``[0, P)`` and the generated tokens follow at once (the
block holding the prompt's tail is shared, its prompt tokens are never rewritten), the first
block decoded is ``P // block_length``; position ids are ``arange``; logits are read at the
same positions (no shift); the transfer schedule is ``block_length // steps`` per step with the
remainder on the first steps; ``low_confidence_static`` commits the top-k masked positions by
probability, ``low_confidence_dynamic`` commits every masked position above ``threshold`` when
there are at least k of them, else the top k. The released SDAR loop feeds only the current block
against a KV cache of the finished blocks; this reference recomputes the whole window each step
(what MaskKV is meant to make cheap), which gives the same logits for the current block because
the mask is block-causal.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from maskkv_compile.sdar_standin import num_transfer_tokens, select_transfer
from maskkv_compile.tiny_models import tiny_dream as tiny_qwen2  # noqa: F401  (a Qwen2, bidirectional)
from maskkv_compile.tiny_models import tiny_qwen3  # noqa: F401


def tiny_self_blocked_qwen3(block_size: int, from_tokens: bool = False, **options):
    """``tiny_qwen3(**options)`` (same weights) whose forward, called without an attention
    mask, makes the additive block-causal mask of blocks of ``config.block_size`` on the grid
    from 0 for the call's length (``from_tokens``: and hides the keys holding token 0, a mask
    that reads the tokens' values)."""
    from transformers import Qwen3ForCausalLM

    class SelfBlockedQwen3(Qwen3ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is None:
                pos = torch.arange(input_ids.shape[1], device=input_ids.device)
                blocks = pos // self.config.block_size
                allowed = blocks[None, :] <= blocks[:, None]  # (S, S)
                if from_tokens:
                    allowed = allowed & (input_ids[0] != 0)[None, :]
                attention_mask = torch.zeros((), dtype=self.dtype, device=pos.device).masked_fill(
                    ~allowed, float("-inf")
                )[None, None]  # (1, 1, S, S)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    base = tiny_qwen3(**options)
    base.config.block_size = block_size
    model = SelfBlockedQwen3(base.config).to(base.dtype)
    model.load_state_dict(base.state_dict())
    return model.eval()


def block_ids(
    length: int, block: int, prompt_len: Optional[int] = None, device=None
) -> torch.Tensor:
    """The block index of each position: ``pos // block`` on the grid from 0, or, with
    ``prompt_len``, block 0 is the whole prompt and blocks of ``block`` follow it."""
    pos = torch.arange(length, device=device)
    if prompt_len is None:
        return pos // block
    return torch.where(pos < prompt_len, torch.zeros_like(pos), (pos - prompt_len) // block + 1)


def block_causal_mask(
    length: int,
    block: int,
    prompt_len: Optional[int] = None,
    *,
    dtype=torch.float32,
    kind: str = "additive",
    padding: Optional[torch.Tensor] = None,
    query_start: int = 0,
    device=None,
) -> torch.Tensor:
    """A ``[B or 1, 1, length - query_start, length]`` block-causal mask.

    Query i may attend key j iff ``block(j) <= block(i)`` (its own block both ways, every earlier
    block, never a later one); blocks as in :func:`block_ids`. ``kind="additive"`` gives 0 / -inf
    in ``dtype`` (what LLaDA2's ``tril(...).log()`` gives), ``kind="bool"`` gives True = attend.
    ``padding`` (``[B, length]``, 1 = real token) removes padded keys; each query keeps its own key
    so no row is empty (an all -inf row would give NaN). ``query_start`` keeps only the rows from
    there on (the current block's rows against the whole window, as a KV-cached caller passes).
    """
    if kind not in ("additive", "bool"):
        raise ValueError(f"kind must be 'additive' or 'bool', got {kind!r}")
    ids = block_ids(length, block, prompt_len, device=device)
    allowed = (ids[None, :] <= ids[:, None])[None, None]
    if padding is not None:
        if padding.shape[-1] != length:
            raise ValueError(f"padding has {padding.shape[-1]} positions, the mask {length}")
        allowed = allowed & padding.to(device=allowed.device).bool()[:, None, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=allowed.device)[None, None]
    allowed = allowed[:, :, query_start:, :]
    if kind == "bool":
        return allowed
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
):
    """(token, probability) per row: argmax at temperature 0, else filtered multinomial."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if temperature == 0:
        probs = F.softmax(flat, dim=-1)
        tok = flat.argmax(-1, keepdim=True)
    else:
        flat = flat / temperature
        if top_k:
            flat = flat.masked_fill(flat < flat.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
        if top_p is not None and top_p < 1.0:
            srt, order = flat.sort(dim=-1, descending=True)
            drop = F.softmax(srt, dim=-1).cumsum(-1) > top_p
            drop[..., 1:] = drop[..., :-1].clone()
            drop[..., 0] = False
            flat = flat.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        probs = F.softmax(flat, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator)
    return tok.view(logits.shape[:-1]), probs.gather(-1, tok).view(logits.shape[:-1])


@torch.no_grad()
def sdar_generate(
    model,
    prompt: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    mask_id: int,
    steps: Optional[int] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    remasking: str = "low_confidence_static",
    threshold: float = 0.9,
    mask_kind: str = "additive",
    mask_dtype: Optional[torch.dtype] = None,
    attention_mask: Optional[torch.Tensor] = None,
    eos_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    call: Optional[Callable] = None,
    shift: int = 0,
) -> torch.Tensor:
    """SDAR-style block diffusion on the growing window; returns ``[B, P + gen_length]``.
    ``shift=1``: Fast-dLLM v2's token shift, each block position's logits are read one row
    earlier (the block's first token at the last row of the finished blocks).

    Each step calls ``call(x_window, attention_mask=mask4d_window, position_ids=pos_window)``
    (default ``model(...)``; ``mask_kind="none"``: no mask, the model makes its blocks) and
    reads the last ``block_length`` rows of ``.logits``.
    ``attention_mask`` (``[B, P]``, 1 = real) marks left padding of the prompts; the padded keys
    are removed from the mask (position ids stay ``arange``, as in diffusers' LLaDA2 pipeline).
    ``steps`` defaults to ``block_length``. Stops after a block when every row holds ``eos_id``.
    """
    if remasking not in ("low_confidence_static", "low_confidence_dynamic"):
        raise ValueError(f"unknown remasking {remasking!r}")
    call = call if call is not None else model
    steps = steps or block_length
    device = prompt.device
    bsz, p = prompt.shape
    num_blocks = (p + gen_length + block_length - 1) // block_length
    total = num_blocks * block_length
    if mask_dtype is None:
        mask_dtype = next(model.parameters()).dtype
    padding = None
    if attention_mask is not None:
        padding = torch.ones(bsz, total, dtype=torch.long, device=device)
        padding[:, :p] = attention_mask.to(device)
    if mask_kind == "none" and attention_mask is not None:
        raise ValueError("mask_kind='none' calls the model without a mask: no padding")
    mask = block_causal_mask(
        total,
        block_length,
        dtype=mask_dtype,
        kind="bool" if mask_kind == "none" else mask_kind,
        padding=padding,
        device=device,
    )
    position_ids = torch.arange(total, device=device)[None].expand(bsz, -1)
    x = torch.full((bsz, total), mask_id, dtype=torch.long, device=device)
    x[:, :p] = prompt
    schedule = num_transfer_tokens(block_length, steps)
    for b in range(p // block_length, num_blocks):
        end = (b + 1) * block_length
        for step in range(steps):
            block = x[:, end - block_length : end]
            masked = block == mask_id
            if not masked.any():
                break
            window = {"position_ids": position_ids[:, :end]}
            if mask_kind != "none":  # "none": the model makes its own blocks
                window["attention_mask"] = mask[:, :, :end, :end]
            logits = call(x[:, :end], **window).logits
            read = (torch.arange(end - block_length, end, device=device) - shift).clamp(min=0)
            x0, p0 = sample_tokens(logits[:, read], temperature, top_k, top_p, generator)
            conf = torch.where(masked, p0, torch.full_like(p0, -torch.inf))
            transfer = select_transfer(conf, masked, int(schedule[step]), remasking, threshold)
            block[transfer] = x0[transfer]
        if eos_id is not None and bool((x[:, p:end] == eos_id).any(-1).all()):
            break
    return x[:, : p + gen_length]
