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
  to the kept entries, and the next canvas votes over [kept ; new canvas]. An evicted layer
  still answers ``get_seq_length()`` with the tokens written (``_held_layer``), so a later
  ``generate`` on the returned cache (a chat's next turn) places its tokens where the plain
  model does.
- **Sliding-window layers** keep their window: it is already bounded.
- **Encoder calls write the cache and stop.** ``generate`` reads an encoder call for its cache
  alone. The encoder's last attention, once its K/V are in the cache, raises
  (``_CacheWritten``), so that layer's attention, MLP and experts and the final norm do not
  run (a model-specific rule: transformers' DiffusionGemma writes the cache before its
  attention; a call that did not write it is an error). A direct encoder call is untouched.
- **Prefill in chunks.** ``generate`` encodes the prompt in one encoder call; here a prompt
  longer than ``prefill_chunk`` goes in chunks of that many tokens onto the same cache, each
  with the masks ``generate`` builds for a call on that cache (it asks for them right before
  the encoder call; they are built at the call, per chunk). Exact: the encoder is causal. A
  long call's sliding-window (or causal) attention runs 512 queries at a time against the
  keys their mask lets them see (``banded_key_ranges``), not the whole (S, S).
- **Budgets** over the full layers: uniform, or with a layer profile measured by
  ``maskkv_compile.calibrate(model, prompts)`` (which runs :func:`calibrate` here: the
  importance of each full layer's attention sub-layer on the first decoder call's canvas)
  MaskKV's boundary-aware split over the full layers. A layer's budget is split over its KV
  heads by the policy: ``maskkv``'s prompt-preference allocation from the
  canvas queries' attention mass on the cache (the paper's head budgets), or uniform
  (``mask_voting_uniform``). A cache layer is one (B, Hkv, L, D) tensor, so a layer's heads
  are padded to its largest budget with slots marked not held; every later call on that cache
  (decoder and encoder) attends to the held slots only (``_slot_mask``), and a vote runs per
  KV head with that head's slots. Mask-voting policies only: the canvas queries are the
  voters.

Invariants:
- With a budget of at least the cache length nothing is evicted, and ``generate`` gives the
  plain model's tokens (bit for bit in float64; in float32 a chunked prefill's matmuls round
  differently from the whole call's, as any change of shape does).
- Under eviction, the kept positions of a layer and head are the top-``budget`` of that
  head's canvas votes at the first decoder call of the canvas
  (``tests/test_diffusion_gemma.py`` checks both against the unoptimized model).

Padded batches: a full layer's slots carry a (B, Hkv, L) pattern of which hold a real, kept
token (the prompt's padding is not held). A row's kept slots are its top real entries in
position order; a row with fewer real entries than its budget keeps them all. Slots not held
get no votes and no attention: the full-attention masks that transformers builds from the
2-D padding mask assume an unevicted cache, so on a cache this model holds, the decoder's and
the encoder's full layers attend through masks built from the slots as held.

Refused with an error that says what to do: eviction under a ``StaticCache``, whose slots are
fixed. At full budget it runs the plain model unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch

from maskkv_compile.config import MaskKVConfig
from maskkv_compile.kernels.attention import QUERY_CHUNK, banded_key_ranges
from maskkv_compile.passes import UnsupportedModelError
from maskkv_compile.passes.evict_kv import layer_budgets
from maskkv_compile.policy_ops import lift_recent

ATTENTION = "maskkv_dg_sdpa"
_RECORDER: contextvars.ContextVar[Optional["_Votes"]] = contextvars.ContextVar(
    "maskkv_dg_votes", default=None
)
# id(attention module) -> (B, Hkv, L) which cached slots hold a kept real token, for a call on a
# cache this model has evicted from or holds padding in (unset: transformers' own masks hold)
_SLOTS: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "maskkv_dg_slots", default=None
)
# id(attention module) of the encoder's last layer, during an encoder call whose output is its
# cache alone (``generate``'s): that attention raises _CacheWritten once it has written the cache
_CACHE_ONLY: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar(
    "maskkv_dg_cache_only", default=None
)
MASK_VOTING_POLICIES = ("maskkv", "mask_voting_uniform")


