"""``maskkv::selection_scores`` and ``maskkv::head_budgets``: a policy's per-layer decisions.

Both wrap the pure-torch policy math of ``maskkv_compile.budgets`` (the registry of voters
and allocators) so that the prefill graph decides each layer's kept set right after that
layer's attention, with the policy named by a string argument.

``selection_scores(votes (B, Hkv, P), policy, kernel, sink, seed) -> (B, Hkv, P)``: what the
per-head top-k ranks (votes as they are, SnapKV-pooled, StreamingLLM's sink+recent order,
or seeded random scores).

``head_budgets(prompt_mass (B, H), scores (B, Hkv, P), voter_idx (Rv,), layer_budget,
budget, policy, alpha, min_keep) -> (Hkv,) int64``: the layer's per-KV-head budgets; they
sum to round(Hkv * layer_budget) and lie in [min(min_keep, P), P]. A prompt no longer than
the model-wide average ``budget`` is kept whole in every layer, whatever the policy.
"""

from __future__ import annotations

import torch

from maskkv_compile.policies import get_policy


@torch.library.custom_op("maskkv::selection_scores", mutates_args=())
def selection_scores(votes: torch.Tensor, policy: str, kernel: int, sink: int, seed: int) -> torch.Tensor:
    chosen = get_policy(policy)
    scores = chosen.selection_scores(votes, tuple(votes.shape), votes.device, kernel=kernel, sink=sink, seed=seed)
    return scores.to(votes.dtype).contiguous().clone()


@selection_scores.register_fake
def _(votes, policy, kernel, sink, seed):
    return torch.empty_like(votes)


@torch.library.custom_op("maskkv::head_budgets", mutates_args=())
def head_budgets(
    prompt_mass: torch.Tensor,
    scores: torch.Tensor,
    voter_idx: torch.Tensor,
    layer_budget: float,
    budget: int,
    policy: str,
    alpha: float,
    min_keep: int,
) -> torch.Tensor:
    if scores.shape[2] <= budget:  # the prompt fits the budget: nothing to evict, under any policy
        return torch.full((scores.shape[1],), scores.shape[2], dtype=torch.long, device=scores.device)
    chosen = get_policy(policy)
    options = {"alpha": alpha} if chosen.head_allocator == "maskkv" else {}
    budgets = chosen.head_budgets(
        layer_budget, n_kv_heads=scores.shape[1], prompt_len=scores.shape[2], min_keep=min_keep,
        prompt_mass=prompt_mass, n_voters=max(voter_idx.numel(), 1), votes=scores, **options,
    )
    return budgets.to(device=scores.device, dtype=torch.long).clone()


@head_budgets.register_fake
def _(prompt_mass, scores, voter_idx, layer_budget, budget, policy, alpha, min_keep):
    return scores.new_empty((scores.shape[1],), dtype=torch.long)
