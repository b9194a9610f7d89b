"""The user's cache after MaskKV evicted from it: the class an evicted full-attention layer
becomes (in place), and MaskKV's record of the slots, which each cache object carries.

Invariant: an evicted layer answers ``get_seq_length()`` with the tokens written (evicted ones
included), as the plain model's layer does, and refuses ``crop``: its slots are no longer the
positions 0..n-1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.cache
def held_layer_class() -> type:
    """The class of a full-attention cache layer MaskKV has evicted from: a transformers
    ``DynamicLayer`` that holds fewer slots than the tokens written to it. ``get_seq_length``
    answers the tokens written, as the plain model's layer does (``generate`` counts the
    positions of a later call on the cache from it, and transformers' masks their queries'
    offset); ``get_mask_sizes`` the slots held (the keys a call attends to). An evicted layer
    of the user's cache becomes one in place. A padded batch's masks over held slots are
    MaskKV's own (``slot_mask``)."""
    from transformers.cache_utils import DynamicLayer

    class MaskKVHeldLayer(DynamicLayer):
        written: int  # tokens written to the layer, evicted ones included

        def update(self, key_states, value_states, *args, **kwargs):
            self.written += key_states.shape[-2]
            return super().update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self) -> int:
            return self.written

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            # the held slots read as the positions right before the call's own: a mask built
            # from these sizes lets every query see them, and the call's keys sit at their true
            # positions (causal among themselves, as the queries' offset is the tokens written)
            held = 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]
            return held + query_length, self.written - held

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove == 0:
                return
            raise NotImplementedError(
                "MaskKV evicted entries of this cache layer: its slots are no longer the "
                "positions 0..n-1, so it cannot be cropped to a length; start a new cache"
            )

    MaskKVHeldLayer.__module__, MaskKVHeldLayer.__qualname__ = __name__, "MaskKVHeldLayer"
    return MaskKVHeldLayer


def __getattr__(name: str):
    # pickle (torch.save of the user's cache) finds the held layer class by this name
    if name == "MaskKVHeldLayer":
        return held_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class CacheState:
    """MaskKV's record of one cache object's full-attention layers, kept on the cache itself
    (``keep_state``), so that it goes wherever the cache goes: to another ``generate`` of any
    optimized model, through ``copy.deepcopy`` (a branched chat) and ``torch.save``."""

    lengths: dict[int, int]  # full layer -> entries after the last eviction
    positions: dict[int, torch.Tensor]  # full layer -> (B, Hkv, L) absolute position per slot
    valid: dict[int, torch.Tensor]  # full layer -> (B, Hkv, L): the slot holds a kept real token
    seen: int  # tokens the encoder has written so far (absolute length)


_STATE = "maskkv_slots"  # the attribute of a cache object that holds its CacheState


def state_of(cache) -> "CacheState | None":
    """The record MaskKV keeps on ``cache`` (None for a cache it never tracked)."""
    return None if cache is None else getattr(cache, _STATE, None)


def keep_state(cache, state: CacheState) -> None:
    setattr(cache, _STATE, state)
