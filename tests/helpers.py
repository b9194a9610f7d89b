"""Model builders and inputs shared by the tests (tests/ is on sys.path under pytest)."""

import pytest
import torch

from maskkv_compile.evaluation import FULL
from maskkv_compile.evaluation.suite import FULL_CACHE, FULL_REFRESH, UNCACHED, configurations
from maskkv_compile.tiny_models import tiny_dream, tiny_llada

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
    return [
        [sorted(int(p) for p in head if p >= 0) for head in row] for row in cache.kept_pos.tolist()
    ]


def check_bookkeeping(results: dict, policies, budgets, sample_ids):
    """Sanity checks of the quality JSON's bookkeeping. They are true by construction and are
    NOT evidence about MaskKV: the suite writes every cell with every metric, the full cache's
    agreement with the full cache is computed against itself, and the uncached reference's
    agreement with itself and its KL (set to 0) likewise. They catch a broken writer, nothing
    else; :func:`check_invariants` holds the checks that can fail for a wrong cache."""
    cells = results["cells"]
    for config in configurations(policies, budgets):
        assert set(cells[config.key]) == set(sample_ids), config.key
        for cell in cells[config.key].values():
            assert {"tokens", "score", "agree_uncached", "agree_full", "kl", "seconds"} <= set(cell)
            assert 0.0 <= cell["score"] <= 1.0 and 0.0 <= cell["agree_uncached"] <= 1.0
    for sid in sample_ids:
        assert cells[FULL_CACHE][sid]["agree_full"] == 1.0  # the full cache against itself
        assert (
            cells[UNCACHED][sid]["agree_uncached"] == 1.0 and cells[UNCACHED][sid]["kl"] == 0.0
        )  # same


def check_invariants(results: dict, policies, budgets, sample_ids):
    """Properties of the quality JSON that a wrong cache or suite would break (after the
    :func:`check_bookkeeping` sanity checks, which prove nothing):

    * a prefill at every step (full cache + refresh=1) gives the uncached model's fill and
      logits: the refresh really recomputes the prompt, and the graphs equal the model;
    * with the whole prompt kept, every policy gives the full cache's fill and KL, and keeps
      every prompt entry (for ``mask_voting_uniform`` this is the same configuration as the
      full cache reference, so only the other policies are evidence);
    * under a budget well below the prompt, a cell keeps on average the budget per KV head (at
      least it, and at most 10% more: ``pyramidkv`` rounds its pyramid's small layers up), so
      the evicted rows of the tables really ran evicted."""
    check_bookkeeping(results, policies, budgets, sample_ids)
    cells = results["cells"]
    for sid in sample_ids:
        full = cells[FULL_CACHE][sid]
        prompt_len = results["samples"][sid]["prompt_len"]
        assert (
            cells[FULL_REFRESH][sid]["agree_uncached"] == 1.0
            and cells[FULL_REFRESH][sid]["kl"] < 1e-6
        )
        assert full["kept"] == prompt_len
        for policy in policies:
            cell = cells[f"{policy}@{FULL}"][sid]
            assert cell["agree_full"] == 1.0 and cell["tokens"] == full["tokens"], policy
            assert cell["kl"] == pytest.approx(full["kl"], rel=1e-6, abs=1e-9)
            assert cell["kept"] == prompt_len
            for budget in budgets:
                if budget != FULL and 4 * budget <= prompt_len:
                    kept = cells[f"{policy}@{budget}"][sid]["kept"]
                    assert budget - 1e-9 <= kept <= 1.1 * budget, (policy, budget, kept)


def reset_or_perturb(action: str, rng, model, optimized) -> bool:
    """The actions of a seeded call sequence that generate nothing: ``"reset"`` resets the
    optimized model, ``"weights"`` scales one of the first two layers' MLP weights in place (a
    weight change between calls). True when ``action`` was one of them."""
    if action == "reset":
        optimized.reset()
    elif action == "weights":
        with torch.no_grad():
            model.model.layers[rng.randrange(2)].mlp.up_proj.weight.mul_(1.05)
    return action in ("reset", "weights")
