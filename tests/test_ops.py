"""Each maskkv:: op against an independent pure-torch computation, plus ``opcheck``.

The ops work row by row (per-row layouts: padding keys, per-row voters and prompt columns,
per-row budgets and kept lengths, response-key validity); the independent computations here
loop over rows and drop what a row may not see, rather than masking.
"""

import random

import pytest
import torch
from maskkv_compile.kernels import (
    cached_attention_reference,
    mask_votes_reference,
    select_kv_reference,
)
from maskkv_compile.kernels.select_kv import pad_kept
from torch.library import opcheck


def qkv(batch=2, heads=4, kv_heads=2, seq=13, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=gen, dtype=dtype)
    return q, k, v


def naive_attention(q, k, v, scale, keep=None):
    """Loop over (batch, head): softmax over the allowed keys only.

    ``keep``: None (every key), or keep[b][kv_head] a list of the key indices row b's KV head
    may attend to.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            keys, values = k[b, h // group], v[b, h // group]
            if keep is not None:
                keys, values = keys[keep[b][h // group]], values[keep[b][h // group]]
            out[b, h] = torch.softmax(q[b, h] @ keys.T * scale, -1) @ values
    return out


def naive_votes(q, k, voter_idx, prompt_idx, scale, key_valid, voter_valid, prompt_valid):
    """Votes and prompt mass row by row: drop the padding keys from the softmax, then sum over
    the row's voters and the row's prompt columns only (other columns vote 0)."""
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    votes = torch.zeros(batch, kv_heads, prompt_idx.numel(), dtype=torch.float64)
    mass = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        keys = key_valid[b].nonzero().flatten().tolist()
        voters = [int(voter_idx[r]) for r in range(voter_idx.numel()) if voter_valid[b, r]]
        for h in range(heads):
            probs = torch.softmax(
                q[b, h, voters].double() @ k[b, h // group, keys].double().T * scale, -1
            )
            for j in range(prompt_idx.numel()):
                pos = int(prompt_idx[j])
                if prompt_valid[b, j] and pos in keys:
                    column = probs[:, keys.index(pos)].sum()
                    votes[b, h // group, j] += column
                    mass[b, h] += column
    return votes, mass


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("softmax_dtype", [None, torch.float32])
def test_attention(kv_heads, softmax_dtype):
    q, k, v = qkv(kv_heads=kv_heads, dtype=torch.float64)
    out = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype)
    torch.testing.assert_close(
        out, naive_attention(q, k, v, 0.3), atol=1e-6 if softmax_dtype else 1e-12, rtol=1e-6
    )
    opcheck(
        torch.ops.maskkv.attention.default, (q.float(), k.float(), v.float(), 0.3, softmax_dtype)
    )


@pytest.mark.parametrize("softmax_dtype", [None, torch.float32])
def test_attention_block_causal_key_end(softmax_dtype):
    """``key_end`` (S,): query i sees keys before the end of its block, on top of the padding;
    a query left with no key (a padding row in a block of padding) sees every real key."""
    q, k, v = qkv(kv_heads=2, dtype=torch.float64)
    key_end = torch.tensor([4] * 4 + [8] * 4 + [13] * 5)
    key_valid = torch.ones(2, 13, dtype=torch.bool)
    key_valid[1, :5] = False  # row 1: block 0 is all padding
    out = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype, key_valid, key_end)
    tol = dict(atol=1e-6 if softmax_dtype else 1e-12, rtol=1e-6)
    for b in range(2):
        real = key_valid[b].nonzero().flatten().tolist()
        for i in range(13):
            keys = [j for j in real if j < int(key_end[i])] or real
            want = naive_attention(
                q[b : b + 1, :, i : i + 1], k[b : b + 1], v[b : b + 1], 0.3, [[keys] * 2]
            )
            torch.testing.assert_close(out[b : b + 1, :, i : i + 1], want, **tol)
    # no padding: the block ends alone; an empty key_end is plain attention
    blocks = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype, None, key_end)
    plain = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype, None, key_end[:0])
    torch.testing.assert_close(plain, torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype))
    assert not torch.allclose(blocks, plain)
    opcheck(
        torch.ops.maskkv.attention.default,
        (q.float(), k.float(), v.float(), 0.3, softmax_dtype, key_valid, key_end),
    )


def _band(rows, keys, window, offset=0):
    """(rows, keys) bool: row i (at position offset + i) sees keys (p - window, p], causal."""
    pos = torch.arange(rows)[:, None] + offset
    key = torch.arange(keys)[None, :]
    return (key <= pos) & (key > pos - window)


@pytest.mark.parametrize("seed", range(6))
def test_banded_key_ranges_cover_every_attended_key_and_attention_over_them_is_the_whole(seed):
    """For sliding-window and causal masks (with a cache offset, a batch where one row is
    padded), each chunk's [lo, hi) holds every key any of its rows sees, and SDPA over the
    chunks equals SDPA over the whole mask. Masks where chunking would not pay (bidirectional)
    or a row sees no key give None."""
    from maskkv_compile.kernels.attention import banded_key_ranges

    rng = random.Random(seed)
    rows, chunk, offset = rng.randint(40, 90), rng.choice([4, 8, 16]), rng.choice([0, 5])
    keys = rows + offset
    window = rng.choice([3, 6, keys])  # keys: causal
    mask = _band(rows, keys, window, offset)[None, None].repeat(2, 1, 1, 1)  # (B, 1, S, K)
    mask[1, :, :, : rng.randint(0, 3)] = False  # row 1's first keys are padding
    mask[1, :, : offset + 3] |= _band(offset + 3, keys, 2)[None]  # no row sees nothing
    ranges = banded_key_ranges(mask, chunk)
    if window == keys and rows < 4 * chunk:  # a causal mask of few chunks does not pay
        assert ranges is None or sum(h - lo for _, lo, h in ranges) * 4 <= len(ranges) * keys * 3
        return
    assert ranges is not None and [start for start, _, _ in ranges] == list(range(0, rows, chunk))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, rows, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, keys, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    parts = []
    for start, lo, hi in ranges:
        rows_mask = mask[:, :, start : start + chunk]
        assert not rows_mask[..., :lo].any() and not rows_mask[..., hi:].any()
        assert rows_mask[..., lo].any() and rows_mask[..., hi - 1].any()  # tight
        parts.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, start : start + chunk],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                rows_mask[..., lo:hi],
                enable_gqa=True,
            )
        )
    torch.testing.assert_close(torch.cat(parts, 2), whole, atol=1e-12, rtol=1e-12)
    assert banded_key_ranges(torch.ones_like(mask), chunk) is None  # bidirectional
    blind = mask.clone()
    blind[0, :, rows // 2] = False  # a row that sees no key
    assert banded_key_ranges(blind, chunk) is None
    assert banded_key_ranges(mask[:, :, : 2 * chunk - 1], chunk) is None  # too few rows


def test_long_block_causal_attention_in_query_chunks_equals_the_whole(monkeypatch):
    """Past 2 * QUERY_CHUNK queries without padding, block-causal attention goes in query chunks
    against the keys before each chunk's last block end: the same as the whole masked
    attention, over uneven blocks (a prompt block, then blocks of 5). A softmax in another
    dtype than q's takes the reference per chunk (on CPU, q's own dtype takes two segments:
    the next test)."""
    from kernels import attention as attention_kernels

    monkeypatch.setattr(attention_kernels, "QUERY_CHUNK", 8)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 43, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 43, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    key_end = torch.tensor([13] * 13 + [min(13 + 5 * (1 + i // 5), 43) for i in range(30)])
    chunks = []
    original = attention_kernels.attention_reference
    monkeypatch.setattr(
        attention_kernels,
        "attention_reference",
        lambda q, k, *a, **kw: chunks.append(k.shape[2]) or original(q, k, *a, **kw),
    )
    out = torch.ops.maskkv.attention(q, k, v, 0.3, torch.float32, None, key_end)
    assert chunks == [13, 18, 28, 33, 43, 43]  # each chunk's keys end at its last block end
    whole = original(
        q, k, v, 0.3, torch.float32, attention_kernels.attention_mask(None, key_end, 43)
    )
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-6)
    for i in (0, 12, 13, 20, 42):  # and each row against the naive definition
        keys = list(range(int(key_end[i])))
        want = naive_attention(q[:, :, i : i + 1], k, v, 0.3, [[keys] * 2] * 2)
        torch.testing.assert_close(out[:, :, i : i + 1], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(24))
def test_block_causal_chunks_on_cpu_as_two_segments_equal_the_whole(seed, monkeypatch):
    """On CPU with the softmax in q's dtype, each query chunk of a long block-causal window is
    two segments (the keys before the chunk's first block end, only the padding masked; the
    rest, masked per query) merged by their log-sum-exps: equal to the whole masked attention
    over random block layouts (a prompt block longer or shorter than a chunk, or LLaDA2's grid
    of blocks from 0; blocks that straddle chunks; chunks whose rows all see the same keys),
    with and without padding (left padding longer than a block, holes), GQA groups 1-3,
    float64 / float32 / bfloat16, a non-contiguous q. The reference runs only for a chunk
    holding a query that sees no real key before its block end (which sees every real key),
    or whose first block ends before ``SEGMENTS_FROM``."""
    from kernels import attention as attention_kernels

    rng = random.Random(seed)
    chunk = rng.choice([4, 8, 16])
    segments_from = rng.choice([1, 1, 2 * chunk])  # and the chunks before it in one call
    monkeypatch.setattr(attention_kernels, "QUERY_CHUNK", chunk)
    monkeypatch.setattr(attention_kernels, "SEGMENTS_FROM", segments_from)
    dtype = [torch.float64, torch.float32, torch.bfloat16][seed % 3]
    prompt, block = rng.randint(1, 3 * chunk), rng.randint(1, chunk + 3)
    blocks = max(rng.randint(2, 5), -(-(2 * chunk - prompt) // block))  # >= 2 chunks of rows
    seq = prompt + block * blocks
    if rng.random() < 0.5:  # the prompt as its own block (SDAR), else blocks from 0 (LLaDA2)
        ends = [prompt] * prompt + [prompt + block * (1 + i // block) for i in range(seq - prompt)]
    else:
        ends = [min(block * (1 + i // block), seq) for i in range(seq)]
    key_end = torch.tensor(ends)
    batch, kv_heads, group, dim = rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 3), 8
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, kv_heads * group, dim, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, seq, dim, generator=gen).to(dtype) for _ in "kv")
    key_valid = None
    if seed % 2:
        key_valid = torch.ones(batch, seq, dtype=torch.bool)
        for b in range(batch):
            key_valid[b, : rng.randint(0, seq // 2)] = False  # left padding
            key_valid[b, rng.randrange(seq)] = bool(rng.random() < 0.5)  # maybe a hole
            key_valid[b, -1] = True  # some real key
    original = attention_kernels.attention_reference
    mask = attention_kernels.attention_mask(key_valid, key_end, seq)
    whole = original(q, k, v, 0.3, None, mask)
    blind = [  # queries that see no real key before their block end
        key_valid is not None and not key_valid[:, : ends[i]].any(1).all() for i in range(seq)
    ]
    calls = []
    monkeypatch.setattr(
        attention_kernels,
        "attention_reference",
        lambda q, *a, **kw: calls.append(q.shape[2]) or original(q, *a, **kw),
    )
    out = torch.ops.maskkv.attention(q, k, v, 0.3, None, key_valid, key_end)
    assert out.shape == whole.shape and out.dtype == dtype and out.is_contiguous()
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, whole, atol=tol, rtol=tol)
    one_call = [  # the chunks that go as one call: a blind query, or too few keys seen by all
        any(blind[a : a + chunk]) or min(ends[a : a + chunk]) < segments_from
        for a in range(0, seq, chunk)
    ]
    assert len(calls) == sum(one_call)
    assert not any(one_call) or key_valid is not None or segments_from > 1
    if seed < 4:  # the op on this path, its layout the fake kernel's
        args = (q, k, v, 0.3, None, key_valid, key_end)
        opcheck(torch.ops.maskkv.attention.default, args)


@pytest.mark.parametrize("softmax_dtype", [None, torch.float32])
def test_attention_padding_keys(softmax_dtype):
    q, k, v = qkv(kv_heads=2, dtype=torch.float64)
    key_valid = torch.ones(2, 13, dtype=torch.bool)
    key_valid[0, :4] = False  # row 0 left-padded
    key_valid[1, [5, 12]] = False
    out = torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype, key_valid)
    keep = [[key_valid[b].nonzero().flatten().tolist()] * 2 for b in range(2)]
    torch.testing.assert_close(
        out, naive_attention(q, k, v, 0.3, keep), atol=1e-6 if softmax_dtype else 1e-12, rtol=1e-6
    )
    # all True is plain attention
    plain = torch.ops.maskkv.attention(
        q, k, v, 0.3, softmax_dtype, torch.ones(2, 13, dtype=torch.bool)
    )
    torch.testing.assert_close(plain, torch.ops.maskkv.attention(q, k, v, 0.3, softmax_dtype))
    opcheck(
        torch.ops.maskkv.attention.default,
        (q.float(), k.float(), v.float(), 0.3, softmax_dtype, key_valid),
    )


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mask_votes(kv_heads):
    q, k, _ = qkv(kv_heads=kv_heads, seq=23)
    voters, prompt = torch.arange(15, 23), torch.arange(15)
    votes, mass = torch.ops.maskkv.mask_votes(
        q, k, voters, prompt, 0.35, 3
    )  # chunk 3: several chunks
    group = 4 // kv_heads
    for b in range(2):
        for h in range(4):
            probs = torch.softmax(
                q[b, h, voters] @ k[b, h // group].T * 0.35, -1
            )  # (R, S), materialized
            torch.testing.assert_close(mass[b, h], probs[:, :15].sum(), atol=1e-5, rtol=1e-5)
        for g in range(kv_heads):
            expected = sum(
                torch.softmax(q[b, h, voters] @ k[b, g].T * 0.35, -1)[:, :15].sum(0)
                for h in range(g * group, (g + 1) * group)
            )
            torch.testing.assert_close(votes[b, g], expected, atol=1e-5, rtol=1e-5)
    opcheck(torch.ops.maskkv.mask_votes.default, (q, k, voters, prompt, 0.35, 3))


def vote_masks(batch=2, seq=23, n_voters=8, n_prompt=15, seed=7):
    """key_valid (B, S), voter_valid (B, Rv), prompt_valid (B, P): row 1 is left-padded over
    its first 16 keys (a whole key block at chunk 1) and some voters / prompt columns of each
    row don't count."""
    gen = torch.Generator().manual_seed(seed)
    key_valid = torch.ones(batch, seq, dtype=torch.bool)
    key_valid[1, :16] = False
    key_valid[0, 3] = False
    voter_valid = torch.rand(batch, n_voters, generator=gen) >= 0.3
    voter_valid[:, 0] = True
    prompt_valid = torch.rand(batch, n_prompt, generator=gen) >= 0.3
    return key_valid, voter_valid, prompt_valid


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_mask_votes_with_masks_equals_reference(kv_heads, chunk):
    q, k, _ = qkv(kv_heads=kv_heads, seq=23)
    voters, prompt = (
        torch.arange(16, 23),
        torch.tensor([0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 20]),
    )
    voters = torch.cat([voters, torch.tensor([4])])  # a voter at a key that is padding in row 1
    masks = vote_masks()
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voters, prompt, 0.35, chunk, *masks)
    ref_votes, ref_mass = mask_votes_reference(q, k, voters, prompt, 0.35, *masks)
    torch.testing.assert_close(votes, ref_votes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-5)
    naive = naive_votes(q, k, voters, prompt, 0.35, *masks)
    torch.testing.assert_close(votes.double(), naive[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.double(), naive[1], atol=1e-5, rtol=1e-5)
    # a column that is not the row's prompt, or a padding key, gets no vote
    key_valid, _, prompt_valid = masks
    no_vote = ~prompt_valid | ~key_valid[:, prompt]  # (B, P)
    assert (votes.permute(0, 2, 1)[no_vote] == 0).all()
    # all-True masks are the same as none
    ones = [torch.ones_like(m) for m in masks]
    plain = torch.ops.maskkv.mask_votes(q, k, voters, prompt, 0.35, chunk)
    for a, b in zip(torch.ops.maskkv.mask_votes(q, k, voters, prompt, 0.35, chunk, *ones), plain):
        torch.testing.assert_close(a, b)
    opcheck(torch.ops.maskkv.mask_votes.default, (q, k, voters, prompt, 0.35, chunk, *masks))
    opcheck(
        torch.ops.maskkv.mask_votes.default,
        (q, k, voters, prompt, 0.35, chunk, masks[0], None, masks[2]),
    )


def test_mask_votes_rows_are_independent():
    """A row's votes with masks are what that row's own layout gives alone, unpadded."""
    q, k, _ = qkv(kv_heads=2, seq=30)
    voters, prompt = torch.arange(23, 30), torch.arange(23)
    key_valid, voter_valid, prompt_valid = vote_masks(seq=30, n_voters=7, n_prompt=23)
    votes, mass = torch.ops.maskkv.mask_votes(
        q, k, voters, prompt, 0.35, 3, key_valid, voter_valid, prompt_valid
    )
    for b in range(2):
        keys = key_valid[b].nonzero().flatten()  # the row alone: drop its padding keys
        at = {int(p): i for i, p in enumerate(keys)}
        own_voters = torch.tensor(
            [at[int(voters[r])] for r in range(7) if voter_valid[b, r]], dtype=torch.long
        )
        own_cols = [j for j in range(23) if prompt_valid[b, j] and key_valid[b, prompt[j]]]
        assert len(own_cols) >= 3 and own_voters.numel() >= 3
        own_prompt = torch.tensor([at[int(prompt[j])] for j in own_cols], dtype=torch.long)
        alone = torch.ops.maskkv.mask_votes(
            q[b : b + 1, :, keys], k[b : b + 1, :, keys], own_voters, own_prompt, 0.35, 3
        )
        torch.testing.assert_close(votes[b][:, own_cols], alone[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass[b], alone[1][0], atol=1e-5, rtol=1e-5)


def select_padded(k, v, votes, prompt, budgets, slots=None):
    """maskkv::select_kv, its flat cache padded per head the way the runtime pads it after a
    prefill."""
    slots = votes.shape[1] * votes.shape[2] if slots is None else slots
    kept_k, kept_v, kept_len, kept_pos = torch.ops.maskkv.select_kv(
        k, v, votes, prompt, budgets, slots
    )
    padded = pad_kept(kept_k, kept_v, kept_len, kept_pos, int(kept_len.max()))
    return padded[0], padded[1], kept_len, padded[2]


def test_select_kv_flat_layout():
    """The op's own output: every head's entries one after the other, (B, min(Hkv*P, slots), D)
    whatever the budgets, -1 / zeros after the row's last head."""
    _, k, v = qkv(batch=2, kv_heads=3, heads=3, seq=30, seed=2)
    prompt = torch.arange(2, 27)  # P = 25
    votes = torch.rand(2, 3, 25, generator=torch.Generator().manual_seed(5))
    votes[1, :, 20:] = float("-inf")
    budgets = torch.tensor([[7, 1, 12], [3, 9, 30]])
    for slots, size in ((40, 40), (500, 75)):  # T = min(Hkv * P, slots)
        kept_k, kept_v, kept_len, kept_pos = torch.ops.maskkv.select_kv(
            k, v, votes, prompt, budgets, slots
        )
        assert (
            kept_k.shape == (2, size, 8)
            and kept_v.shape == (2, size, 8)
            and kept_pos.shape == (2, size)
        )
        assert kept_len.tolist() == [[7, 1, 12], [3, 9, 20]]
        expected = select_kv_reference(votes, budgets)
        for b in range(2):
            start = 0
            for h in range(3):
                n = int(kept_len[b, h])
                positions = prompt[expected[b][h]]
                assert kept_pos[b, start : start + n].tolist() == positions.tolist()
                torch.testing.assert_close(kept_k[b, start : start + n], k[b, h, positions])
                torch.testing.assert_close(kept_v[b, start : start + n], v[b, h, positions])
                start += n
            assert (
                (kept_pos[b, start:] == -1).all()
                and (kept_k[b, start:] == 0).all()
                and (kept_v[b, start:] == 0).all()
            )
        opcheck(torch.ops.maskkv.select_kv.default, (k, v, votes, prompt, budgets, slots))


def test_select_kv():
    _, k, v = qkv(seq=20)
    prompt = torch.tensor(
        [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15, 16, 17]
    )  # a hole: 8..11 are the response
    votes = torch.rand(2, 2, prompt.numel(), generator=torch.Generator().manual_seed(3))
    votes[0, 0, 3] = votes[0, 0, 5]  # a tie: the earlier position must win
    budgets = torch.tensor([[4, 9], [6, 0]])  # (B, Hkv), per row
    kept_k, kept_v, kept_len, kept_pos = select_padded(k, v, votes, prompt, budgets)
    expected = select_kv_reference(votes, budgets)
    assert kept_len.tolist() == [[4, 9], [6, 0]] and kept_k.shape == (2, 2, 9, 8)
    for b in range(2):
        for h in range(2):
            n = int(kept_len[b, h])
            positions = prompt[expected[b][h]]
            assert kept_pos[b, h, :n].tolist() == positions.tolist()
            assert (kept_pos[b, h, n:] == -1).all()
            torch.testing.assert_close(kept_k[b, h, :n], k[b, h, positions])
            torch.testing.assert_close(kept_v[b, h, :n], v[b, h, positions])
            assert (kept_k[b, h, n:] == 0).all() and (kept_v[b, h, n:] == 0).all()
    # a budget >= P keeps the whole prompt, in order
    whole = select_padded(k, v, votes, prompt, torch.full((2, 2), 99))[3]
    assert (whole == prompt).all()
    opcheck(torch.ops.maskkv.select_kv.default, (k, v, votes, prompt, budgets, 28))


@pytest.mark.parametrize("seed", range(6))
def test_select_kv_many_ties_and_ineligible_entries(seed):
    """Scores from a few integer levels (ties everywhere, including at the budget's edge), -inf
    entries and budgets from 0 to past the eligible count: the kept set is a stable descending
    sort's, in position order (select_kv finds it from a top-k threshold, not a sort)."""
    gen = torch.Generator().manual_seed(seed)
    _, k, v = qkv(batch=3, kv_heads=2, heads=2, seq=40, seed=seed)
    prompt = torch.arange(40)
    votes = torch.randint(0, 4, (3, 2, 40), generator=gen).float()
    votes[torch.rand(3, 2, 40, generator=gen) < 0.2] = float("-inf")
    budgets = torch.randint(0, 45, (3, 2), generator=gen)
    budgets[0, 0] = 0
    kept_len, kept_pos = select_padded(k, v, votes, prompt, budgets)[2:]
    expected = select_kv_reference(votes, budgets)
    for b in range(3):
        for h in range(2):
            n = int(kept_len[b, h])
            assert n == min(int(budgets[b, h]), int(torch.isfinite(votes[b, h]).sum()))
            assert kept_pos[b, h, :n].tolist() == expected[b][h].tolist()
            assert (kept_pos[b, h, n:] == -1).all()


def test_select_kv_per_row_eligibility():
    """-inf marks what a row may not keep: never kept, even with budget to spare; each row's
    kept set is the one it gets alone."""
    _, k, v = qkv(seq=20)
    prompt = torch.arange(14)
    votes = torch.rand(2, 2, 14, generator=torch.Generator().manual_seed(4))
    votes[0, :, 10:] = float("-inf")  # row 0's prompt is 10 long (right padding)
    votes[1, :, :5] = float("-inf")  # row 1's is 9 long (left padding)
    votes[1, 1, 7] = float("-inf")  # and head 1 may not keep one more entry
    budgets = torch.tensor([[12, 3], [9, 20]])
    kept_k, kept_v, kept_len, kept_pos = select_padded(k, v, votes, prompt, budgets)
    assert kept_len.tolist() == [[10, 3], [9, 8]]  # min(budget, the row's eligible entries)
    expected = select_kv_reference(votes, budgets)
    for b in range(2):
        alone = select_padded(
            k[b : b + 1], v[b : b + 1], votes[b : b + 1], prompt, budgets[b : b + 1]
        )
        for h in range(2):
            n = int(kept_len[b, h])
            kept = kept_pos[b, h, :n]
            assert torch.isfinite(votes[b, h, kept]).all(), "kept a -inf entry"
            assert kept.tolist() == prompt[expected[b][h]].tolist()
            assert (kept_pos[b, h, n:] == -1).all()
            # the row alone: same kept_len, positions and K/V (its Kmax may be smaller)
            assert int(alone[2][0, h]) == n
            assert alone[3][0, h, :n].tolist() == kept.tolist()
            torch.testing.assert_close(alone[0][0, h, :n], kept_k[b, h, :n])
            torch.testing.assert_close(alone[1][0, h, :n], kept_v[b, h, :n])
    opcheck(torch.ops.maskkv.select_kv.default, (k, v, votes, prompt, budgets, 28))


NO_LIMIT = torch.zeros(0, dtype=torch.long)  # row_end: every computed row sees every key


def test_cached_attention_equals_unpadded_gather():
    q, k, v = qkv(seq=6)  # response rows
    _, kept_k, kept_v = qkv(seq=9, seed=4)  # padded prompt cache
    kept_len = torch.tensor([[5, 9], [0, 3]])  # (B, Hkv): per row and KV head, a zero included
    resp_valid = torch.ones(2, 6, dtype=torch.bool)
    out = torch.ops.maskkv.cached_attention(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, None
    )
    keys, values = torch.cat([kept_k, k], 2), torch.cat([kept_v, v], 2)
    keep = [[list(range(int(n))) + list(range(9, 15)) for n in row] for row in kept_len]
    torch.testing.assert_close(
        out, naive_attention(q, keys, values, 0.4, keep), atol=1e-5, rtol=1e-5
    )
    garbage = kept_k.clone()
    garbage[0, 0, 5:] = 1e4  # padding content must not matter
    garbage[1, :, 3:] = -1e4
    again = torch.ops.maskkv.cached_attention(
        q, k, v, garbage, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, None
    )
    torch.testing.assert_close(again, out)
    opcheck(
        torch.ops.maskkv.cached_attention.default,
        (q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, None),
    )


@pytest.mark.parametrize("softmax_dtype", [None, torch.float32])
def test_cached_attention_response_validity(softmax_dtype):
    """resp_valid False: that computed row is no key of that batch row (its query still is)."""
    q, k, v = qkv(seq=6, dtype=torch.float64)
    _, kept_k, kept_v = qkv(seq=9, seed=4, dtype=torch.float64)
    kept_len = torch.tensor([[5, 9], [2, 0]])
    resp_valid = torch.tensor(
        [[True, False, True, True, False, True], [False, False, False, True, True, True]]
    )
    out = torch.ops.maskkv.cached_attention(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, softmax_dtype
    )
    keys, values = torch.cat([kept_k, k], 2), torch.cat([kept_v, v], 2)
    keep = [
        [
            list(range(int(kept_len[b, h]))) + [9 + j for j in range(6) if resp_valid[b, j]]
            for h in range(2)
        ]
        for b in range(2)
    ]
    torch.testing.assert_close(
        out,
        naive_attention(q, keys, values, 0.4, keep),
        atol=1e-6 if softmax_dtype else 1e-12,
        rtol=1e-6,
    )
    torch.testing.assert_close(
        out,
        cached_attention_reference(
            q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, softmax_dtype
        ),
    )
    assert torch.isfinite(out).all()  # every query row computed, masked ones included
    # what a masked response key holds does not matter
    k2, v2 = k.clone(), v.clone()
    k2[~resp_valid[:, None, :].expand_as(k2[..., 0])] = 1e4
    v2[~resp_valid[:, None, :].expand_as(v2[..., 0])] = -1e4
    again = torch.ops.maskkv.cached_attention(
        q, k2, v2, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.4, softmax_dtype
    )
    torch.testing.assert_close(again, out)
    opcheck(
        torch.ops.maskkv.cached_attention.default,
        (
            q.float(),
            k.float(),
            v.float(),
            kept_k.float(),
            kept_v.float(),
            kept_len,
            resp_valid,
            NO_LIMIT,
            0.4,
            softmax_dtype,
        ),
    )


def test_cached_attention_row_ends():
    """row_end: computed row r sees only the computed keys j < row_end[r] (block diffusion's
    shifted row before the block sees itself, not the block); the kept entries it always sees."""
    q, k, v = qkv(seq=6, dtype=torch.float64)
    _, kept_k, kept_v = qkv(seq=9, seed=4, dtype=torch.float64)
    kept_len = torch.tensor([[5, 9], [2, 0]])
    resp_valid = torch.tensor(
        [[True, True, True, True, False, True], [True, False, True, True, True, True]]
    )
    row_end = torch.tensor([1, 6, 6, 3, 6, 0])  # row 5 of batch row 1, KV head 1: no key, zeros
    out = torch.ops.maskkv.cached_attention(
        q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, 0.4, None
    )
    keys, values = torch.cat([kept_k, k], 2), torch.cat([kept_v, v], 2)
    for r in range(6):
        keep = [
            [
                list(range(int(kept_len[b, h])))
                + [9 + j for j in range(int(row_end[r])) if resp_valid[b, j]]
                for h in range(2)
            ]
            for b in range(2)
        ]
        expected = naive_attention(q[:, :, r : r + 1], keys, values, 0.4, keep)
        torch.testing.assert_close(out[:, :, r : r + 1], expected, atol=1e-12, rtol=1e-6)
    # a limit of every computed key is no limit
    everything = torch.full((6,), 6)
    args = (q, k, v, kept_k, kept_v, kept_len, resp_valid)
    torch.testing.assert_close(
        torch.ops.maskkv.cached_attention(*args, everything, 0.4, None),
        torch.ops.maskkv.cached_attention(*args, NO_LIMIT, 0.4, None),
    )
    opcheck(
        torch.ops.maskkv.cached_attention.default,
        (q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, 0.4, None),
    )


@pytest.mark.parametrize("seed", range(24))
def test_cached_attention_cpu_segments_equal_the_concatenation(seed):
    """The CPU path for long kept prefixes (the kept and the computed keys as two SDPA
    segments, merged by their log-sum-exps) equals the reference over the concatenation:
    random shapes, GQA groups 1-3, float64 / float32 / bfloat16, ragged kept lengths with zeros
    (and none kept at all), padded computed keys, row ends, rows that see no key, a
    non-contiguous q."""
    from maskkv_compile.kernels.cached_attention import _two_segments_cpu

    rng = random.Random(seed)
    dtype = [torch.float64, torch.float32, torch.bfloat16][seed % 3]
    batch, kv_heads, group = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 3)
    resp, kept, dim = rng.randint(1, 9), rng.choice([0, 1, 7, 40]), rng.choice([4, 8, 16])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, resp, kv_heads * group, dim, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, resp, dim, generator=gen).to(dtype) for _ in "kv")
    kept_k, kept_v = (
        torch.randn(batch, kv_heads, kept, dim, generator=gen).to(dtype) for _ in "kv"
    )
    kept_len = torch.randint(0, kept + 1, (batch, kv_heads), generator=gen)
    if seed % 4 == 0:
        kept_len.fill_(kept)  # every slot real
    resp_valid = torch.rand(batch, resp, generator=gen) < (0.7 if seed % 2 else 1.0)
    row_end = NO_LIMIT
    if seed % 3 == 1:
        row_end = torch.randint(0, resp + 1, (resp,), generator=gen)
    args = (q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, 0.3)
    ours = _two_segments_cpu(*args)
    theirs = cached_attention_reference(*args)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert ours.is_contiguous()  # as the fake kernel says: Inductor checks the strides
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


