"""Model builders and inputs shared by the tests (tests/ is on sys.path under pytest)."""

import torch

from maskkv_compile.models import tiny_dream, tiny_llada

FAMILIES = {"llada": tiny_llada, "dream": tiny_dream}
MODEL_KINDS = [(family, attn) for family in FAMILIES for attn in ("sdpa", "eager")]


def build(family: str, attn: str = "sdpa", dtype=torch.float32, **kwargs):
    return FAMILIES[family](attn=attn, dtype=dtype, **kwargs)


def prompt_and_masks(model, prompt_len: int, gen_len: int, batch: int = 1, seed: int = 1):
    """(B, P + L) ids: random prompt tokens (never the mask id), then L masks."""
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, mask_id, (batch, prompt_len), generator=gen)
    x = torch.cat([prompt, torch.full((batch, gen_len), mask_id)], dim=1)
    return prompt, x


def kept_positions(cache) -> list[list[list[int]]]:
    """The absolute positions a LayerCache keeps, per batch row and KV head, padding dropped."""
    return [[sorted(int(p) for p in head if p >= 0) for head in row] for row in cache.kept_pos.tolist()]