def is_diffusion_gemma(model: torch.nn.Module) -> bool:
    """The model-specific rule: transformers' DiffusionGemma (encoder + decoder + canvas)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "diffusion_gemma" and hasattr(
        getattr(model, "model", None), "decoder"
    )


def full_layers(model: torch.nn.Module) -> tuple[int, ...]:
    """The indices of the full-attention layers: the layers MaskKV evicts from."""
    kinds = model.config.get_text_config().layer_types
    return tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")


def layer_fingerprint(model: torch.nn.Module) -> dict:
    """The layer-profile fingerprint of a DiffusionGemma model: its profile's layers are the
    full-attention layers (``n_layers`` counts them, ``full_layers`` lists them). Head shapes
    are read from the decoder's attention modules: transformers refuses per-layer fields of a
    heterogeneous config at its top level."""
    full = full_layers(model)
    attention = [model.model.decoder.layers[i].self_attn for i in full]
    return {
        "model_class": type(model).__name__,
        "n_layers": len(full),
        "full_layers": list(full),
        "hidden_size": int(model.config.get_text_config().hidden_size),
        "kv_heads_x_head_dim": [
            [a.k_proj.out_features // a.head_dim, a.head_dim] for a in attention
        ],
    }


class _CacheWritten(Exception):
    """Raised by the encoder's last attention under ``generate``: the cache is written, and
    nothing after it in the encoder feeds what ``generate`` reads."""


class _FirstDecoderCallDone(Exception):
    """Raised by :func:`calibrate`'s hook: the voting call has been measured."""


@torch.no_grad()
def calibrate(model: torch.nn.Module, prompts):
    """The layer profile of a DiffusionGemma model (``maskkv_compile.calibrate`` runs this).

    Per prompt ((1, P) or (P,) token ids), transformers' ``generate`` runs up to its first
    decoder call (the call whose canvas queries vote), and each full-attention layer's
    importance ``I_l = 1 - mean_i cos(h_in[i], h_out[i])`` is measured on its canvas rows, with
    ``h_in`` the decoder layer's input and ``h_out = h_in +`` its normed attention output (the
    residual after the attention sub-layer). The canvas is drawn with a fixed seed, and the
    caller's RNG is left as it was."""
    from maskkv_compile.profile import LayerProfile, attention_importance

    full = full_layers(model)
    layers = model.model.decoder.layers
    captured: dict[int, list[torch.Tensor]] = {}

    def layer_input(layer):
        def hook(module, args, kwargs):
            captured[layer] = [args[0] if args else kwargs["hidden_states"]]

        return hook

    def attention_output(layer):
        def hook(module, args, output):
            captured[layer].append(output)

        return hook

    def stop(module, args, output):
        raise _FirstDecoderCallDone

    hooks = [layers[i].register_forward_pre_hook(layer_input(i), with_kwargs=True) for i in full]
    hooks += [
        layers[i].post_attention_layernorm.register_forward_hook(attention_output(i)) for i in full
    ]
    hooks.append(model.model.decoder.register_forward_hook(stop))
    per_prompt = []
    model.eval()
    try:
        for prompt in prompts:
            prompt = prompt if prompt.dim() == 2 else prompt[None]
            if prompt.shape[0] != 1:
                raise ValueError(f"calibrate takes one prompt at a time, got {tuple(prompt.shape)}")
            captured.clear()
            device = prompt.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                try:
                    model.generate(prompt, max_new_tokens=model.config.canvas_length)
                except _FirstDecoderCallDone:
                    pass
            missing = [i for i in full if len(captured.get(i, ())) != 2]
            if missing:
                raise RuntimeError(f"calibrate: no decoder call reached full layers {missing}")
            per_prompt.append(
                [attention_importance(h, h + a) for h, a in (captured[i] for i in full)]
            )
    finally:
        for hook in hooks:
            hook.remove()
    if not per_prompt:
        raise ValueError("calibrate needs at least one prompt")
    return LayerProfile.from_measurements(
        per_prompt,
        layer_fingerprint(model),
        layers="full_attention",
        canvas_length=model.config.canvas_length,
    )


@dataclass
class _Votes:
    """What one decoder call records: per full-attention layer, the canvas votes (B, Hkv, P).
    ``modules``: the decoder's full-attention modules -> their layer (the vision tower and the
    encoder share the attention function, never these modules)."""

    modules: dict[int, int]  # id(attention module) -> layer index
    votes: dict[int, torch.Tensor] = field(default_factory=dict)
    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H) on the cache
    voters: int = 0  # canvas rows