def test_cached_attention_cpu_never_copies_the_kept_kv():
    """At a long kept prefix the kept K/V are read where they are: no op of the CPU path
    returns a tensor as large as them (the concatenation did, twice, at every step)."""
    from maskkv_compile.kernels.cached_attention import TWO_SEGMENTS_FROM, cached_attention_torch
    from torch.overrides import TorchFunctionMode

    q, k, v = qkv(batch=1, heads=4, kv_heads=2, seq=3, dim=16)
    kept = TWO_SEGMENTS_FROM
    _, kept_k, kept_v = qkv(batch=1, heads=4, kv_heads=2, seq=kept, dim=16, seed=1)
    kept_len = torch.tensor([[kept, kept - 56]])  # ragged: the masked segment too
    largest = []

    class Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    largest.append((t.numel(), getattr(func, "__name__", str(func))))
            return out

    resp_valid = torch.ones(1, 3, dtype=torch.bool)
    with Sizes():
        cached_attention_torch(q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.3)
    assert largest and max(largest)[0] < kept_k.numel(), max(largest)
    opcheck(  # the op on this path: its output's layout is the fake kernel's
        torch.ops.maskkv.cached_attention.default,
        (q, k, v, kept_k, kept_v, kept_len, resp_valid, NO_LIMIT, 0.3, None),
    )


