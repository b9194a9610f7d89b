"""The (B, S, V) logits a drop-in call returns, in buffers reused once nobody holds them.

A step computes only some rows, but the caller's contract is the model's (B, S, V) logits:
the computed rows carry logits, every other row zeros. Allocating and zeroing a fresh
(B, S, V) tensor at every step costs more than the step itself at long context (a fresh
allocation that large is new pages from the OS, each one faulted in). A session therefore
keeps a couple of flat buffers, each with room for a window that grows by some blocks (block
diffusion), returns (B, S, V) views of them, and hands a buffer out again only when nothing
outside this pool references it: no Python reference to the buffer and no other tensor on its
storage (a returned view the caller still holds, a NumPy array, a DLPack export), checked at
the call. A loop that does ``logits = model(x).logits`` still holds the last call's logits
during the next call, so two buffers alternate; a loop that keeps every step's logits gets a
fresh tensor each time, exactly as without the pool. Reuse happens only with gradients off
(inference), so no autograd graph can have saved a buffer. The pool holds its buffers while
the session lives, so it takes only buffers up to ``MAX_POOLED_BYTES``: at a real vocabulary
and a long prompt (LLaDA's 126k tokens at 8k is 4 GB a tensor) two idle buffers would hold
more memory than the allocations cost; use ``response_logits_only()`` (or ``reuse_logits``)
there.

Invariant: a returned tensor holds logits at the rows the call computed and zeros at every
other row, and its contents never change while anything outside the pool references it. A
buffer the caller wrote into (an in-place edit of the returned logits moves its version
counter) is zeroed whole before it serves again.
``MaskKVConfig.reuse_logits`` is the explicit, unchecked form: one buffer, always reused,
its rows outside the computed ones left as earlier calls wrote them.
"""

from __future__ import annotations

import math
import sys

import torch

from maskkv_compile._torch_private import storage_use_count

POOL_SIZE = 2  # the buffer a loop still holds during the next call, and one to reuse
MAX_POOLED_BYTES = 256 << 20  # larger (B, S, V) tensors are allocated per call, never held
MIN_SPARE_ROWS = 64  # room for a growing window: S/8 more rows, at least this many


class LogitsBuffers:
    """One session's logits buffers: each entry is [flat buffer, the (B, S, V) shape last
    viewed, the rows last written, the buffer's version counter after that write (a caller
    that wrote into a returned tensor, say ``logits[..., mask_id] = -inf``, moved it on)].

    A pooled flat buffer is zero everywhere but at the rows last written of the shape last
    viewed (and wherever in that view the caller wrote): so a window that grows clears those
    rows where they were, not the whole buffer (at 8k and a vocabulary of 1024, 10 us instead of
    3 ms). ``shared`` (``reuse_logits``) keeps no such invariant."""

    def __init__(self, shared: bool = False):
        self.shared = shared  # reuse_logits: one buffer, reused unchecked
        self.entries: list[list] = []

    def fill(self, shape: tuple, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A contiguous (B, S, V) tensor shaped ``shape`` holding ``logits`` (B, C, V) at
        ``rows`` (C,) and zeros at every other row."""
        out, entry = self._take(shape, logits, rows)
        out.index_copy_(1, rows, logits)  # only the computed rows: the others stay zero
        if entry is not None:
            entry[3] = entry[0]._version
        return out

    def _take(self, shape: tuple, like: torch.Tensor, rows: torch.Tensor):
        """(the (B, S, V) tensor, zero outside ``rows``; its pool entry, or None when it is
        not pooled)."""
        numel = math.prod(shape)
        for entry in self.entries:  # no local name binds a buffer before _free counts references
            if (
                entry[0].dtype == like.dtype
                and entry[0].device == like.device
                and entry[0].numel() >= numel
                and (self.shared or self._free(entry))
            ):
                out = entry[0][:numel].view(shape)
                if self.shared:  # rows from earlier calls stay; another window moved them all
                    if entry[1] != shape:
                        out.zero_()
                elif entry[0]._version != entry[3]:  # the caller wrote into the last view
                    entry[0][: math.prod(entry[1])].zero_()
                elif entry[1] != shape:  # another window: clear the last rows where they were
                    entry[0][: math.prod(entry[1])].view(entry[1]).index_fill_(1, entry[2], 0)
                elif entry[2] is not rows:  # another layout's rows
                    out.index_fill_(1, entry[2], 0)
                entry[1], entry[2] = shape, rows
                return out, entry
        pooled = self.shared or (
            not torch.is_grad_enabled() and numel * like.element_size() <= MAX_POOLED_BYTES
        )
        if not pooled:
            return like.new_zeros(shape), None
        batch, seq, vocab = shape
        row_bytes = batch * vocab * like.element_size()
        capacity = max(seq, min(seq + max(seq // 8, MIN_SPARE_ROWS), MAX_POOLED_BYTES // row_bytes))
        flat = like.new_zeros(batch * capacity * vocab)  # zero past the view too (invariant)
        out = flat[:numel].view(shape)
        entry = [flat, shape, rows, None]
        self.entries = [entry] if self.shared else [*self.entries[-(POOL_SIZE - 1) :], entry]
        return out, entry

    @staticmethod
    def _free(entry: list) -> bool:
        """Nothing outside this pool holds the entry's buffer (and gradients are off)."""
        if torch.is_grad_enabled():
            return False
        # a pooled buffer's references: its list slot and getrefcount's argument; its storage's:
        # the buffer itself (every returned view adds one while it lives)
        return sys.getrefcount(entry[0]) <= 2 and storage_use_count(entry[0]) <= 1
