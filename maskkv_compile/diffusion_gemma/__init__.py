"""MaskKV for DiffusionGemma: canvas-query voting over the encoder cache, under transformers' own
``generate``.

This package is the one place that knows DiffusionGemma. Every model-specific rule lives here:
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
  (``held_cache.MaskKVHeldLayer``) still answers ``get_seq_length()`` with the tokens
  written, so a later ``generate`` on the returned cache (a chat's next turn) places its
  tokens where the plain model does.
- **Sliding-window layers** keep their window: it is already bounded.
- **Encoder calls write the cache and stop.** ``generate`` reads an encoder call for its cache
  alone. The encoder's last attention, once its K/V are in the cache, raises
  (``attention.CacheWritten``), so that layer's attention, MLP and experts and the final norm do not
  run (a model-specific rule: transformers' DiffusionGemma writes the cache before its
  attention; a call that did not write it is an error). A direct encoder call is untouched.
- **Prefill in chunks.** ``generate`` encodes the prompt in one encoder call; here a prompt
  longer than ``prefill_chunk`` goes in chunks of that many tokens onto the same cache, each
  with the masks ``generate`` builds for a call on that cache (it asks for them right before
  the encoder call; they are built at the call, per chunk). Exact: the encoder is causal. A
  long call's sliding-window (or causal) attention runs in bands of queries (a quarter of the
  window, 128 for a window of 512; else 512), each against the keys its mask lets it see
  (``banded_key_ranges``), not the whole (S, S).
- **Budgets** over the full layers: uniform, or with a layer profile measured by
  ``maskkv_compile.calibrate(model, prompts)`` (which runs ``canvas_profile.calibrate``: the
  importance of each full layer's attention sub-layer on the first decoder call's canvas)
  MaskKV's boundary-aware split over the full layers. A layer's budget is split over its KV
  heads by the policy: ``maskkv``'s prompt-preference allocation from the
  canvas queries' attention mass on the cache (the paper's head budgets), or uniform
  (``mask_voting_uniform``). A cache layer is one (B, Hkv, L, D) tensor, so a layer's heads
  are padded to its largest budget with slots marked not held; every later call on that cache
  (decoder and encoder) attends to the held slots only (``attention.slot_mask``), and a vote
  runs per KV head with that head's slots. Mask-voting policies only: the canvas queries are the
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

Modules:
- ``model_rules``: which models and layers are DiffusionGemma's (the model-specific facts);
- ``attention``: the registered attention function (votes, held slots, banded long calls);
- ``held_cache``: the cache layer class an evicted layer becomes, and the record of its slots
  that each cache object carries;
- ``canvas_profile``: ``calibrate``'s layer importance on the voting call;
- ``runtime``: ``DiffusionGemmaMaskKV``, which routes ``generate``'s encoder and decoder calls.
"""

from maskkv_compile.diffusion_gemma.canvas_profile import calibrate
from maskkv_compile.diffusion_gemma.model_rules import is_diffusion_gemma
from maskkv_compile.diffusion_gemma.runtime import DiffusionGemmaMaskKV

__all__ = ["DiffusionGemmaMaskKV", "calibrate", "is_diffusion_gemma"]
