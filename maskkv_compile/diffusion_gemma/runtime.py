"""``DiffusionGemmaMaskKV``: the optimized DiffusionGemma. It routes transformers' ``generate``
(its encoder and decoder calls) through MaskKV: the first decoder call of each canvas votes, the
full-attention layers of the user's cache are evicted in place right after it, encoder calls
under ``generate`` write the cache in chunks and stop, and every later call on the cache attends
to the slots as held (package docstring: the whole design and its invariants).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch

from maskkv_compile.config import MaskKVConfig
from maskkv_compile.diffusion_gemma.attention import (
    ATTENTION,
    CACHE_ONLY,
    RECORDER,
    SLOTS,
    CacheWritten,
    Votes,
    register,
)
from maskkv_compile.diffusion_gemma.held_cache import (
    CacheState,
    held_layer_class,
    keep_state,
    state_of,
)
from maskkv_compile.diffusion_gemma.model_rules import MASK_VOTING_POLICIES, layer_fingerprint
from maskkv_compile.passes import UnsupportedModelError
from maskkv_compile.passes.evict_kv import layer_budgets
from maskkv_compile.policy_ops import lift_recent

_PREFILL_KWARGS = ("input_ids", "attention_mask", "cache", "position_ids")


class _DeferredMasks(dict):
    """The arguments of ``generate``'s ``encoder.create_masks_for_generate`` call, in place
    of the masks (an empty dict, as the encoder takes a dict of masks). Only
    ``DiffusionGemmaMaskKV._encoder_forward`` receives one: it builds the masks."""

    def __init__(self, kwargs: dict):
        super().__init__()
        self.kwargs = kwargs


def _padding_of(mask) -> Optional[torch.Tensor]:
    """(B, K) which keys of a direct decoder call are real, from its ``decoder_attention_mask``:
    the 2-D mask over the tokens written and the canvas, or the keys some query sees in the
    full-attention mask of a 4-D one (a tensor, or the dict of them ``generate`` builds)."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention")
    if not isinstance(mask, torch.Tensor):
        return None
    if mask.dim() == 2:
        return mask
    seen = mask if mask.dtype == torch.bool else mask > float("-inf")  # (B, 1, Q, K)
    return seen.any(-2)[:, 0]


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
            "mask_token_id": config.mask_token_id,  # no [MASK] token: the canvas queries vote
            "family": config.family,  # its logits live at the canvas's own rows
            "prompt_refresh": config.prompt_refresh,
            "block_length": config.block_length,
            "revote": config.reselection,
        }
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise UnsupportedModelError(
                f"DiffusionGemma does not take {', '.join(given)}: it has no [MASK] token (its "
                "canvas queries vote) and each canvas re-votes at its first decoder call "
                "already; leave them unset"
            )
        fingerprint = layer_fingerprint(model)
        if config.profile is not None:
            config.profile.check_compatible(fingerprint)
        register()
        self.model = model.eval()
        self.maskkv_config = config
        self.full_layers = tuple(fingerprint["full_layers"])
        # full layer -> its budget per KV head on average (the policy's layer allocation, in
        # integral slots per layer as for every other model)
        kv_heads = [heads for heads, _ in fingerprint["kv_heads_x_head_dim"]]
        self.budgets = dict(zip(self.full_layers, layer_budgets(config, kv_heads)))
        # the record of the last cache a decoder call tracked, for cache_stats (the cache
        # keeps its own: ``held_cache.state_of``)
        self._last: Optional[CacheState] = None
        self._padding: Optional[torch.Tensor] = None  # (B, P) of the running generate
        self._encoder_slots = None  # the SLOTS token of a running encoder call
        self.counts = {
            "decoder_calls": 0,
            "votes": 0,
            "evictions": 0,
            "encoder_calls": 0,
            "prefill_chunks": 0,  # encoder calls that long prefills were split into
            "cache_only_encoder_calls": 0,  # encoder calls stopped once the cache was written
        }

    # ------------------------------------------------------------------ public surface

    # the wrapped model's, as transformers-style code reads them (``ids.to(model.device)``);
    # the MaskKV options are ``maskkv_config``, as on every optimized model
    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def generate(self, *args, **kwargs):
        """transformers' ``DiffusionGemmaForBlockDiffusion.generate``, with MaskKV routing.

        Under a static cache ``generate`` compiles the decoder (``fullgraph=True``), and a
        static cache cannot shrink: with a budget of at least its length the plain model runs
        (nothing would be evicted); a smaller budget is refused."""
        if self._static(kwargs):
            capacity = self._static_capacity(args, kwargs)
            smallest = min(self.budgets.values())
            if capacity is None or capacity > smallest:
                raise UnsupportedModelError(
                    "MaskKV cannot evict from a StaticCache (its slots are fixed): use the "
                    f"default dynamic cache, or a budget of at least the cache length "
                    f"({capacity or 'unknown'}; the smallest layer budget is {smallest:g})"
                )
            return self.model.generate(*args, **kwargs)
        with self._routed(kwargs.get("attention_mask"), generating=True):
            return self.model.generate(*args, **kwargs)

    def _static(self, kwargs) -> bool:
        """Whether ``generate`` runs on a static cache: one passed in, or any of transformers'
        static cache implementations (its deprecated names too)."""
        from transformers import StaticCache
        from transformers.generation.configuration_utils import (
            ALL_STATIC_CACHE_IMPLEMENTATIONS,
        )

        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.get("cache_implementation", config.cache_implementation)
        return (
            isinstance(kwargs.get("cache"), StaticCache)
            or implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS
        )

    def _static_capacity(self, args, kwargs) -> Optional[int]:
        """The length of the static cache ``generate`` fills: a cache's own, or the length it
        makes one of (the prompt and the tokens to generate, as its generation config and
        keyword arguments say)."""
        cache = kwargs.get("cache")
        if cache is not None:
            return int(cache.get_max_length())
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        # transformers' DiffusionGemma's own reading of its generation config, the keyword
        # arguments and its defaults (max_new_tokens 256), and of max_length against them
        rest = {k: v for k, v in kwargs.items() if k not in ("generation_config", "input_ids")}
        config, _ = self.model._prepare_generation_config(kwargs.get("generation_config"), **rest)
        length, _ = self.model._prepare_generated_length(config, int(ids.shape[-1]))
        return int(length)

    def forward(self, *args, **kwargs):
        """The model's own forward, routed: a decoder call on a cache (``generate``'s steps by
        hand) votes and evicts as under ``generate``; its padding is read from its mask."""
        with self._routed(_padding_of(kwargs.get("decoder_attention_mask"))):
            return self.model(*args, **kwargs)

    def reset(self) -> None:
        """Forget the last cache (``cache_stats`` reports none). A cache keeps its own record
        of which position each held slot holds, so a chat goes on with it after a reset."""
        self._last = None

    def cache_stats(self) -> dict:
        """Kept entries per full-attention layer and KV head for the last cache, their absolute
        positions, and the counts of decoder calls, votes and evictions."""
        state = self._last
        layers = []
        if state is not None:
            for layer in self.full_layers:
                positions = state.positions.get(layer)
                if positions is not None:
                    layers.append(
                        {
                            "layer": layer,
                            "kept_per_kv_head": state.valid[layer][0].sum(-1).tolist(),
                            # (B, Hkv, slots) in position order; -1 where a slot is not held
                            "positions": positions.masked_fill(~state.valid[layer], -1).tolist(),
                        }
                    )
        return {
            "policy": self.maskkv_config.eviction.name,
            "budget": self.maskkv_config.budget,
            "layer_allocation": f"{self.maskkv_config.eviction.layer_allocation()} over the full "
            "layers; per KV head by the policy",
            "layer_budgets": {layer: round(b, 3) for layer, b in self.budgets.items()},
            "seen": 0 if state is None else state.seen,
            "layers": layers,
            **self.counts,
        }

    # ------------------------------------------------------------------ routing

    @contextlib.contextmanager
    def _routed(self, padding: Optional[torch.Tensor] = None, generating: bool = False):
        """Run the model through MaskKV: its attention function, the decoder call and the
        encoder call routed here, and under ``generate`` the encoder's masks deferred to the
        encoder call (``_encoder_forward``)."""
        model = self.model
        before = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION)
        model.forward = self._decoder_forward  # what generate's `self.forward` finds first
        encoder = model.model.encoder
        encoder.forward = self._encoder_forward
        if generating:  # generate builds the encoder's masks right before each encoder call
            encoder.create_masks_for_generate = self._encoder_masks
        hooks = (
            encoder.register_forward_pre_hook(self._encoder_call, with_kwargs=True),
            encoder.register_forward_hook(self._encoder_done),
        )
        self._padding = None if padding is None or bool(padding.all()) else padding.bool()
        try:
            yield
        finally:
            # an encoder call that raised (a Ctrl-C included) ran no forward hook: its slots
            # must not reach the process's next call
            self._encoder_done(encoder, (), None)
            for hook in hooks:
                hook.remove()
            del model.forward, encoder.forward
            encoder.__dict__.pop("create_masks_for_generate", None)
            model.set_attn_implementation(before)

    def _attention_modules(self, stack) -> dict[int, int]:
        """id(attention module) -> layer, for the full-attention layers of a layer stack."""
        return {id(stack.layers[i].self_attn): i for i in self.full_layers}

    def _held(self, valid: dict, stack, cache) -> Optional[dict]:
        """SLOTS for a call on ``stack`` (the encoder's or decoder's layers): the full layers
        that were evicted or whose slots are not all held (evicted per head, or padding), or
        every full layer when the batch is padded or the full layers hold different numbers of
        slots (transformers builds one full-attention mask, from the 2-D padding mask and one
        layer's length, for an unevicted cache, and a caller may pass one it built before the
        eviction), else None."""
        ragged = len({valid[layer].shape[-1] for layer in self.full_layers}) > 1
        evicted = held_layer_class()
        held = {
            id(stack.layers[layer].self_attn): valid[layer]
            for layer in self.full_layers
            if self._padding is not None
            or ragged
            or type(cache.layers[layer]) is evicted
            or not bool(valid[layer].all())
        }
        return held or None

    def _encoder_call(self, module, args, kwargs):
        """Count the call; on a cache this model holds, the encoder's full layers attend to the
        slots as held (kept ones, in their order), and its own new tokens causally."""
        self.counts["encoder_calls"] += 1
        cache = kwargs.get("cache")
        if self._holds(cache):
            valid = self._slots(cache, self._full_lengths(cache))[1]
            self._encoder_slots = SLOTS.set(self._held(valid, module.language_model, cache))
        return None

    def _encoder_masks(self, *args, **kwargs) -> "_DeferredMasks":
        """``generate``'s call to build the encoder's masks, deferred to the encoder call, which
        builds them per prefill chunk (or once, for a call it does not split)."""
        build = type(self.model.model.encoder).create_masks_for_generate
        return _DeferredMasks(inspect.signature(build).bind(*args, **kwargs).arguments)

    def _encoder_forward(self, *args, **kwargs):
        """The encoder's forward. Under ``generate`` (masks deferred here), whose encoder call
        is read for its cache alone, a text-only call:

        - writes the cache and stops there: the last layer's attention raises once its K/V are
          in the cache, so its attention, MLP and experts and the final norm, which feed
          nothing ``generate`` reads, never run (``last_hidden_state`` is None);
        - goes in chunks of ``prefill_chunk`` tokens when longer, onto a dynamic cache: exact,
          since the encoder is causal (a chunk's rows attend to the cached rows before them and
          causally to their own, as in the whole call). Each chunk gets the masks ``generate``
          builds for a call on that cache, from the same 2-D mask and positions."""
        from transformers.modeling_outputs import BaseModelOutputWithPast

        encoder = self.model.model.encoder
        masks = kwargs.get("attention_mask")
        if not isinstance(masks, _DeferredMasks):
            return type(encoder).forward(encoder, *args, **kwargs)
        build = type(encoder).create_masks_for_generate
        if not self._text_only(args, kwargs, masks.kwargs):
            kwargs["attention_mask"] = build(**masks.kwargs)
            return type(encoder).forward(encoder, *args, **kwargs)
        ids, cache = kwargs["input_ids"], kwargs["cache"]
        keys, positions = masks.kwargs["attention_mask"], kwargs["position_ids"]
        seen = keys.shape[1] - ids.shape[1]  # (B, seen + new) keys: the cached ones first
        chunk = self.maskkv_config.prefill_chunk
        if chunk is None or cache.is_compileable or self._encoder_slots is not None:
            chunk = ids.shape[1]  # one call (a static cache, or one with evicted slots)
        for start in range(0, ids.shape[1], chunk):
            stop = min(start + chunk, ids.shape[1])
            where = positions[:, start:stop]  # (1 or B, C)
            chunk_masks = build(
                **{
                    **masks.kwargs,
                    "inputs_embeds": masks.kwargs["inputs_embeds"][:, start:stop],  # metadata
                    "attention_mask": keys[:, : seen + stop],  # the cached keys and the chunk's
                    "position_ids": where,
                }
            )
            stopped = self._write_cache(ids[:, start:stop], chunk_masks, cache, where)
            if chunk < ids.shape[1]:
                self.counts["prefill_chunks"] += 1
        self.counts["cache_only_encoder_calls"] += stopped
        return BaseModelOutputWithPast(last_hidden_state=None, cache=cache)

    def _write_cache(self, ids, masks, cache, positions) -> bool:
        """One encoder call that stops once its last layer has written the cache. Returns
        whether it stopped there (it always does on transformers' DiffusionGemma)."""
        encoder = self.model.model.encoder
        text = encoder.language_model
        last = text.config.num_hidden_layers - 1
        before = cache.get_seq_length(last)
        token = CACHE_ONLY.set(id(text.layers[last].self_attn))
        stopped = False
        try:
            type(encoder).forward(
                encoder, input_ids=ids, attention_mask=masks, cache=cache, position_ids=positions
            )
        except CacheWritten:
            stopped = True
        finally:
            CACHE_ONLY.reset(token)
        if cache.get_seq_length(last) != before + ids.shape[1]:
            raise RuntimeError(
                f"the encoder's last layer wrote {cache.get_seq_length(last) - before} tokens to "
                f"the cache, not the call's {ids.shape[1]}: this transformers version's "
                "DiffusionGemma encoder does not write its cache before its attention"
            )
        return stopped

    def _text_only(self, args, kwargs, mask_kwargs) -> bool:
        """Whether ``generate``'s encoder call is text only (no image or other inputs), onto a
        cache, with the 2-D mask and positions of those tokens: a call ``_encoder_forward``
        writes the cache with (in chunks where it is long)."""
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
        keys, positions = mask_kwargs.get("attention_mask"), kwargs.get("position_ids")
        return (
            not args
            and isinstance(ids, torch.Tensor)
            and ids.shape[-1] > 0
            and cache is not None
            and all(value is None or key in _PREFILL_KWARGS for key, value in kwargs.items())
            and mask_kwargs.get("mm_token_type_ids") is None
            and isinstance(keys, torch.Tensor)
            and keys.dim() == 2
            and keys.shape[1] == int(cache.get_seq_length()) + ids.shape[1]
            and isinstance(positions, torch.Tensor)
            and positions.shape[-1] == ids.shape[1]
        )

    def _encoder_done(self, module, args, output):
        if self._encoder_slots is not None:
            SLOTS.reset(self._encoder_slots)
            self._encoder_slots = None

    def _decoder_forward(self, *args, **kwargs):
        cache = kwargs.get("cache")
        model = self.model
        if cache is None or kwargs.get("decoder_input_ids") is None:
            return type(model).forward(model, *args, **kwargs)
        if args or any(kwargs.get(k) is not None for k in ("input_ids", "inputs_embeds")):
            # the model's one-shot call, encoder then decoder: what this call's decoder sees is
            # known only once its encoder has run, so it neither votes nor evicts
            if self._holds(cache):
                raise UnsupportedModelError(
                    "a call that encodes input_ids and decodes in one go, on a cache MaskKV "
                    "evicted from: encode them first (the encoder alone, as generate does), "
                    "then call the decoder with decoder_input_ids"
                )
            return type(model).forward(model, *args, **kwargs)
        self.counts["decoder_calls"] += 1
        lengths = self._full_lengths(cache)
        state = state_of(cache)  # MaskKV's record on the cache (None: a cache it never held)
        held = state is not None
        fresh = not held or state.lengths != lengths
        # the slots as the encoder left them: only a fresh cache has any this model has not seen
        slots = self._slots(cache, lengths) if fresh else None
        decoder = self.model.model.decoder
        # on a cache this model holds, the full layers attend to the slots as held (a new cache
        # is unevicted: transformers' own masks hold)
        slot_token = SLOTS.set(
            self._held(slots[1] if fresh else state.valid, decoder, cache) if held else None
        )
        try:
            if not fresh or all(n <= self.budgets[layer] for layer, n in lengths.items()):
                if fresh:
                    self._track(cache, slots)
                return type(model).forward(model, *args, **kwargs)
            self._check_evictable(cache)
            recorder = Votes(self._attention_modules(decoder))
            token = RECORDER.set(recorder)
            try:
                out = type(model).forward(model, *args, **kwargs)
            finally:
                RECORDER.reset(token)
        finally:
            SLOTS.reset(slot_token)
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

    @staticmethod
    def _holds(cache) -> bool:
        """Whether MaskKV tracks the cache's full-layer slots (its record is on the cache)."""
        return state_of(cache) is not None

    def _check_evictable(self, cache) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import DynamicLayer

        if isinstance(cache, StaticCache):
            raise UnsupportedModelError(
                "MaskKV cannot evict from a StaticCache (its slots are fixed): use the default "
                "dynamic cache, or a budget of at least the cache length"
            )
        kinds = {type(cache.layers[layer]) for layer in self.full_layers}
        other = kinds - {DynamicLayer, held_layer_class()}
        if other:  # a quantized or offloaded layer keeps more than ``keys`` / ``values``
            raise UnsupportedModelError(
                "MaskKV evicts from plain DynamicCache layers only; the full-attention layers of "
                f"this cache are {sorted(kind.__name__ for kind in other)}: use the default "
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
        (B, Hkv, L) each; which slots hold a kept real token, per layer (B, Hkv, L) each; the
        absolute length written so far)."""
        state = state_of(cache)
        if state is None and any(
            type(cache.layers[layer]) is held_layer_class() for layer in self.full_layers
        ):
            raise UnsupportedModelError(
                "this cache holds entries MaskKV evicted, but not MaskKV's record of which "
                "position each kept slot holds (a cache object built anew from the layers of an "
                "evicted one?). Start from a new cache (leave cache unset), or pass the cache "
                "object generate returned (a copy of it, or one saved and loaded, will do)"
            )
        previous = state.seen if state is not None else 0
        grown = max(
            lengths[l] - (state.lengths.get(l, 0) if state else 0) for l in self.full_layers
        )
        seen = previous + grown
        positions, valid = {}, {}
        for layer in self.full_layers:
            batch, kv_heads = cache.layers[layer].keys.shape[:2]
            new = torch.arange(previous, seen).expand(batch, kv_heads, -1)  # (B, Hkv, new)
            if state is None:
                old = torch.empty(batch, kv_heads, 0, dtype=torch.long)
                old_valid = torch.empty(batch, kv_heads, 0, dtype=torch.bool)
            else:
                old, old_valid = state.positions[layer], state.valid[layer]
            positions[layer] = torch.cat([old, new], -1)  # (B, Hkv, L)
            valid[layer] = torch.cat([old_valid, self._valid_at(new)], -1)
        return positions, valid, seen

    def _evict(self, cache, recorder: Votes, layer: int, valid: torch.Tensor):
        """Keep each KV head's budget of one full layer's slots: the policy's head allocation
        (``head_budgets_rows``: MaskKV's prompt preference from the canvas queries' prompt mass,
        or uniform) over the held real slots, each head's top canvas votes among them, in
        position order. A layer's heads are padded to its largest budget with slots marked not
        held (masked in every later call, ``slot_mask``). Returns (the slot indices kept
        (B, Hkv, Kmax), which of them are held (B, Hkv, Kmax))."""
        votes = recorder.votes[layer]  # (B, Hkv, L)
        batch, kv_heads, length = votes.shape
        real = valid.to(votes.device)
        available = real.sum(-1)  # (B, Hkv)
        budgets = self.maskkv_config.eviction.head_budgets_rows(
            self.budgets[layer],
            n_kv_heads=kv_heads,
            prompt_len=available.amax(1),
            min_keep=self.maskkv_config.min_keep,
            prompt_mass=recorder.mass[layer],
            n_voters=torch.full((batch,), recorder.voters, device=votes.device),
        )
        budgets = torch.minimum(budgets.to(available.device), available)  # (B, Hkv)
        widest = int(budgets.max())
        scores = lift_recent(
            votes.masked_fill(~real, float("-inf")), real, self.maskkv_config.recent
        )
        index = scores.topk(widest, dim=-1).indices  # (B, Hkv, Kmax), best first
        held = torch.arange(widest, device=index.device) < budgets[..., None]
        order = torch.where(held, index, index + length).argsort(-1)  # held ones by position
        index, held = index.gather(-1, order), held.gather(-1, order)
        cache_layer = cache.layers[layer]
        if type(cache_layer) is not held_layer_class():  # it counts the tokens written from now on
            cache_layer.__class__ = held_layer_class()
            cache_layer.written = cache_layer.keys.shape[-2]
        for name in ("keys", "values"):
            tensor = getattr(cache_layer, name)
            setattr(
                cache_layer,
                name,
                tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1])),
            )
        return index, held

    def _track(self, cache, slots, recorder: Optional[Votes] = None) -> None:
        """Record the cache's full-layer slots (``_slots``) after this call, evicting first
        when ``recorder`` holds votes."""
        positions, valid, seen = slots
        if recorder is not None:
            for layer in self.full_layers:
                votes = recorder.votes.get(layer)
                if votes is None or votes.shape[-1] != positions[layer].shape[-1]:
                    raise RuntimeError(
                        f"layer {layer}: no canvas votes over its {positions[layer].shape[-1]} "
                        "cache entries were recorded; the decoder did not run through MaskKV's "
                        "attention"
                    )
                if votes.shape[-1] <= self.budgets[layer]:
                    continue
                index, held = self._evict(cache, recorder, layer, valid[layer])
                positions[layer] = positions[layer].gather(-1, index.cpu())
                valid[layer] = held.cpu()
            self.counts["evictions"] += 1
        self._last = CacheState(self._full_lengths(cache), positions, valid, seen)
        keep_state(cache, self._last)
