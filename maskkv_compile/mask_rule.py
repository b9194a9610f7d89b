"""What a model does with a 2-D ``attention_mask``, found by asking it.

A 2-D (batch, seq) mask is padding to a bidirectional model (LLaDA, Dream), but a
block-diffusion model may turn it into a block-causal mask inside its ``forward`` (a
``block_size`` in its config; diffusers' ``LLaDA2Pipeline`` passes a 2-D mask and
``position_ids`` and leaves the block structure to the model). The optimized model never traces
the mask, so it must know which: :func:`probe_block_length` runs the original model, once per
optimized model, on a short sequence of ``PROBE_LENGTH`` tokens with a 2-D mask of ones, and
changes one token at a time to see which rows its change reaches:

* every row: bidirectional, the mask is padding (None);
* a suffix of rows from the start of the changed token's block: block-causal; changing the
  last token before that block gives the block before it, hence the block length (the grid
  starts at position 0, checked);
* only the token's own row: a causal LM, which is refused (it is no diffusion LM).

Three forward passes of the original model on ``PROBE_LENGTH`` tokens, with no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

PROBE_LENGTH = 128  # covers blocks of up to 64 (SDAR uses 4 to 64, LLaDA2 32)


def _logits(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _reached(model, ids, changed_at: int, base: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """(S,) bool: the rows whose logits change when the token at ``changed_at`` changes."""
    other = ids.clone()
    other[0, changed_at] = (other[0, changed_at] + 1) % max(int(ids.max()) + 2, 2)
    return (_logits(model(input_ids=other, **kwargs)) != base).flatten(2).any(-1)[0]


def probe_block_length(model: torch.nn.Module, takes_position_ids: bool) -> Optional[int]:
    """The block length the model makes of a 2-D mask, or None when it keeps attention
    bidirectional (the mask is then padding)."""
    config = getattr(model, "config", None)
    length = min(
        PROBE_LENGTH, getattr(config, "max_position_embeddings", PROBE_LENGTH) or PROBE_LENGTH
    )
    vocab = getattr(config, "vocab_size", None) or 32
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ids = ((torch.arange(length, device=device) * 7 + 3) % min(vocab - 1, 997))[None]
    kwargs = {"attention_mask": torch.ones_like(ids)}
    if takes_position_ids:
        kwargs["position_ids"] = torch.arange(length, device=device)[None]
    with torch.no_grad():
        base = _logits(model(input_ids=ids, **kwargs))
        last = _reached(model, ids, length - 1, base, kwargs)
        if bool(last.all()):
            return None
        start = int(last.nonzero()[0])
        suffix = bool(last[start:].all())
        if suffix and start == length - 1:
            raise ValueError(
                "the model attends causally under a 2-D attention_mask (a change to the last "
                "token reaches only its own row): a causal LM, not a diffusion LM"
            )
        before = _reached(model, ids, start - 1, base, kwargs) if start > 0 else None
    if not suffix or before is None or not bool(before[int(before.nonzero()[0]) :].all()):
        raise ValueError(
            "the model's attention under a 2-D attention_mask is neither bidirectional nor "
            f"block-causal: a change to the last of {length} tokens reaches rows "
            f"{last.nonzero().flatten().tolist()}"
        )
    block = start - int(before.nonzero()[0])
    if block <= 0 or start % block:
        raise ValueError(
            f"the model's blocks under a 2-D attention_mask do not start at position 0 "
            f"(blocks of {block} ending at {start}): pass the 4-D block mask yourself"
        )
    return block


def grid_ends(seq: int, block: int, device=None) -> torch.Tensor:
    """(S,) one past the end of each position's block, on the grid from position 0."""
    pos = torch.arange(seq, device=device)
    return ((pos // block + 1) * block).clamp(max=seq)
