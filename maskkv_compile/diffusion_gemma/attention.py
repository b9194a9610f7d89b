"""The attention function ``optimize`` registers with transformers for DiffusionGemma
(``maskkv_dg_sdpa``): SDPA, plus what MaskKV needs at each call.

- On a cache whose full layers MaskKV evicted from (or that holds padding), each query head
  attends to its KV head's held slots only (``slot_mask``; transformers' own masks assume an
  unevicted cache).
- During a voting decoder call, the canvas queries' votes over the cache part of ``key``
  (``maskkv::mask_votes``, per KV head over its held slots) are recorded for every
  full-attention layer.
- During ``generate``'s cache-only encoder call, the encoder's last attention raises
  ``CacheWritten``: its K/V are already in the cache.
- A long call under a banded (sliding-window or causal) mask runs in bands of queries, each
  against the keys its mask lets it see.

What a call needs is passed through context variables set by the runtime: the module's
signature is transformers'. The function reads q and k as the attention computed them
(post-norm, post-RoPE, V from K where the layer has no ``v_proj``, its own scale and head dims),
so none of that needs code here.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch

from maskkv_compile.kernels.attention import QUERY_CHUNK, banded_key_ranges

ATTENTION = "maskkv_dg_sdpa"
RECORDER: contextvars.ContextVar[Optional["Votes"]] = contextvars.ContextVar(
    "maskkv_dg_votes", default=None
)
# id(attention module) -> (B, Hkv, L) which cached slots hold a kept real token, for a call on a
# cache this model has evicted from or holds padding in (unset: transformers' own masks hold)
SLOTS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "maskkv_dg_slots", default=None
)
# id(attention module) of the encoder's last layer, during an encoder call whose output is its
# cache alone (``generate``'s): that attention raises CacheWritten once it has written the cache
CACHE_ONLY: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar(
    "maskkv_dg_cache_only", default=None
)


class CacheWritten(Exception):
    """Raised by the encoder's last attention under ``generate``: the cache is written, and
    nothing after it in the encoder feeds what ``generate`` reads."""


@dataclass
class Votes:
    """What one decoder call records: per full-attention layer, the canvas votes (B, Hkv, P).
    ``modules``: the decoder's full-attention modules -> their layer (the vision tower and the
    encoder share the attention function, never these modules)."""

    modules: dict[int, int]  # id(attention module) -> layer index
    votes: dict[int, torch.Tensor] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H) on the cache
    voters: int = 0  # canvas rows


def slot_mask(
    valid: torch.Tensor,
    heads: int,
    new: int,
    causal: bool,
    given: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, H, new, L + new) bool: each query head sees its KV head's held slots (``valid``
    (B, Hkv, L)) and the call's own ``new`` keys as the mask transformers built for the call
    lets it (``given``: (B or 1, 1 or H, new, K), bool or additive, its last ``new`` columns
    are the call's own keys, padding included), or without one all of them (or causally)."""
    batch, kv_heads, _ = valid.shape
    cached = valid.repeat_interleave(heads // kv_heads, 1)[:, :, None, :]  # (B, H, 1, L)
    if given is not None and given.dim() == 4 and given.shape[-1] >= new:
        own = given[..., -new:]  # (B or 1, 1 or H, new, new)
        fresh = own if own.dtype == torch.bool else own > float("-inf")
    else:
        fresh = torch.ones(new, new, dtype=torch.bool, device=valid.device)
        fresh = fresh.tril() if causal else fresh
    return torch.cat(
        [cached.expand(-1, -1, new, -1), fresh.to(valid.device).expand(batch, heads, new, new)],
        -1,
    )  # (B, H, new, L + new)


def canvas_votes(query, key, scale, key_valid, kv_valid=None):
    """The canvas queries' votes (B, Hkv, P) over the cache part of ``key`` and their prompt
    mass (B, H): ``maskkv::mask_votes`` with every canvas row voting. ``key_valid`` (B, K) the
    keys every head sees; ``kv_valid`` (B, Hkv, P): per KV head, its held cache slots (one
    call per KV head, each with its own key mask)."""
    canvas, cached = query.shape[2], key.shape[2] - query.shape[2]
    device = query.device
    voters, prompt = torch.arange(canvas, device=device), torch.arange(cached, device=device)
    if kv_valid is None:
        return torch.ops.maskkv.mask_votes(query, key, voters, prompt, scale, 64, key_valid)
    group = query.shape[1] // key.shape[1]
    canvas_keys = kv_valid.new_ones(kv_valid.shape[0], canvas)
    parts = [
        torch.ops.maskkv.mask_votes(
            query[:, h * group : (h + 1) * group],
            key[:, h : h + 1],
            voters,
            prompt,
            scale,
            64,
            torch.cat([kv_valid[:, h], canvas_keys], -1),  # (B, K)
        )
        for h in range(key.shape[1])
    ]
    return torch.cat([v for v, _ in parts], 1), torch.cat([m for _, m in parts], 1)


def query_chunk(module) -> int:
    """Query rows per band of a long banded call. A band of ``c`` queries under a sliding window
    ``w`` spans ``w + c - 1`` keys: a quarter of the window wastes a fifth of its scores on
    masked ones (``QUERY_CHUNK`` queries against a window of 512 waste half)."""
    window = getattr(module, "sliding_window", None)
    return QUERY_CHUNK if not window else min(QUERY_CHUNK, max(64, window // 4))


def maskkv_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the cache's slots as held, and when a decoder call is voting, the canvas
    queries' votes over the cache part of ``key`` (everything before the canvas) at the
    full-attention layers. A long call under a banded mask goes in query chunks, each against
    its band of keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if CACHE_ONLY.get() == id(module):  # the module wrote its K/V to the cache before this call
        raise CacheWritten
    slots = SLOTS.get()
    held = None if slots is None else slots.get(id(module))  # (B, Hkv, L)
    if held is not None:  # a full layer whose slots are evicted per head or padding
        if held.shape[-1] != key.shape[2] - query.shape[2]:
            raise RuntimeError(
                f"MaskKV tracks {held.shape[-1]} cache slots of a full-attention layer, the call "
                f"has {key.shape[2] - query.shape[2]}: the cache changed outside MaskKV"
            )
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        held = held.to(query.device)
        attention_mask = slot_mask(held, query.shape[1], query.shape[2], causal, attention_mask)
    recorder = RECORDER.get()
    layer = None if recorder is None else recorder.modules.get(id(module))
    if layer is not None and key.shape[2] > query.shape[2]:
        key_valid = None
        if held is None and attention_mask is not None:  # (B, 1, C, K): padding keys False
            key_valid = (
                attention_mask[:, 0].any(1)
                if attention_mask.dtype == torch.bool
                else (attention_mask[:, 0] > float("-inf")).any(1)
            )
        scale = float(kwargs.get("scaling") or module.scaling)
        votes, mass = canvas_votes(query, key, scale, key_valid, held)
        recorder.votes[layer], recorder.mass[layer] = votes, mass  # (B, Hkv, cached), (B, H)
        recorder.voters = query.shape[2]
    rows = query_chunk(module)
    ranges = None if attention_mask is None else banded_key_ranges(attention_mask, rows)
    if ranges is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # a long sliding-window (or causal) call: each chunk of queries against its band of keys
    chunks = [
        sdpa_attention_forward(
            module,
            query[:, :, start : start + rows],
            key[:, :, lo:hi],
            value[:, :, lo:hi],
            attention_mask[:, :, start : start + rows, lo:hi],
            **kwargs,
        )[0]  # (B, chunk, H, Dv)
        for start, lo, hi in ranges
    ]
    return torch.cat(chunks, 1), None  # (B, S, H, Dv), as SDPA's


def register() -> None:
    """Register the attention function (and SDPA's mask builder under its name) with
    transformers: done once, when a DiffusionGemma model is first optimized."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, maskkv_sdpa)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
