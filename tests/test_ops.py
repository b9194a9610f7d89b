"""Each maskkv:: op against an independent pure-torch computation, plus ``opcheck``."""

import pytest
import torch
from torch.library import opcheck

from maskkv_compile.kernels import select_kv_reference


def qkv(batch=2, heads=4, kv_heads=2, seq=13, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=dtype)
    return q, k, v


def naive_attention(q, k, v, scale, keep=None):
    """Loop over (batch, head): softmax over the allowed keys only."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys, values = k[b, h // group], v[b, h // group]
            if keep is not None:
                keys, values = keys[keep[h // group]], values[keep[h // group]]
            out[b, h] = torch.softmax(q[b, h] @ keys.T * scale, -1) @ values
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("softmax_dtype", [None, torch.float32])
def test_attention(kv_heads, softmax_dtype):
    q, k, v = qkv(kv_heads=kv_heads, dtype=torch.float64)
    out = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype)
    torch.testing.assert_close(out, naive_attention(q, k, v, 0.3), atol=1e-6 if softmax_dtype else 1e-12, rtol=1e-6)
    opcheck(torch.ops.maskkv.attention.default, (q.float(), k.float(), v.float(), 0.3, softmax_dtype))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mask_votes(kv_heads):
    q, k, _ = qkv(kv_heads=kv_heads, seq=23)
    voters, prompt = torch.arange(15, 23), torch.arange(15)
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voters, prompt, 0.35, 3)  # chunk 3: several chunks
    group = 4 // kv_heads
    for b in range(2):
        for h in range(4):
            probs = torch.softmax(q[b, h, voters] @ k[b, h // group].T * 0.35, -1)  # (R, S), materialized
            torch.testing.assert_close(mass[b, h], probs[:, :15].sum(), atol=1e-5, rtol=1e-5)
        for g in range(kv_heads):
            expected = sum(
                torch.softmax(q[b, h, voters] @ k[b, g].T * 0.35, -1)[:, :15].sum(0) for h in range(g * group, (g + 1) * group)
            )
            torch.testing.assert_close(votes[b, g], expected, atol=1e-5, rtol=1e-5)
    opcheck(torch.ops.maskkv.mask_votes.default, (q, k, voters, prompt, 0.35, 3))


def test_select_kv():
    _, k, v = qkv(seq=20)
    prompt = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17])  # a hole: 8..11 are the response
    votes = torch.rand(2, 2, prompt.numel(), generator=torch.Generator().manual_seed(3))
    votes[0, 0, 3] = votes[0, 0, 5]  # a tie: the earlier position must win
    budgets = torch.tensor([4, 9])
    kept_k, kept_v, kept_len, kept_pos = torch.ops.maskkv.select_kv(k, v, votes, prompt, budgets)
    expected = select_kv_reference(votes, budgets)
    assert kept_len.tolist() == [4, 9] and kept_k.shape == (2, 2, 9, 8)
    for b in range(2):
        for h in range(2):
            n = int(kept_len[h])
            positions = prompt[expected[b][h]]
            assert kept_pos[b, h, :n].tolist() == positions.tolist()
            assert (kept_pos[b, h, n:] == -1).all()
            torch.testing.assert_close(kept_k[b, h, :n], k[b, h, positions])
            torch.testing.assert_close(kept_v[b, h, :n], v[b, h, positions])
            assert (kept_k[b, h, n:] == 0).all()
    # a budget >= P keeps the whole prompt, in order
    whole = torch.ops.maskkv.select_kv(k, v, votes, prompt, torch.tensor([99, 99]))[3]
    assert (whole == prompt).all()
    opcheck(torch.ops.maskkv.select_kv.default, (k, v, votes, prompt, budgets))


def test_cached_attention_equals_unpadded_gather():
    q, k, v = qkv(seq=6)  # response rows
    _, kept_k, kept_v = qkv(seq=9, seed=4)  # padded prompt cache
    kept_len = torch.tensor([5, 9])
    out = torch.ops.maskkv.cached_attention(q, k, v, kept_k, kept_v, kept_len, 0.4, None)
    keys, values = torch.cat([kept_k, k], 2), torch.cat([kept_v, v], 2)
    keep = [list(range(int(n))) + list(range(9, 15)) for n in kept_len]
    torch.testing.assert_close(out, naive_attention(q, keys, values, 0.4, keep), atol=1e-5, rtol=1e-5)
    garbage = kept_k.clone()
    garbage[:, 0, 5:] = 1e4  # padding content must not matter
    again = torch.ops.maskkv.cached_attention(q, k, v, garbage, kept_v, kept_len, 0.4, None)
    torch.testing.assert_close(again, out)
    opcheck(torch.ops.maskkv.cached_attention.default, (q, k, v, kept_k, kept_v, kept_len, 0.4, None))


@pytest.mark.parametrize("policy", ["maskkv", "snapkv", "streaming", "random", "adakv"])
def test_policy_ops(policy):
    from maskkv_compile.policies import get_policy

    votes = torch.rand(2, 2, 30, generator=torch.Generator().manual_seed(5))
    mass = torch.rand(2, 4) * 8
    voters = torch.arange(30, 38)
    scores = torch.ops.maskkv.selection_scores(votes, policy, 5, 4, 0)
    expected = get_policy(policy).selection_scores(votes, tuple(votes.shape), kernel=5, sink=4, seed=0)
    torch.testing.assert_close(scores, expected.to(scores.dtype))
    budgets = torch.ops.maskkv.head_budgets(mass, scores, voters, 6.0, 6, policy, 0.1, 1)
    assert budgets.dtype == torch.long and int(budgets.sum()) == 12 and bool((budgets <= 30).all())
    # a prompt no longer than the budget is kept whole
    assert torch.ops.maskkv.head_budgets(mass, scores, voters, 6.0, 30, policy, 0.1, 1).tolist() == [30, 30]
    opcheck(torch.ops.maskkv.selection_scores.default, (votes, policy, 5, 4, 0))
    opcheck(torch.ops.maskkv.head_budgets.default, (mass, scores, voters, 6.0, 6, policy, 0.1, 1))
