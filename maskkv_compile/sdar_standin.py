"""A small SDAR-style block-diffusion model and the model calls of SDAR's released loop (random
weights): what the tests, the block-diffusion example and ``scripts/bench_cached_loop.py`` run
MaskKV's cached-loop protocol (``kv_loop.py``) against, as ``llada2_standin`` does for LLaDA2.

Written from SDAR's released ``generate.py`` and ``modeling_sdar.py`` (read, not copied;
``docs/kv_loops.md``). SDAR is a Qwen3 whose attention takes a cache flag:

* :func:`tiny_sdar`: ``tiny_qwen3`` (same weights) whose ``forward(..., past_key_values=cache,
  store_kv=...)`` reads the cache and stores the call's K/V in it only with ``store_kv=True``
  (with ``store_kv=False`` the cache is cropped back after the call: read, never written), and
  reads a 3-D ``(1, q, k)`` 1/0 mask as 1 = attend (SDAR's attention casts it to bool). Without
  a cache and a mask it is the bidirectional Qwen3. The released model also picks flash-attn or
  SDPA by testing the mask's values, a branch dynamo cannot trace; this stand-in has one path.
* :func:`sdar_cached_generate`: the loop's model calls, greedy, batch without padding.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from maskkv_compile.tiny_models import tiny_qwen3


def tiny_sdar(**options):
    """``tiny_qwen3(**options)`` with SDAR's cache protocol (see the module docstring)."""
    from transformers import Qwen3ForCausalLM

    class SdarStyleQwen3(Qwen3ForCausalLM):
        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            use_cache=None,
            store_kv=False,
            **kwargs,
        ):
            if attention_mask is not None and attention_mask.dim() == 3:
                attention_mask = attention_mask.bool()[:, None]  # (1, 1, q, k), True = attend
            held = 0 if past_key_values is None else past_key_values.get_seq_length()
            out = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            keep_if_stored(past_key_values, held, store_kv)
            return out

    return with_weights_of(tiny_qwen3(**options), SdarStyleQwen3)


def keep_if_stored(cache, held: int, store: bool) -> None:
    """After a call on ``cache`` that held ``held`` tokens: keep what the call appended only if
    the call stores (a read call's K/V are dropped again)."""
    grown = 0 if cache is None else cache.get_seq_length() - held
    if grown and not store:
        cache.crop(-grown)  # transformers 5: a negative count drops the last ones


def with_weights_of(base: torch.nn.Module, model_class) -> torch.nn.Module:
    """``model_class`` (a subclass of ``base``'s class that adds a cache protocol) with ``base``'s
    configuration and weights, in eval mode."""
    model = model_class(base.config).to(base.dtype)
    model.load_state_dict(base.state_dict())
    return model.eval()


@torch.no_grad()
def sdar_cached_generate(
    model,
    prompt: torch.Tensor,
    *,
    gen_length: int,
    block_length: int,
    mask_id: int,
    steps: Optional[int] = None,
    remasking: str = "low_confidence_static",
    threshold: float = 0.9,
    call: Optional[Callable] = None,
) -> torch.Tensor:
    """SDAR's ``block_diffusion_generate``, greedy, for a batch without padding; returns
    ``[B, P + gen_length]``.

    The canvas is ``[prompt ; masks]`` on the block grid from 0; one ``DynamicCache`` per
    generation. The prompt's whole blocks are prefilled with ``store_kv=True``; then, per block,
    the block alone is sent with ``store_kv=False`` and the mask rows of the block against every
    key up to its end (all ones), its logits read at the same positions, until no mask is left;
    then the finished block is sent once more with ``store_kv=True`` (its logits unread). Each
    step commits ``block_length // steps`` masked positions (the remainder on the first steps):
    the most confident (``low_confidence_static``), or every one above ``threshold`` when there
    are that many (``low_confidence_dynamic``). The 1/0 float mask is the block ``tril`` of the
    whole canvas, sliced. ``call`` (default ``model``) is what the loop calls."""
    from transformers import DynamicCache

    if remasking not in ("low_confidence_static", "low_confidence_dynamic"):
        raise ValueError(f"unknown remasking {remasking!r}")
    call = call if call is not None else model
    steps = steps or block_length
    batch, p = prompt.shape
    blocks = (p + gen_length + block_length - 1) // block_length
    total = blocks * block_length
    grid = torch.arange(total, device=prompt.device) // block_length
    dtype = next(model.parameters()).dtype
    mask = (grid[None, :] <= grid[:, None]).to(dtype)[None]  # (1, T, T), 1 = attend
    positions = torch.arange(total, device=prompt.device)[None]
    x = torch.full((batch, total), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    cache = DynamicCache()
    kv = dict(past_key_values=cache, use_cache=True)
    whole = p // block_length * block_length
    if whole:
        call(
            x[:, :whole],
            attention_mask=mask[:, :whole, :whole],
            position_ids=positions[:, :whole],
            store_kv=True,
            **kv,
        )
    schedule = num_transfer_tokens(block_length, steps).tolist()
    for b in range(p // block_length, blocks):
        start, end = b * block_length, (b + 1) * block_length
        window = dict(attention_mask=mask[:, start:end, :end], position_ids=positions[:, start:end])
        for step in range(steps + 1):
            block = x[:, start:end]
            masked = block == mask_id
            if not masked.any():
                call(block, store_kv=True, **window, **kv)
                break
            logits = call(block, store_kv=False, **window, **kv).logits
            confidence, token = logits.float().softmax(-1).max(-1)  # (B, block)
            confidence = confidence.masked_fill(~masked, -torch.inf)
            n = schedule[min(step, steps - 1)]
            transfer = select_transfer(confidence, masked, n, remasking, threshold)
            block[transfer] = token[transfer]
    return x[:, : p + gen_length]


def num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
    """The (steps,) tokens committed per step of a block: ``block_length // steps``, the
    remainder on the first steps (LLaDA2's and SDAR's schedule)."""
    out = torch.full((steps,), block_length // steps, dtype=torch.int64)
    out[: block_length % steps] += 1
    return out


def select_transfer(
    confidence: torch.Tensor, masked: torch.Tensor, n: int, remasking: str, threshold: float
) -> torch.Tensor:
    """The (B, block) positions a step commits, from the confidence of each position's token
    (``-inf`` where the block holds no mask): per row the ``n`` most confident masked ones
    (``low_confidence_static``), or every one above ``threshold`` when there are at least ``n``
    (``low_confidence_dynamic``)."""
    transfer = torch.zeros_like(masked)
    for row in range(masked.shape[0]):
        if remasking == "low_confidence_dynamic":
            high = confidence[row] > threshold
            if int(high.sum()) >= n:
                transfer[row] = high
                continue
        k = min(n, int(masked[row].sum()))
        if k > 0:
            transfer[row, confidence[row].topk(k).indices] = True
    return transfer
