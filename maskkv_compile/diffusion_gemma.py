"""MaskKV for DiffusionGemma: canvas-query voting over the encoder cache, under transformers' own
``generate``.

This file is the one place that knows DiffusionGemma. Every model-specific rule lives here:
how its ``generate`` calls the encoder and the decoder, and which cache layers are full
attention. The rest is MaskKV's own machinery: the ``maskkv::mask_votes`` op and the policies'
top-k.

What DiffusionGemma does (transformers >= 5.24, ``DiffusionGemmaForBlockDiffusion``):
- A causal encoder writes the prompt's K/V into a transformers ``Cache``.
- A bidirectional decoder with the same weights denoises a canvas of random tokens, in up to
  48 calls of ``self.forward(decoder_input_ids=canvas, cache=cache, ...)``.
- Each decoder call concatenates [cache K/V ; canvas K/V] and never writes the cache.
- A finished canvas is encoded into the cache, and the next canvas starts.

What MaskKV does to it:

- **Vote.** The first decoder call that sees a cache the encoder has grown votes. Its
  canvas queries vote, per KV head of every full-attention layer, over that layer's cache
  entries with ``maskkv::mask_votes``, on the attention's own post-norm, post-RoPE q and k (a
  transformers attention function, ``maskkv_dg_sdpa``, wraps SDPA and reads them). That call
  itself attends to the whole cache, as the plain model does.
- **Evict in place.** Right after that call, each full-attention layer of the user's cache
  object keeps its top-``budget`` entries per KV head, in position order. The decoder's later
  calls then concatenate [kept ; canvas]. The next encoder call appends the finished canvas
  to the kept entries, and the next canvas votes over [kept ; new canvas].
- **Sliding-window layers** keep their window: it is already bounded.
- **Budgets** are uniform over layers and heads. A cache layer holds one (B, Hkv, L, D)
  tensor, so every head of a layer keeps the same count; adaptive head budgets would need a
  ragged cache. Mask-voting policies only (``maskkv``, ``mask_voting_uniform``): the canvas
  queries are the voters.

Invariants:
- With a budget of at least the cache length nothing is evicted, and ``generate`` gives the
  plain model's tokens.
- Under eviction, the kept positions of a layer and head are the top-``budget`` of that
  head's canvas votes at the first decoder call of the canvas
  (``tests/test_diffusion_gemma.py`` checks both against the unoptimized model).

Padded batches: every full layer's slots carry one (B, L) validity pattern (the prompt's
padding, then real tokens). A row's kept slots are its top real entries in position order,
then padding slots when the row has fewer real entries than the budget. The padding keys
are masked out of the votes. The full-attention masks that transformers builds from the
2-D padding mask assume an unevicted cache, so the decoder's and the encoder's masks for
those layers are rebuilt from the slots as held.

Refused with an error that says what to do: eviction under a ``StaticCache``, whose slots are
fixed. At full budget it runs the plain model unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from maskkv_compile.config import MaskKVConfig
from maskkv_compile.passes import UnsupportedModelError

ATTENTION = "maskkv_dg_sdpa"
_RECORDER: contextvars.ContextVar[Optional["_Votes"]] = contextvars.ContextVar(
    "maskkv_dg_votes", default=None
)
MASK_VOTING_POLICIES = ("maskkv", "mask_voting_uniform")


def is_diffusion_gemma(model: torch.nn.Module) -> bool:
    """The model-specific rule: transformers' DiffusionGemma (encoder + decoder + canvas)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "diffusion_gemma" and hasattr(
        getattr(model, "model", None), "decoder"
    )


@dataclass
class _Votes:
    """What one decoder call records: per full-attention layer, the canvas votes (B, Hkv, P).
    ``modules``: the decoder's full-attention modules -> their layer (the vision tower and the
    encoder share the attention function, never these modules)."""

    modules: dict[int, int]  # id(attention module) -> layer index
    votes: dict[int, torch.Tensor] = field(default_factory=dict)


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, and when a decoder call is voting, the canvas queries' votes over the cache part of
    ``key`` (everything before the canvas) at the full-attention layers."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _RECORDER.get()
    layer = None if recorder is None else recorder.modules.get(id(module))
    if layer is not None:
        canvas, cached = query.shape[2], key.shape[2] - query.shape[2]
        if cached > 0:
            device = query.device
            key_valid = None
            if attention_mask is not None:  # (B, 1, C, K) bool: padding keys are False
                key_valid = (
                    attention_mask[:, 0].any(1)
                    if attention_mask.dtype == torch.bool
                    else (attention_mask[:, 0] > float("-inf")).any(1)
                )
            votes, _ = torch.ops.maskkv.mask_votes(
                query,
                key,
                torch.arange(canvas, device=device),  # voters: every canvas row
                torch.arange(cached, device=device),  # candidates: every cache entry
                float(kwargs.get("scaling") or module.scaling),
                64,
                key_valid,
            )
            recorder.votes[layer] = votes  # (B, Hkv, cached)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    """Register the attention function (and SDPA's mask builder under its name) with
    transformers: done once, when a DiffusionGemma model is first optimized."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@dataclass