def _slot_mask(valid: torch.Tensor, heads: int, new: int, causal: bool) -> torch.Tensor:
    """(B, H, new, L + new) bool: each query head sees its KV head's held slots (``valid``
    (B, Hkv, L)) and the call's own ``new`` keys (all of them, or causally)."""
    batch, kv_heads, _ = valid.shape
    cached = valid.repeat_interleave(heads // kv_heads, 1)[:, :, None, :]  # (B, H, 1, L)
    fresh = torch.ones(new, new, dtype=torch.bool, device=valid.device)
    fresh = fresh.tril() if causal else fresh
    return torch.cat(
        [cached.expand(-1, -1, new, -1), fresh.expand(batch, heads, -1, -1)], -1
    )  # (B, H, new, L + new)


def _votes(query, key, scale, key_valid, kv_valid=None):
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


def _query_chunk(module) -> int:
    """Query rows per band of a long banded call. A band of ``c`` queries under a sliding window
    ``w`` spans ``w + c - 1`` keys: a quarter of the window wastes a fifth of its scores on
    masked ones (``QUERY_CHUNK`` queries against a window of 512 waste half)."""
    window = getattr(module, "sliding_window", None)
    return QUERY_CHUNK if not window else min(QUERY_CHUNK, max(64, window // 4))


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the cache's slots as held, and when a decoder call is voting, the canvas
    queries' votes over the cache part of ``key`` (everything before the canvas) at the
    full-attention layers. A long call under a banded mask goes in query chunks, each against
    its band of keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _CACHE_ONLY.get() == id(module):  # the module wrote its K/V to the cache before this call
        raise _CacheWritten
    slots = _SLOTS.get()
    held = None if slots is None else slots.get(id(module))  # (B, Hkv, L)
    if held is not None:  # a full layer whose slots are evicted per head or padding
        if held.shape[-1] != key.shape[2] - query.shape[2]:
            raise RuntimeError(
                f"MaskKV tracks {held.shape[-1]} cache slots of a full-attention layer, the call "
                f"has {key.shape[2] - query.shape[2]}: the cache changed outside MaskKV"
            )
        causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
        held = held.to(query.device)
        attention_mask = _slot_mask(held, query.shape[1], query.shape[2], causal)
    recorder = _RECORDER.get()
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
        votes, mass = _votes(query, key, scale, key_valid, held)
        recorder.votes[layer], recorder.mass[layer] = votes, mass  # (B, Hkv, cached), (B, H)
        recorder.voters = query.shape[2]
    rows = _query_chunk(module)
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


def _register() -> None:
    """Register the attention function (and SDPA's mask builder under its name) with
    transformers: done once, when a DiffusionGemma model is first optimized."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, _attention)
    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@functools.cache
def _held_layer() -> type:
    """The class of a full-attention cache layer MaskKV has evicted from: a transformers
    ``DynamicLayer`` that holds fewer slots than the tokens written to it. ``get_seq_length``
    answers the tokens written, as the plain model's layer does (``generate`` counts the
    positions of a later call on the cache from it, and transformers' masks their queries'
    offset); ``get_mask_sizes`` the slots held (the keys a call attends to). An evicted layer
    of the user's cache becomes one in place. A padded batch's masks over held slots are
    MaskKV's own (``_slot_mask``)."""
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
        return _held_layer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the encoder's keyword arguments a chunked prefill handles (any other, given: one call)
_PREFILL_KWARGS = ("input_ids", "attention_mask", "cache", "position_ids")


class _DeferredMasks(dict):
    """The arguments of ``generate``'s ``encoder.create_masks_for_generate`` call, in place
    of the masks (an empty dict, as the encoder takes a dict of masks). Only
    ``DiffusionGemmaMaskKV._encoder_forward`` receives one: it builds the masks."""

    def __init__(self, kwargs: dict):
        super().__init__()
        self.kwargs = kwargs


@dataclass
class _CacheState:
    """What this model last did to one cache object."""

    cache: "weakref.ref"  # the cache object (a new one, even at a reused address, is new)
    lengths: dict[int, int]  # full layer -> entries after the last eviction
    positions: dict[int, torch.Tensor]  # full layer -> (B, Hkv, L) absolute position per slot
    valid: dict[int, torch.Tensor]  # full layer -> (B, Hkv, L): the slot holds a kept real token
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
        fingerprint = layer_fingerprint(model)
        if config.profile is not None:
            config.profile.check_compatible(fingerprint)
        _register()
        self.model = model.eval()
        self.config = config
        self.full_layers = tuple(fingerprint["full_layers"])
        # full layer -> its budget per KV head on average (the policy's layer allocation, in
        # integral slots per layer as for every other model)
        kv_heads = [heads for heads, _ in fingerprint["kv_heads_x_head_dim"]]
        self.budgets = dict(zip(self.full_layers, layer_budgets(config, kv_heads)))
        self._state: Optional[_CacheState] = None
        self._padding: Optional[torch.Tensor] = None  # (B, P) of the running generate
        self._encoder_slots = None  # the _SLOTS token of a running encoder call
        self.counts = {
            "decoder_calls": 0,
            "votes": 0,
            "evictions": 0,
            "encoder_calls": 0,
            "prefill_chunks": 0,  # encoder calls that long prefills were split into
            "cache_only_encoder_calls": 0,  # encoder calls stopped once the cache was written
        }

    # ------------------------------------------------------------------ public surface

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
        if kwargs.get("cache") is None:  # a new cache: nothing of the last one carries over
            self._state = None
        with self._routed(kwargs.get("attention_mask"), generating=True):
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
                            "kept_per_kv_head": state.valid[layer][0].sum(-1).tolist(),
                            # (B, Hkv, slots) in position order; -1 where a slot is not held
                            "positions": positions.masked_fill(~state.valid[layer], -1).tolist(),
                        }
                    )
        return {
            "policy": self.config.eviction.name,
            "budget": self.config.budget,
            "layer_allocation": f"{self.config.eviction.layer_allocation()} over the full "
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
            for hook in hooks:
                hook.remove()
            del model.forward, encoder.forward
            encoder.__dict__.pop("create_masks_for_generate", None)
            model.set_attn_implementation(before)

    def _attention_modules(self, stack) -> dict[int, int]:
        """id(attention module) -> layer, for the full-attention layers of a layer stack."""
        return {id(stack.layers[i].self_attn): i for i in self.full_layers}

    def _held(self, valid: dict, stack) -> Optional[dict]:
        """_SLOTS for a call on ``stack`` (the encoder's or decoder's layers): the full layers
        whose slots are not all held (evicted per head, or padding), or every full layer when
        the batch is padded or the full layers hold different numbers of slots (transformers
        builds one full-attention mask, from the 2-D padding mask and one layer's length, for
        an unevicted cache), else None."""
        ragged = len({valid[layer].shape[-1] for layer in self.full_layers}) > 1
        held = {
            id(stack.layers[layer].self_attn): valid[layer]
            for layer in self.full_layers
            if self._padding is not None or ragged or not bool(valid[layer].all())
        }
        return held or None

    def _encoder_call(self, module, args, kwargs):
        """Count the call; on a cache this model holds, the encoder's full layers attend to the
        slots as held (kept ones, in their order), and its own new tokens causally."""
        self.counts["encoder_calls"] += 1
        cache = kwargs.get("cache")
        if self._holds(cache):
            valid = self._slots(cache, self._full_lengths(cache))[1]
            self._encoder_slots = _SLOTS.set(self._held(valid, module.language_model))
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
        chunk = self.config.prefill_chunk
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
        token = _CACHE_ONLY.set(id(text.layers[last].self_attn))
        stopped = False
        try:
            type(encoder).forward(
                encoder, input_ids=ids, attention_mask=masks, cache=cache, position_ids=positions
            )
        except _CacheWritten:
            stopped = True
        finally:
            _CACHE_ONLY.reset(token)
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
            _SLOTS.reset(self._encoder_slots)
            self._encoder_slots = None

    def _decoder_forward(self, *args, **kwargs):
        cache = kwargs.get("cache")
        model = self.model
        if cache is None or kwargs.get("decoder_input_ids") is None:
            return type(model).forward(model, *args, **kwargs)
        self.counts["decoder_calls"] += 1
        lengths = self._full_lengths(cache)
        held = self._holds(cache)
        fresh = not held or self._state.lengths != lengths
        # the slots as the encoder left them: only a fresh cache has any this model has not seen
        slots = self._slots(cache, lengths) if fresh else None
        decoder = self.model.model.decoder
        # on a cache this model holds, the full layers attend to the slots as held (a new cache
        # is unevicted: transformers' own masks hold)
        slot_token = _SLOTS.set(
            self._held(slots[1] if fresh else self._state.valid, decoder) if held else None
        )
        try:
            if not fresh or all(n <= self.budgets[layer] for layer, n in lengths.items()):
                if fresh:
                    self._track(cache, slots)
                return type(model).forward(model, *args, **kwargs)
            self._check_evictable(cache)
            recorder = _Votes(self._attention_modules(decoder))
            token = _RECORDER.set(recorder)
            try:
                out = type(model).forward(model, *args, **kwargs)
            finally:
                _RECORDER.reset(token)
        finally:
            _SLOTS.reset(slot_token)
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
        from transformers.cache_utils import DynamicLayer

        if isinstance(cache, StaticCache):
            raise UnsupportedModelError(
                "MaskKV cannot evict from a StaticCache (its slots are fixed): use the default "
                "dynamic cache, or a budget of at least the cache length"
            )
        kinds = {type(cache.layers[layer]) for layer in self.full_layers}
        other = kinds - {DynamicLayer, _held_layer()}
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
        state = self._state if self._holds(cache) else None
        if state is None and any(
            type(cache.layers[layer]) is _held_layer() for layer in self.full_layers
        ):
            raise UnsupportedModelError(
                "this cache holds entries MaskKV evicted, but not under this model's current "
                "state (reset() was called since, or another optimized model evicted it): which "
                "position each kept slot holds is unknown. Start from a new cache (leave cache "
                "unset), or keep using it on the model that evicted it without reset()"
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

    def _evict(self, cache, recorder: _Votes, layer: int, valid: torch.Tensor):
        """Keep each KV head's budget of one full layer's slots: the policy's head allocation
        (``head_budgets_rows``: MaskKV's prompt preference from the canvas queries' prompt mass,
        or uniform) over the held real slots, each head's top canvas votes among them, in
        position order. A layer's heads are padded to its largest budget with slots marked not
        held (masked in every later call, ``_slot_mask``). Returns (the slot indices kept
        (B, Hkv, Kmax), which of them are held (B, Hkv, Kmax))."""
        votes = recorder.votes[layer]  # (B, Hkv, L)
        batch, kv_heads, length = votes.shape
        real = valid.to(votes.device)
        available = real.sum(-1)  # (B, Hkv)
        budgets = self.config.eviction.head_budgets_rows(
            self.budgets[layer],
            n_kv_heads=kv_heads,
            prompt_len=available.amax(1),
            min_keep=self.config.min_keep,
            prompt_mass=recorder.mass[layer],
            n_voters=torch.full((batch,), recorder.voters, device=votes.device),
        )
        budgets = torch.minimum(budgets.to(available.device), available)  # (B, Hkv)
        widest = int(budgets.max())
        scores = lift_recent(votes.masked_fill(~real, float("-inf")), real, self.config.recent)
        index = scores.topk(widest, dim=-1).indices  # (B, Hkv, Kmax), best first
        held = torch.arange(widest, device=index.device) < budgets[..., None]
        order = torch.where(held, index, index + length).argsort(-1)  # held ones by position
        index, held = index.gather(-1, order), held.gather(-1, order)
        cache_layer = cache.layers[layer]
        if type(cache_layer) is not _held_layer():  # it counts the tokens written from now on
            cache_layer.__class__ = _held_layer()
            cache_layer.written = cache_layer.keys.shape[-2]
        for name in ("keys", "values"):
            tensor = getattr(cache_layer, name)
            setattr(
                cache_layer,
                name,
                tensor.gather(2, index[..., None].expand(-1, -1, -1, tensor.shape[-1])),
            )
        return index, held

    def _track(self, cache, slots, recorder: Optional[_Votes] = None) -> None:
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
        self._state = _CacheState(
            weakref.ref(cache), self._full_lengths(cache), positions, valid, seen
        )
