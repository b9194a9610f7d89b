"""``maskkv::selection_scores`` and ``maskkv::head_budgets``: a policy's per-layer decisions.

Policy code, not kernels (they moved here from ``kernels/budget_ops.py`` so that the kernel
layer imports no policy): registered by ``maskkv_compile.policies``, which imports this module.
Both wrap the pure-torch policy math (``maskkv_compile.policies`` and ``budgets``) so that the
prefill graph decides each layer's kept set right after that layer's attention, with the policy
named by a string argument. Both work row by row: a row's scores and budgets are computed from that
row's own prompt entries, exactly as if it were alone (batch invariance).

``selection_scores(votes (B, Hkv, P), prompt_valid (B, P), policy, kernel, sink, seed, recent)
-> (B, Hkv, P)``: what the per-head top-k ranks (votes as they are, SnapKV-pooled,
StreamingLLM's sink+recent order, or seeded random scores), computed over the row's valid
prompt columns in order; ``-inf`` at the other columns, which are never kept. Then
``recent`` (``MaskKVConfig.recent``) lifts the row's last ``recent`` valid columns (the prompt
entries nearest the response, or the prefix entries just before a block) above every other
score, the nearest highest (:func:`lift_recent`): every head keeps them first, the nearest
ones where its budget is smaller. Every policy
but the random one does this for every row at once, without reading the device (SnapKV's
pooling and StreamingLLM's order run on each row's own columns moved to the front); the
random scores go row by row (each row's columns read on the host, once per layer).

``head_budgets(prompt_mass (B, H), scores (B, Hkv, P), voter_valid (B, Rv), layer_budget,
budget, policy, alpha, min_keep) -> (B, Hkv) int64``: each row's per-KV-head budgets; they
sum to round(Hkv * layer_budget) and lie in [min(min_keep, P_b), P_b], P_b the row's prompt
length (its finite scores). A row whose prompt is no longer than the model-wide average
``budget`` is kept whole in every layer, whatever the policy. The uniform and maskkv head
allocators (every policy but AdaKV) do every row at once on the device and read nothing, so
under them a prefill graph needs no host synchronisation; AdaKV goes row by row on the CPU.
"""

from __future__ import annotations

import torch

from maskkv_compile.policies import get_policy, snapkv_pool, streaming_votes_rows


