"""The chunked CPU ``maskkv::mask_votes`` against the materialized reference."""

from __future__ import annotations

import pytest
import torch
from maskkv_compile.kernels.mask_votes import KEY_BLOCK_FACTOR, mask_votes_reference

CASES = {  # (B, H, Hkv, S, D, Rv, P, chunk)
    "mha": (1, 4, 4, 60, 16, 12, 40, 8),
    "gqa2-ragged-chunks": (2, 4, 2, 97, 8, 23, 61, 5),  # Rv, P, S all non-multiples of chunk
    "gqa4-one-key-block": (1, 8, 2, 33, 32, 7, 20, 64),  # chunk larger than everything
    "mqa-chunk1": (1, 3, 1, 19, 4, 4, 9, 1),
}


def make_inputs(shape, dtype, seed=0):
    b, h, hkv, s, d, rv, p, _ = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64).to(dtype)
    k = (torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64) * 3).to(
        dtype
    )  # peaky softmax
    perm = torch.randperm(s, generator=gen)  # voters and prompt disjoint, the rest is padding
    return q, k, perm[:rv].sort().values, perm[rv : rv + p].sort().values, d**-0.5


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"]
)
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_votes_match_reference(name, dtype, tol):
    shape = CASES[name]
    q, k, voter_idx, prompt_idx, scale = make_inputs(shape, dtype)
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, scale, shape[-1])
    ref_votes, ref_mass = mask_votes_reference(q, k, voter_idx, prompt_idx, scale)
    assert votes.dtype == ref_votes.dtype == mass.dtype == dtype
    assert votes.shape == (shape[0], shape[2], shape[6]) and mass.shape == (shape[0], shape[1])
    torch.testing.assert_close(votes, ref_votes, atol=tol, rtol=tol)
    torch.testing.assert_close(mass, ref_mass, atol=tol, rtol=tol)


def test_bf16_inputs_accumulate_in_fp32():
    q, k, voter_idx, prompt_idx, scale = make_inputs(CASES["gqa2-ragged-chunks"], torch.bfloat16)
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, scale, 5)
    ref_votes, ref_mass = mask_votes_reference(q, k, voter_idx, prompt_idx, scale)
    assert votes.dtype == mass.dtype == torch.float32
    torch.testing.assert_close(votes, ref_votes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-5)


def test_empty_voters_or_prompt():
    q, k, voter_idx, prompt_idx, scale = make_inputs(CASES["mha"], torch.float32)
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voter_idx[:0], prompt_idx, scale)
    assert votes.abs().sum() == 0 and mass.abs().sum() == 0
    votes, mass = torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx[:0], scale)
    assert votes.shape == (1, 4, 0) and mass.abs().sum() == 0


@pytest.mark.parametrize("name", ["gqa2-ragged-chunks", "mqa-chunk1"])
def test_opcheck(name):
    shape = CASES[name]
    q, k, voter_idx, prompt_idx, scale = make_inputs(shape, torch.float32)
    torch.library.opcheck(
        torch.ops.maskkv.mask_votes.default, (q, k, voter_idx, prompt_idx, scale, shape[-1])
    )


def test_temporaries_do_not_grow_with_voters_times_keys():
    """The largest single allocation is a (B, H, chunk, key block) tile, not (B, H, Rv, S)."""
    b, h, hkv, s, d, rv, p, chunk = 1, 4, 2, 2048 + 256, 16, 256, 2048, 8
    q, k, voter_idx, prompt_idx, scale = make_inputs((b, h, hkv, s, d, rv, p, chunk), torch.float32)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, scale, chunk)
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    tile = b * h * chunk * chunk * KEY_BLOCK_FACTOR * 4  # 32 KiB
    output = b * hkv * p * 4  # the votes themselves, 16 KiB
    assert largest <= max(tile, output), largest
    assert largest * 100 < b * h * rv * s * 4  # the materialized score matrix: 9 MiB
