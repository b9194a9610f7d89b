"""Uncompiled references for MaskKV semantics, built on transformers' attention registry.

``PromptCacheReference`` runs the original model with an attention function that, at a
prefill, records each layer's post-RoPE prompt K/V (optionally only the top-``budget`` per
KV head by Mask-Voting computed from the materialized softmax) and, at a step, lets every
query attend to [those prompt K/V ; the current K/V of the response rows]. The response
rows' logits are then exactly what a prompt cache (with that eviction) should produce.
Everything here is plain eager torch on purpose: it is the oracle, not the product.
"""

from __future__ import annotations

import copy

import torch
from maskkv_compile.kernels import select_kv_reference
from maskkv_compile.passes.evict_kv import layer_budgets
from transformers import AttentionInterface

from maskkv_compile.config import MaskKVConfig
from maskkv_compile.policies import get_policy, voter_positions

_NAME = "maskkv_test_reference"


def _expand(x, heads):
    return x.repeat_interleave(heads // x.shape[1], dim=1)


class PromptCacheReference:
    def __init__(
        self,
        model,
        budget: int | None = None,
        family: str = "llada",
        policy: str = "mask_voting_uniform",
        **options,
    ):
        """``budget=None`` keeps the whole prompt; otherwise ``policy`` (and ``options``, as
        MaskKVConfig fields) chooses voters, scores and budgets as the registry defines them."""
        self.model = copy.deepcopy(model)
        self.budget = budget
        self.config = MaskKVConfig(budget=budget or 1, policy=policy, family=family, **options)
        n_layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
        self.layer_budgets = layer_budgets(self.config, [kv_heads] * n_layers)
        self.kept: dict[int, tuple] = {}  # layer -> (kept positions per (b, h), k, v)
        self.mode = "prefill"
        self.resp_idx = None
        self.captured_qk: dict[int, tuple] = {}  # layer -> (q, k) at the last prefill
        AttentionInterface.register(_NAME, self._attention)
        self.model.set_attn_implementation(_NAME)
        self.model.maskkv_reference = self

    def _attention(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        assert attention_mask is None
        layer = module.layer_idx
        heads = query.shape[1]
        batch, kv_heads, seq_len, _ = key.shape
        resp = self.resp_idx
        prompt = torch.tensor(
            [i for i in range(seq_len) if i not in set(resp.tolist())], dtype=torch.long
        )
        if self.mode == "prefill":
            self.captured_qk[layer] = (query, key)
            probs = torch.softmax(
                (query @ _expand(key, heads).transpose(-2, -1)) * scaling, dim=-1
            )  # (B, H, S, S)
            cfg = self.config
            voters = voter_positions(cfg.policy, prompt, resp, cfg.window, -cfg.logits_shift)
            on_prompt = probs[:, :, voters][..., prompt]  # (B, H, Rv, P)
            votes = (
                on_prompt.sum(2).view(batch, kv_heads, heads // kv_heads, -1).sum(2)
            )  # (B, Hkv, P)
            if self.budget is None or len(prompt) <= self.budget:
                scores, budgets = votes, torch.full((kv_heads,), len(prompt))
            else:
                policy = get_policy(cfg.policy)
                scores = policy.selection_scores(
                    votes, tuple(votes.shape), kernel=cfg.pool_kernel, sink=cfg.sink, seed=cfg.seed
                ).to(votes.dtype)
                options = {"alpha": cfg.alpha} if policy.head_allocator == "maskkv" else {}
                budgets = policy.head_budgets(
                    self.layer_budgets[layer],
                    n_kv_heads=kv_heads,
                    prompt_len=len(prompt),
                    min_keep=cfg.min_keep,
                    prompt_mass=on_prompt.sum((2, 3)),
                    n_voters=max(len(voters), 1),
                    votes=scores,
                    **options,
                )
            recent = 0 if self.budget is None or len(prompt) <= self.budget else cfg.recent
            keep = select_kv_reference(scores, budgets.expand(batch, -1), recent)
            positions = [[prompt[idx] for idx in row] for row in keep]
            self.kept[layer] = (
                positions,
                [[key[b, h, positions[b][h]] for h in range(kv_heads)] for b in range(batch)],
                [[value[b, h, positions[b][h]] for h in range(kv_heads)] for b in range(batch)],
                probs,
                votes,
                on_prompt.sum((2, 3)),
            )
            out = probs.to(value.dtype) @ _expand(value, heads)
        else:
            positions, kept_k, kept_v = self.kept[layer][:3]
            out = torch.empty_like(query)
            group = heads // kv_heads
            for b in range(batch):
                for h in range(heads):
                    keys = torch.cat([kept_k[b][h // group], key[b, h // group, resp]])
                    values = torch.cat([kept_v[b][h // group], value[b, h // group, resp]])
                    weights = torch.softmax((query[b, h] @ keys.T) * scaling, dim=-1)
                    out[b, h] = weights @ values
        return out.transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, resp_idx: torch.Tensor, prefill: bool, rows=None
    ) -> torch.Tensor:
        """Logits of ``rows`` (default: the response rows), (B, len(rows), V). At a step every
        query attends to [kept prompt ; response], so a prompt row's logits are what its query,
        recomputed like a response row, gives (what a shifted-logits model reads)."""
        self.mode = "prefill" if prefill else "step"
        self.resp_idx = resp_idx
        return self.model(x, use_cache=False).logits[:, resp_idx if rows is None else rows]

    def kept_positions(self, layer: int) -> list[list[list[int]]]:
        return [[sorted(int(p) for p in head) for head in row] for row in self.kept[layer][0]]