def own_columns_first(prompt_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) -> (order, own), each (B, P): ``order`` lists each row's own prompt columns first,
    in column order, then the others; ``own`` is True over the first ``P_b`` places."""
    order = torch.sort((~prompt_valid).to(torch.uint8), dim=1, stable=True).indices
    own = torch.arange(prompt_valid.shape[1], device=prompt_valid.device) < prompt_valid.sum(
        1, keepdim=True
    )
    return order, own


def lift_recent(scores: torch.Tensor, valid: torch.Tensor, recent: int) -> torch.Tensor:
    """``scores`` (..., P) with each row's last ``recent`` valid columns (``valid`` (..., P) or
    broadcastable to it, columns in position order) raised above every finite score: the
    nearest column gets the highest, so a top-k of ``k < recent`` keeps the ``k`` nearest.
    The lift is ``1 + max |finite score|`` plus the column's rank in the window (1 to
    ``recent``), exact in the float32/float64 scores the votes are accumulated in."""
    if recent <= 0 or scores.shape[-1] == 0:  # nothing to lift
        return scores
    after = valid.flip(-1).cumsum(-1).flip(-1)  # valid columns at or after this one, per row
    near = valid & (after <= recent)  # broadcast over the heads below
    finite = torch.where(torch.isfinite(scores), scores.abs(), 0)
    base = finite.amax(-1, keepdim=True) + 1  # (..., 1)
    return torch.where(near, base + (recent + 1 - after).to(scores.dtype), scores)


@torch.library.custom_op("maskkv::selection_scores", mutates_args=())
def selection_scores(
    votes: torch.Tensor,
    prompt_valid: torch.Tensor,
    policy: str,
    kernel: int,
    sink: int,
    seed: int,
    recent: int,
) -> torch.Tensor:
    if votes.shape[-1] == 0:  # no prompt column to score (a window with nothing before it)
        return votes.clone()
    return lift_recent(
        _policy_scores(votes, prompt_valid, policy, kernel, sink, seed),
        prompt_valid[:, None, :],
        recent,
    )


def _policy_scores(votes, prompt_valid, policy, kernel, sink, seed) -> torch.Tensor:
    chosen = get_policy(policy)
    if chosen.vote_transform == "none":  # votes as they are: the same for every row at once
        return torch.where(prompt_valid[:, None, :], votes, float("-inf"))
    if chosen.vote_transform in (
        "snapkv_pool",
        "streaming",
    ):  # every row at once, its own columns moved first
        order, own = own_columns_first(prompt_valid)
        at = order[:, None, :].expand_as(votes)  # (B, Hkv, P)
        if (
            chosen.vote_transform == "snapkv_pool"
        ):  # zeros past the row's prompt: the pooling's own zero padding
            scores = snapkv_pool(torch.where(own[:, None, :], votes.gather(-1, at), 0), kernel)
        else:
            scores = streaming_votes_rows(own.sum(1), votes.shape[-1], sink)[:, None, :].expand_as(
                votes
            )
        out = torch.empty_like(votes).scatter_(
            -1, at, scores.to(votes.dtype)
        )  # back to the columns
        return torch.where(prompt_valid[:, None, :], out, float("-inf"))
    out = torch.full_like(votes, float("-inf"))
    for row in range(
        votes.shape[0]
    ):  # random scores: their shape depends on the row's prompt length
        columns = prompt_valid[row].nonzero().flatten()  # (P_b,) the row's own prompt, in order
        own = votes[row : row + 1].index_select(2, columns)  # (1, Hkv, P_b)
        scores = chosen.selection_scores(
            own, tuple(own.shape), votes.device, kernel=kernel, sink=sink, seed=seed
        )
        out[row].index_copy_(1, columns, scores[0].to(votes.dtype))
    return out


@selection_scores.register_fake
def _(votes, prompt_valid, policy, kernel, sink, seed, recent):
    return torch.empty_like(votes)


@torch.library.custom_op("maskkv::head_budgets", mutates_args=())
def head_budgets(
    prompt_mass: torch.Tensor,
    scores: torch.Tensor,
    voter_valid: torch.Tensor,
    layer_budget: float,
    budget: int,
    policy: str,
    alpha: float,
    min_keep: int,
) -> torch.Tensor:
    chosen = get_policy(policy)
    options = {"alpha": alpha} if chosen.head_allocator == "maskkv" else {}
    batch, kv_heads = scores.shape[:2]
    prompt_len = torch.isfinite(scores[:, 0]).sum(-1)  # (B,) each row's own prompt
    n_voters = voter_valid.sum(1).clamp(min=1)  # (B,)
    if chosen.allocates_rows:  # every row at once, on the device
        out = chosen.head_budgets_rows(
            layer_budget,
            n_kv_heads=kv_heads,
            prompt_len=prompt_len,
            min_keep=min_keep,
            prompt_mass=prompt_mass,
            n_voters=n_voters,
            **options,
        )
    else:
        out = torch.zeros((batch, kv_heads), dtype=torch.long, device=scores.device)
        for row in range(batch):
            columns = torch.isfinite(scores[row, 0]).nonzero().flatten()
            if columns.numel() <= budget:  # kept whole below
                continue
            out[row] = chosen.head_budgets(
                layer_budget,
                n_kv_heads=kv_heads,
                prompt_len=int(columns.numel()),
                min_keep=min_keep,
                prompt_mass=prompt_mass[row : row + 1],
                n_voters=int(n_voters[row]),
                votes=scores[row : row + 1].index_select(2, columns),
                **options,
            ).to(out.device)
    # a prompt that fits the budget: nothing to evict, under any policy
    return torch.where(prompt_len[:, None] <= budget, prompt_len[:, None], out)


@head_budgets.register_fake
def _(prompt_mass, scores, voter_valid, layer_budget, budget, policy, alpha, min_keep):
    return scores.new_empty((scores.shape[0], scores.shape[1]), dtype=torch.long)