@pytest.mark.parametrize("policy", ["maskkv", "snapkv", "streaming", "random"])
def test_selection_scores_recent_window_comes_first(policy):
    """``recent``: each row's last ``recent`` valid prompt columns outrank every other column,
    the nearest highest (so a head whose budget is smaller keeps the nearest); the others keep
    the policy's scores; padding stays -inf. Random rows, left padding and holes."""
    from maskkv_compile.kernels.select_kv import select_kv_reference

    rng = random.Random(2)
    for case in range(30):
        batch, kv_heads, num = rng.randint(1, 3), rng.choice([1, 2]), rng.randint(2, 40)
        gen = torch.Generator().manual_seed(case)
        votes = torch.rand(batch, kv_heads, num, generator=gen) * rng.choice([1e-3, 1.0, 1e4])
        valid = torch.rand(batch, num, generator=gen) < 0.8
        valid[:, -1] = True
        recent = rng.randint(1, 6)
        plain = torch.ops.maskkv.selection_scores(votes, valid, policy, 5, 4, 0, 0)
        lifted = torch.ops.maskkv.selection_scores(votes, valid, policy, 5, 4, 0, recent)
        budgets = torch.randint(1, num + 1, (batch, kv_heads), generator=gen)
        kept = select_kv_reference(lifted, budgets)
        for b in range(batch):
            columns = valid[b].nonzero().flatten().tolist()
            near = columns[::-1][:recent]  # nearest first
            others = [c for c in range(num) if c not in near]
            assert torch.equal(lifted[b][:, others], plain[b][:, others]), case
            for h in range(kv_heads):
                n = min(int(budgets[b, h]), len(columns))
                want = (
                    near[:n]
                    + [
                        c
                        for c in sorted(columns, key=lambda c: (-float(plain[b, h, c]), c))
                        if c not in near
                    ][: max(n - len(near), 0)]
                )
                assert kept[b][h].tolist() == sorted(want), (case, b, h)


