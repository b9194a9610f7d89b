"""A small Fast-dLLM-v2-style block-diffusion model and the model calls of its released cached
loop, ``batch_sample`` (random weights): what the tests run MaskKV's cached-loop protocol
(``kv_loop.py``) against, as ``sdar_standin`` does for SDAR.

Written from reading Fast-dLLM v2's released model file and sampler (``docs/kv_loops.md``,
section 2; read, not copied). Fast-dLLM v2 is a Qwen2.5 with a token shift (row i predicts
token i + 1) whose forward makes its own mask and positions from the cache's length:

* :func:`tiny_fastdllm`: ``tiny_dream`` (a bidirectional Qwen2, same weights) whose
  ``forward(input_ids, past_key_values=None, use_cache=..., update_past_key_values=False,
  block_size=32)`` puts the call at positions ``[P, P + n)`` after the ``P`` tokens its cache
  holds, masks it block-causally on the grid of ``block_size`` (a query sees a key when the
  key's block is not after its own), makes a ``DynamicCache`` when given none with
  ``use_cache``, and stores the call's K/V only with ``update_past_key_values=True`` (else the
  cache is cropped back after the call). Any ``attention_mask`` passed is replaced, as the
  released model does in eval. Its block cache: a call with ``use_block_cache=True`` and no
  ``block_past_key_values`` (a refresh, the whole block) also returns the block's K/V in
  ``block_past_key_values``; a call with one (a small-block call, ``replace_position`` its
  offset in the block) writes its K/V into that buffer in place and its rows see the stored
  keys and the whole buffer (the block's other small blocks as of the last refresh).
* :func:`fastdllm_cached_generate`: the loop's model calls, greedy, with or without the block
  cache.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from maskkv_compile.kv_loop import FAST_DLLM_DEFAULT_BLOCK
from maskkv_compile.sdar_standin import keep_if_stored, with_weights_of
from maskkv_compile.tiny_models import tiny_dream


def tiny_fastdllm(**options):
    """``tiny_dream(**options)`` with Fast-dLLM v2's cache protocol (module docstring)."""
    from transformers import DynamicCache, Qwen2ForCausalLM

    class BufferView(DynamicCache):
        """The keys of a small-block call: [the stored K/V ; the block buffer], the call's K/V
        written into the buffer at ``at`` first (in place: the buffer keeps them)."""

        def __init__(self, stored, buffer, at: int):
            super().__init__()
            self.stored, self.buffer, self.at = stored, buffer, at

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return self.stored.get_seq_length(layer_idx)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = self.buffer.layers[layer_idx].keys, self.buffer.layers[layer_idx].values
            end = self.at + key_states.shape[2]
            keys[:, :, self.at : end], values[:, :, self.at : end] = key_states, value_states
            if self.stored.get_seq_length(layer_idx) == 0:
                return keys, values
            layer = self.stored.layers[layer_idx]
            return torch.cat([layer.keys, keys], dim=2), torch.cat([layer.values, values], dim=2)

    def block_kv(cache, held: int):
        """A cache of what the call appended to ``cache`` after its first ``held`` tokens."""
        block = DynamicCache()
        for i, layer in enumerate(cache.layers):
            block.update(layer.keys[:, :, held:].clone(), layer.values[:, :, held:].clone(), i)
        return block

    class FastDllmStyleQwen2(Qwen2ForCausalLM):
        def forward(
            self,
            input_ids=None,
            attention_mask=None,
            position_ids=None,
            past_key_values=None,
            use_cache=None,
            update_past_key_values=False,
            block_size=FAST_DLLM_DEFAULT_BLOCK,  # the released forward's default
            use_block_cache=False,
            block_past_key_values=None,
            replace_position=0,
            **kwargs,
        ):
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=self.config)
            held = 0 if past_key_values is None else past_key_values.get_seq_length()
            n = input_ids.shape[1]
            device = input_ids.device
            small_block = use_block_cache and block_past_key_values is not None
            if small_block:  # every row sees the stored keys and the whole buffer
                width = block_past_key_values.get_seq_length()
                query = torch.arange(n, device=device) + held + replace_position
                allowed = torch.ones(n, held + width, dtype=torch.bool, device=device)
                cache = BufferView(past_key_values, block_past_key_values, replace_position)
            else:
                query = torch.arange(held, held + n, device=device)  # (n,) positions
                key = torch.arange(held + n, device=device)  # (P + n,)
                allowed = (key[None, :] // block_size) <= (query[:, None] // block_size)
                cache = past_key_values
            if position_ids is None:
                position_ids = query[None]
            out = super().forward(
                input_ids=input_ids,
                attention_mask=allowed[None, None],  # (1, 1, n, keys), True = attend
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=use_cache,
                **kwargs,
            )
            out["past_key_values"] = past_key_values
            if use_block_cache:
                if not small_block:  # a refresh: the block's K/V become the buffer
                    block_past_key_values = block_kv(past_key_values, held)
                out["block_past_key_values"] = block_past_key_values
            keep_if_stored(past_key_values, held, update_past_key_values)
            return out

    return with_weights_of(tiny_dream(**options), FastDllmStyleQwen2)


@torch.no_grad()
def fastdllm_cached_generate(
    model,
    prompt: torch.Tensor,
    *,
    block_size: int,
    max_new_tokens: int,
    small_block_size: int,
    mask_id: int,
    lengths: Optional[torch.Tensor] = None,
    threshold: float = 0.95,
    stop_token: Optional[int] = None,
    pad_id: int = 0,
    use_block_cache: bool = False,
    call: Optional[Callable] = None,
) -> torch.Tensor:
    """Fast-dLLM v2's ``batch_sample``, greedy; returns the canvas ``[B, T]`` (the prompts, then
    every block decoded).

    ``prompt`` is ``[B, L]``; with ``lengths`` (B,) its rows are prompts of those lengths,
    right-padded with ``mask_id`` (the released harness's batches: a shorter prompt's padding is
    where it starts generating). The shortest prompt's whole blocks are prefilled (only when it
    is longer than a block, as released) with ``update_past_key_values=True``; when it fills its
    last block, the prefill's last row gives the next token of the rows that end there. Per
    block: the canvas is filled with the mask token to the block's end; the block's small blocks
    are decoded in order, each by calls of the whole block (``update_past_key_values=False``, no
    ``block_size``) whose logits are shifted one row (row j - 1 for position j; position 0 takes
    row 0), committing every masked position of the small block above ``threshold`` and the most
    confident one. With ``use_block_cache``, such a call also passes ``use_block_cache=True`` and
    keeps the ``block_past_key_values`` it returns (a refresh); while the small block's first
    token is known in every row and a buffer is held, a call sends only the small block with
    that buffer and ``replace_position`` (its logits shifted within the small block); the
    buffer is dropped at each new block. The finished block is sent again with
    ``update_past_key_values=True``, and its last row gives the next token of the rows whose
    prompt ended in the block (a longer prompt keeps its own token there). A row that commits
    ``stop_token`` is finished: its later blocks are ``pad_id``; the loop ends when every row
    is. Unlike the released loop, finished rows stay in the batch (it slices them out of the
    cache's ``key_cache`` lists, which transformers 5's ``DynamicCache`` no longer has); the
    other rows' tokens are the same. ``call`` (default ``model``) is what the loop calls."""
    if block_size % small_block_size:
        raise ValueError(f"small_block_size {small_block_size} must divide {block_size}")
    call = call if call is not None else model
    batch, width = prompt.shape
    if lengths is None:
        lengths = torch.full((batch,), width, device=prompt.device)
    shortest, longest = int(lengths.min()), int(lengths.max())
    x = prompt.clone()
    cache = None
    if shortest > block_size:
        out = call(
            input_ids=x[:, : shortest // block_size * block_size],
            use_cache=True,
            update_past_key_values=True,
            block_size=block_size,
        )
        cache = out.past_key_values
        if shortest % block_size == 0:
            ends = lengths == shortest  # (B,) the rows whose prompt ends here
            token = out.logits[ends, -1].argmax(-1)  # (k,)
            if width <= shortest:
                x = torch.cat([x, token[:, None]], dim=1)
            else:
                x[ends, shortest] = token
    prompt_block = lengths // block_size  # (B,) the block each row's prompt ends in
    finished = torch.zeros(batch, dtype=torch.bool, device=x.device)
    rows = torch.arange(batch, device=x.device)
    for b in range(shortest // block_size, max_new_tokens // block_size + longest // block_size):
        if bool(finished.all()):
            break
        end = (b + 1) * block_size
        if bool((prompt_block == b).all()):  # every prompt ends here: masks to the block's end
            x = torch.cat([x, x.new_full((batch, end - x.shape[1]), mask_id)], dim=1)
        canvas = x[:, :end].clone()  # (B, end)
        canvas[finished, -block_size:] = pad_id
        block = canvas[:, -block_size:]  # a view: commits write the canvas
        buffer = None  # the block cache: the block's K/V as of its last refresh
        while True:
            if not bool((block == mask_id).any()):
                out = call(
                    input_ids=block,
                    use_cache=True,
                    past_key_values=cache,
                    update_past_key_values=True,
                    block_size=block_size,
                )
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)  # (B, 1): the next position's token
                canvas = torch.cat([canvas, token.masked_fill(finished[:, None], pad_id)], dim=1)
                break
            for lo in range(0, block_size, small_block_size):
                hi = lo + small_block_size
                while True:
                    masked = block[:, lo:hi] == mask_id  # (B, sbs)
                    if not bool(masked.any()):
                        break
                    read = dict(use_cache=True, past_key_values=cache, update_past_key_values=False)
                    small = use_block_cache and buffer is not None and not bool(masked[:, 0].any())
                    if small:  # only the small block: (B, sbs, V)
                        out = call(
                            input_ids=block[:, lo:hi],
                            use_block_cache=True,
                            block_past_key_values=buffer,
                            replace_position=lo,
                            **read,
                        )
                    elif use_block_cache:  # a refresh: the whole block, and its buffer
                        out = call(input_ids=block, use_block_cache=True, **read)
                        buffer = out.block_past_key_values
                    else:  # the whole block: (B, bs, V)
                        out = call(input_ids=block, **read)
                    # position j takes row j - 1 (position 0 row 0) of the rows the call sent
                    logits = torch.cat([out.logits[:, :1], out.logits[:, :-1]], dim=1)
                    if not small:
                        logits = logits[:, lo:hi]
                    confidence, token = logits.float().softmax(-1).max(-1)  # (B, sbs)
                    confidence = confidence.masked_fill(~masked, -torch.inf)
                    commit = confidence > threshold
                    commit[rows, confidence.argmax(-1)] = True
                    commit &= masked
                    block[:, lo:hi][commit] = token[commit]
                    if stop_token is not None:
                        finished |= ((token == stop_token) & commit).any(-1)
            if bool(finished.all()):
                break
        # the block joins the canvas, and the next position takes the committed token: in
        # every row when the canvas is as long, else in the rows whose prompt ended in this
        # block (a longer prompt keeps its own token there), as released
        if x.shape[1] == canvas.shape[1] or x.shape[1] <= end:
            x = canvas
        else:
            x[:, :end] = canvas[:, :end]
            if canvas.shape[1] > end:
                here = prompt_block == b
                x[here, end] = canvas[here, end]
        prompt_block[prompt_block == b] = b + 1
    return x