class _CacheState:
    """What this model last did to one cache object."""

    cache: "weakref.ref"  # the cache object (a new one, even at a reused address, is new)
    lengths: dict[int, int]  # full layer -> entries after the last eviction
    positions: dict[int, torch.Tensor]  # full layer -> (B, Hkv, L) absolute position per slot
    valid: torch.Tensor  # (B, L): the slot holds a real token (every full layer and head)
    seen: int  # tokens the encoder has written so far (absolute length)


class DiffusionGemmaMaskKV(torch.nn.Module):
    """``optimize(diffusion_gemma_model, budget=...)``: the model with MaskKV on its encoder
    cache. ``generate`` is transformers' own, run with the decoder routed through MaskKV;
    ``cache_stats()`` says what was kept."""

    def __init__(self, model: torch.nn.Module, config: MaskKVConfig):
        super().__init__()
        policy = config.eviction.name
        if policy not in MASK_VOTING_POLICIES:
            raise UnsupportedModelError(
                "DiffusionGemma runs mask-voting policies only "
                f"({', '.join(MASK_VOTING_POLICIES)}): its canvas queries are the voters; got "
                f"policy {policy!r}"
            )
        unsupported = {
            "prompt_refresh": config.prompt_refresh,
            "block_length": config.block_length,
            "revote": config.reselection,
        }
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise UnsupportedModelError(
                f"DiffusionGemma does not support {', '.join(given)}: each canvas re-votes at "
                "its first decoder call already; leave them unset"
            )
        _register()
        self.model = model.eval()
        self.config = config
        text = model.config.get_text_config()
        self.full_layers = tuple(
            i for i, kind in enumerate(text.layer_types) if kind == "full_attention"
        )
        self._state: Optional[_CacheState] = None
        self._padding: Optional[torch.Tensor] = None  # (B, P) of the running generate
        self.counts = {"decoder_calls": 0, "votes": 0, "evictions": 0, "encoder_calls": 0}

    # ------------------------------------------------------------------ public surface

    def generate(self, *args, **kwargs):
        """transformers' ``DiffusionGemmaForBlockDiffusion.generate``, with MaskKV routing.

        Under a static cache ``generate`` compiles the decoder (``fullgraph=True``), and a
        static cache cannot shrink: with a budget of at least its length the plain model runs
        (nothing would be evicted); a smaller budget is refused."""
        if self._static(kwargs):
            capacity = self._static_capacity(args, kwargs)
            if capacity is None or capacity > self.config.budget:
                raise UnsupportedModelError(
                    "MaskKV cannot evict from a StaticCache (its slots are fixed): use the "
                    f"default dynamic cache, or a budget of at least the cache length "
                    f"({capacity or 'unknown'}; the budget is {self.config.budget})"
                )
            return self.model.generate(*args, **kwargs)
        if kwargs.get("cache") is None:  # a new cache: nothing of the last one carries over
            self._state = None
        with self._routed(kwargs.get("attention_mask")):
            return self.model.generate(*args, **kwargs)

    def _static(self, kwargs) -> bool:
        from transformers import StaticCache

        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.get("cache_implementation", config.cache_implementation)
        return isinstance(kwargs.get("cache"), StaticCache) or implementation == "static"

    def _static_capacity(self, args, kwargs) -> Optional[int]:
        cache = kwargs.get("cache")
        if cache is not None:
            return int(cache.get_max_cache_shape())
        ids = args[0] if args else kwargs.get("input_ids")
        new = kwargs.get("max_new_tokens")
        if ids is None or new is None:
            return None
        canvas = self.model.config.canvas_length
        return int(ids.shape[-1]) + -(-int(new) // canvas) * canvas

    def forward(self, *args, **kwargs):
        with self._routed():
            return self.model(*args, **kwargs)

    def reset(self) -> None:
        """Forget the last cache (the next decoder call votes afresh)."""
        self._state = None

    def cache_stats(self) -> dict:
        """Kept entries per full-attention layer and KV head for the last cache, their absolute
        positions, and the counts of decoder calls, votes and evictions."""
        state = self._state
        layers = []
        if state is not None:
            for layer in self.full_layers:
                positions = state.positions.get(layer)
                if positions is not None:
                    layers.append(
                        {
                            "layer": layer,
                            "kept_per_kv_head": [positions.shape[-1]] * positions.shape[1],
                            "positions": positions.tolist(),
                        }
                    )
        return {
            "policy": self.config.eviction.name,
            "budget": self.config.budget,
            "layer_allocation": "uniform (one count per layer and head: a cache layer is one "
            "tensor)",
            "seen": 0 if state is None else state.seen,
            "layers": layers,
            **self.counts,
        }

    # ------------------------------------------------------------------ routing

    @contextlib.contextmanager
    def _routed(self, padding: Optional[torch.Tensor] = None):
        model = self.model
        before = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION)
        model.forward = self._decoder_forward  # what generate's `self.forward` finds first
        encoder = model.model.encoder
        encoder_hook = encoder.register_forward_pre_hook(self._encoder_call, with_kwargs=True)
        self._padding = None if padding is None or bool(padding.all()) else padding.bool()
        try:
            yield
        finally:
            encoder_hook.remove()
            del model.forward
            model.set_attn_implementation(before)

    def _encoder_call(self, module, args, kwargs):
        """Count the call; with padded rows and a cache this model already holds, lay the
        full-attention mask over the cache's slots as they are (kept ones, in their order)."""
        self.counts["encoder_calls"] += 1
        cache, masks = kwargs.get("cache"), kwargs.get("attention_mask")
        if self._padding is None or not self._holds(cache) or not isinstance(masks, dict):
            return None
        new = masks["full_attention"].shape[2]
        valid = self._slots(cache, self._full_lengths(cache))[1]  # (B, L)
        causal = torch.ones(new, new, dtype=torch.bool, device=valid.device).tril()
        full = torch.cat(
            [
                valid[:, None, None, :].expand(-1, 1, new, -1),
                causal.expand(valid.shape[0], 1, -1, -1),
            ],
            -1,
        )  # (B, 1, new, L + new)
        return args, {**kwargs, "attention_mask": {**masks, "full_attention": full}}

    def _decoder_forward(self, *args, **kwargs):
        cache = kwargs.get("cache")
        model = self.model
        if cache is None or kwargs.get("decoder_input_ids") is None:
            return type(model).forward(model, *args, **kwargs)
        self.counts["decoder_calls"] += 1
        lengths = self._full_lengths(cache)
        fresh = not self._holds(cache) or self._state.lengths != lengths
        # the slots as the encoder left them: only a fresh cache has any this model has not seen
        slots = self._slots(cache, lengths) if fresh else None
        masks = kwargs.get("decoder_attention_mask")
        if self._padding is not None and self._holds(cache) and isinstance(masks, dict):
            canvas = kwargs["decoder_input_ids"].shape[1]
            valid = slots[1] if fresh else self._state.valid  # (B, L)
            ones = valid.new_ones(valid.shape[0], canvas)
            full = torch.cat([valid, ones], -1)[:, None, None, :].expand(-1, 1, canvas, -1)
            kwargs["decoder_attention_mask"] = {**masks, "full_attention": full}
        if not fresh or max(lengths.values(), default=0) <= self.config.budget:
            if fresh:
                self._track(cache, slots)
            return type(model).forward(model, *args, **kwargs)
        self._check_evictable(cache)
        decoder = self.model.model.decoder
        recorder = _Votes({id(decoder.layers[i].self_attn): i for i in self.full_layers})
        token = _RECORDER.set(recorder)
        try:
            out = type(model).forward(model, *args, **kwargs)
        finally:
            _RECORDER.reset(token)
        self.counts["votes"] += 1
        self._track(cache, slots, recorder)
        return out

    # ------------------------------------------------------------------ cache surgery

    def _full_lengths(self, cache) -> dict[int, int]:
        out = {}
        for layer in self.full_layers:
            keys = getattr(cache.layers[layer], "keys", None)
            out[layer] = 0 if keys is None or keys.numel() == 0 else int(keys.shape[-2])
        return out

    def _holds(self, cache) -> bool:
        return cache is not None and self._state is not None and self._state.cache() is cache

    def _check_evictable(self, cache) -> None:
        from transformers import StaticCache

        if isinstance(cache, StaticCache):
            raise UnsupportedModelError(
                "MaskKV cannot evict from a StaticCache (its slots are fixed): use the default "
                "dynamic cache, or a budget of at least the cache length"
            )

    def _valid_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, ..., L) bool: whether the token at each absolute position is real (not padding):
        the prompt's padding mask, and every generated position."""
        if self._padding is None:
            return torch.ones_like(positions, dtype=torch.bool)
        padding = self._padding.to(positions.device)
        inside = positions < padding.shape[1]
        index = positions.clamp(max=padding.shape[1] - 1).flatten(1)
        real = padding.gather(1, index).view_as(positions)
        return real | ~inside

    def _slots(self, cache, lengths: dict[int, int]):
        """The full layers' slots as the cache holds them now: what this model tracked after the
        last call, plus whatever the encoder appended since. Returns (positions per layer,
        (B, Hkv, L) each; valid (B, L), the same for every layer and head, see ``_evict``;
        the absolute length written so far)."""
        state = self._state if self._holds(cache) else None
        previous = state.seen if state is not None else 0
        grown = max(
            lengths[l] - (state.lengths.get(l, 0) if state else 0) for l in self.full_layers
        )
        seen = previous + grown
        positions = {}
        for layer in self.full_layers:
            batch, kv_heads = cache.layers[layer].keys.shape[:2]
            old = (
                state.positions[layer]
                if state is not None
                else torch.empty(batch, kv_heads, 0, dtype=torch.long)
            )
            new = torch.arange(previous, seen).expand(batch, kv_heads, -1)
            positions[layer] = torch.cat([old, new], -1)  # (B, Hkv, L)
        old_valid = state.valid if state is not None else torch.ones(batch, 0, dtype=torch.bool)
        new_valid = self._valid_at(torch.arange(previous, seen).expand(batch, -1))
        return positions, torch.cat([old_valid, new_valid], -1), seen

    def _evict(self, cache, votes: torch.Tensor, layer: int, valid: torch.Tensor):
        """Keep ``budget`` slots per KV head of one full layer: the top of the canvas votes among
        the real (non-padding) slots, in position order, then, when a row has fewer real slots
        than the budget, padding slots after them. So slot validity stays one (B, L) pattern
        for every head. Returns the kept slot indices (B, Hkv, budget)."""
        budget = self.config.budget
        cache_layer = cache.layers[layer]
        real = valid[:, None, :].expand_as(votes).to(votes.device)
        scores = votes.masked_fill(~real, float("-inf"))
        index = scores.topk(budget, dim=-1).indices  # (B, Hkv, budget)
        padding_last = (~real).gather(-1, index).long() * votes.shape[-1]
        index = index.gather(-1, (index + padding_last).argsort(-1))  # real by position, then pads
        for name in ("keys", "values"):
            tensor = getattr(cache_layer, name)
            setattr(
                cache_layer,
                name,
                tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1])),
            )
        return index

    def _track(self, cache, slots, recorder: Optional[_Votes] = None) -> None:
        """Record the cache's full-layer slots (``_slots``) after this call, evicting first
        when ``recorder`` holds votes."""
        positions, valid, seen = slots
        if recorder is not None:
            kept_valid = None
            for layer in self.full_layers:
                votes = recorder.votes.get(layer)
                if votes is None or votes.shape[-1] != positions[layer].shape[-1]:
                    raise RuntimeError(
                        f"layer {layer}: no canvas votes over its {positions[layer].shape[-1]} "
                        "cache entries were recorded; the decoder did not run through MaskKV's "
                        "attention"
                    )
                if votes.shape[-1] <= self.config.budget:
                    continue
                index = self._evict(cache, votes, layer, valid).cpu()
                positions[layer] = positions[layer].gather(-1, index)
                kept_valid = valid.gather(-1, index[:, 0])  # the same for every head
            if kept_valid is not None:
                valid = kept_valid
            self.counts["evictions"] += 1
        self._state = _CacheState(
            weakref.ref(cache), self._full_lengths(cache), positions, valid, seen
        )