@pytest.mark.parametrize("policy", ["maskkv", "snapkv", "streaming", "random", "adakv"])
def test_policy_ops(policy):
    from maskkv_compile.policies import get_policy

    votes = torch.rand(2, 2, 30, generator=torch.Generator().manual_seed(5))
    mass = torch.rand(2, 4) * 8
    prompt_valid = torch.ones(2, 30, dtype=torch.bool)
    prompt_valid[1, :10] = False  # row 1's prompt: the last 20 columns
    voter_valid = torch.ones(2, 8, dtype=torch.bool)
    voter_valid[1, 5:] = False
    scores = torch.ops.maskkv.selection_scores(votes, prompt_valid, policy, 5, 4, 0, 0)
    # each row scored alone, over its own prompt columns in order; -inf elsewhere
    row0 = get_policy(policy).selection_scores(votes[:1], (1, 2, 30), kernel=5, sink=4, seed=0)
    row1 = get_policy(policy).selection_scores(
        votes[1:, :, 10:], (1, 2, 20), kernel=5, sink=4, seed=0
    )
    torch.testing.assert_close(scores[0], row0[0].to(scores.dtype))
    torch.testing.assert_close(scores[1, :, 10:], row1[0].to(scores.dtype))
    assert (scores[1, :, :10] == float("-inf")).all()
    budgets = torch.ops.maskkv.head_budgets(mass, scores, voter_valid, 6.0, 6, policy, 0.1, 1)
    assert budgets.dtype == torch.long and budgets.shape == (2, 2)
    assert budgets.sum(1).tolist() == [12, 12]
    assert bool((budgets[0] <= 30).all()) and bool((budgets[1] <= 20).all())
    # a prompt no longer than the budget is kept whole (each row: its own prompt length)
    assert torch.ops.maskkv.head_budgets(
        mass, scores, voter_valid, 6.0, 30, policy, 0.1, 1
    ).tolist() == [[30, 30], [20, 20]]
    opcheck(torch.ops.maskkv.selection_scores.default, (votes, prompt_valid, policy, 5, 4, 0, 0))
    opcheck(torch.ops.maskkv.selection_scores.default, (votes, prompt_valid, policy, 5, 4, 0, 3))
    opcheck(
        torch.ops.maskkv.head_budgets.default, (mass, scores, voter_valid, 6.0, 6, policy, 0.1, 1)
    )
