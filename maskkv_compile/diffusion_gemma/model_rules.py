"""The model-specific facts about transformers' DiffusionGemma: which model it is, which layers
are full attention (the ones MaskKV evicts from), and its layer-profile fingerprint."""

from __future__ import annotations

import torch

# the canvas queries are the voters: the policies that rank cache entries by their votes
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
