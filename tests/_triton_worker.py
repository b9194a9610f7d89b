"""Subprocess worker for tests/test_triton_kernels.py (not a test module itself).

    python tests/_triton_worker.py interpret < cases.json     # needs TRITON_INTERPRET=1
    python tests/_triton_worker.py registration               # needs TRITON_INTERPRET unset

``interpret``: runs each case (a dict from the test module) through the Triton launch
function under the numpy interpreter and compares it with the pure-torch reference. Every
float buffer the launch function allocates is filled with NaN first, so an element the
kernels never wrote shows up as NaN. Prints one JSON line per case.

``registration``: forces the CUDA registration on this CPU machine and checks (a) that CPU
inputs still take the pure-torch path under torch.compile, and (b) that with CPU treated as
a Triton device, AOTAutograd replaces the op by ``triton_kernel_wrapper_functional`` nodes,
i.e. the graph handed to Inductor holds the kernels. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (atol, rtol) per input dtype. Votes are fp32 sums, exact up to summation order (the bf16
# products are exact in fp32); attention outputs are rounded to the input dtype.
VOTES_TOL = {"float32": (1e-5, 1e-5), "float16": (1e-4, 1e-4), "bfloat16": (1e-4, 1e-4)}
ATTN_TOL = {"float32": (1e-5, 1e-5), "float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2)}


def poisoned_empty():
    """torch.empty that fills floating buffers with NaN (restored by the caller)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    return real_empty, empty


def layout(x: torch.Tensor, strided: bool) -> torch.Tensor:
    """Same values; with ``strided`` stored as (B, S, H, D) and viewed back (non-contiguous)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if strided else x


def stored_transposed(x: torch.Tensor, strided: bool) -> torch.Tensor:
    """Same values of a 2-D tensor; with ``strided`` stored column-major (non-contiguous)."""
    return x.t().contiguous().t() if strided else x


def vote_masks(case, gen, b, s, rv, p, voter_idx):
    """(key_valid, voter_valid, prompt_valid) for case["masks"]: None, "all-true" or "ragged".

    ragged: random False entries in each mask (a fifth of the keys, a third of the voters and
    prompt columns); the last row is left-padded over its first min(70, S // 2) keys (a whole
    key block of 64 when S allows), and with B >= 3 row 1 has no voter at all. Voter
    positions outside that left padding stay valid keys, so every row keeps keys to attend to.
    """
    mode = case.get("masks")
    if mode is None:
        return None, None, None
    if mode == "all-true":
        return (
            torch.ones(b, s, dtype=torch.bool),
            torch.ones(b, rv, dtype=torch.bool),
            torch.ones(b, p, dtype=torch.bool),
        )
    assert mode == "ragged", mode
    key_valid = torch.rand(b, s, generator=gen) >= 0.2
    key_valid[:, voter_idx] = True
    key_valid[-1, : min(70, s // 2)] = False  # voters in there too: they still have keys after it
    voter_valid = torch.rand(b, rv, generator=gen) >= 1 / 3
    if b >= 3:
        voter_valid[1] = False
    prompt_valid = torch.rand(b, p, generator=gen) >= 1 / 3
    strided = case.get("strided", False)
    return tuple(stored_transposed(m, strided) for m in (key_valid, voter_valid, prompt_valid))


def run_votes(case, gen):
    from maskkv_compile.kernels.mask_votes import mask_votes_reference
    from maskkv_compile.kernels.triton_votes import mask_votes_triton

    b, h, hkv, s, d, rv, p = case["shape"]
    dtype = DTYPES[case["dtype"]]
    q = layout(torch.randn(b, h, s, d, generator=gen).to(dtype), case.get("strided", False))
    k = layout(torch.randn(b, hkv, s, d, generator=gen).to(dtype) * 2, case.get("strided", False))
    perm = torch.randperm(s, generator=gen)  # voters and prompt disjoint; the rest is padding
    voter_idx, prompt_idx = perm[:rv].sort().values, perm[rv : rv + p].sort().values
    key_valid, voter_valid, prompt_valid = vote_masks(case, gen, b, s, rv, p, voter_idx)
    scale = d**-0.5
    k_in = k
    if key_valid is not None:  # the kernels must ignore padding keys whatever they hold
        k_in = layout(
            k.masked_fill(~key_valid[:, None, :, None], float("nan")), case.get("strided", False)
        )
    real_empty, torch.empty = poisoned_empty()
    try:
        votes, mass = mask_votes_triton(
            q, k_in, voter_idx, prompt_idx, scale, key_valid, voter_valid, prompt_valid
        )
    finally:
        torch.empty = real_empty
    ref_votes, ref_mass = mask_votes_reference(
        q, k, voter_idx, prompt_idx, scale, key_valid, voter_valid, prompt_valid
    )
    atol, rtol = VOTES_TOL[case["dtype"]]
    return [(votes, ref_votes, atol, rtol), (mass, ref_mass, atol, rtol)]


def row_ends(case, gen, r):
    """row_end for case["row_end"]: "all" (default: (0,), every row sees every computed key)
    or "ragged" ((R,): row i sees the first randint(0, R] computed keys; row 0 sees one, as
    block diffusion's shifted row before the block does)."""
    if case.get("row_end", "all") == "all":
        return torch.zeros(0, dtype=torch.long)
    ends = torch.randint(1, r + 1, (r,), generator=gen)
    ends[0] = 1
    return ends


def response_valid(case, gen, b, r):
    """resp_valid (B, R) for case["resp_valid"]: "all" (default), "ragged" or "row-without-keys".

    ragged: row 0 has a third of its response keys masked at random; every later row has
    its first min(R - 1, 66) keys masked (a whole 64-key block when R > 66).
    row-without-keys: as ragged, but the last row has no response key at all.
    """
    mode = case.get("resp_valid", "all")
    valid = torch.ones(b, r, dtype=torch.bool)
    if mode == "all":
        return valid
    assert mode in ("ragged", "row-without-keys"), mode
    valid[0] = torch.rand(r, generator=gen) >= 1 / 3
    valid[1:, : min(r - 1, 66)] = False
    if mode == "row-without-keys":
        valid[-1] = False
    return valid


def run_attention(case, gen):
    from maskkv_compile.kernels.cached_attention import cached_attention_reference
    from maskkv_compile.kernels.triton_cached_attention import cached_attention_triton

    b, h, hkv, r, kk, d, dv = case["shape"]
    dtype = DTYPES[case["dtype"]]
    strided = case.get("strided", False)
    q = layout(torch.randn(b, h, r, d, generator=gen).to(dtype), strided)
    k = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, r, dv, generator=gen).to(dtype)
    kept_k = torch.randn(b, hkv, kk, d, generator=gen).to(dtype)
    kept_v = torch.randn(b, hkv, kk, dv, generator=gen).to(dtype)
    kept_len = torch.tensor(case["kept_len"], dtype=torch.long)  # (B, Hkv)
    assert kept_len.shape == (b, hkv), kept_len.shape
    resp_valid = response_valid(case, gen, b, r)
    row_end = row_ends(case, gen, r)
    pad = torch.arange(kk)[None, None, :, None] >= kept_len[:, :, None, None]  # (B, Hkv, K, 1)
    kept_k, kept_v = kept_k.masked_fill(pad, 0), kept_v.masked_fill(pad, 0)
    # the kernel must never read the padding nor another row's response keys: NaN there
    nan_k, nan_v = kept_k.masked_fill(pad, float("nan")), kept_v.masked_fill(pad, float("nan"))
    masked = ~resp_valid[:, None, :, None]  # (B, 1, R, 1)
    nan_rk, nan_rv = k.masked_fill(masked, float("nan")), v.masked_fill(masked, float("nan"))
    scale = d**-0.5
    real_empty, torch.empty = poisoned_empty()
    try:
        out = cached_attention_triton(
            q,
            nan_rk,
            nan_rv,
            nan_k,
            nan_v,
            stored_transposed(kept_len, strided),
            stored_transposed(resp_valid, strided),
            row_end,
            scale,
        )
    finally:
        torch.empty = real_empty
    f32 = [t.float() for t in (q, k, v, kept_k, kept_v)]
    ref = cached_attention_reference(*f32, kept_len, resp_valid, row_end, scale)
    atol, rtol = ATTN_TOL[case["dtype"]]
    return [(out.float(), ref, atol, rtol)]


def interpret() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for case in json.load(sys.stdin):
        gen = torch.Generator().manual_seed(case.get("seed", 0))
        result = {"id": case["id"], "ok": False}
        try:
            pairs = (run_votes if case["kernel"] == "mask_votes" else run_attention)(case, gen)
            result["all_written"] = all(not torch.isnan(got).any().item() for got, *_ in pairs)
            result["max_err"] = max((got - ref).abs().max().item() for got, ref, *_ in pairs)
            result["close"] = all(
                torch.allclose(got, ref, atol=a, rtol=r) for got, ref, a, r in pairs
            )
            result["ok"] = result["all_written"] and result["close"]
        except Exception as exc:  # reported per case
            result["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(result), flush=True)


def registration() -> None:
    from maskkv_compile.kernels import cached_attention as ca
    from maskkv_compile.kernels import mask_votes as mv
    from maskkv_compile.kernels import triton_cached_attention as tca
    from maskkv_compile.kernels import triton_votes as tv
    from torch._dynamo.backends.common import aot_autograd

    tv.register_cuda(mv.mask_votes, mv.mask_votes_chunked)
    tca.register_cuda(ca.cached_attention, ca.cached_attention_torch)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    v = torch.randn(1, 2, 10, 16, generator=gen)
    voter_idx, prompt_idx = torch.arange(30, 40), torch.arange(30)
    kept_len = torch.tensor([[30, 7]])  # (B, Hkv)
    resp_valid = torch.arange(10)[None, :] != 3  # (B, R): response row 3 is not a key
    row_end = torch.tensor([1] + [10] * 9)  # (R,): row 0 sees only itself
    key_valid = torch.arange(40)[None, :] >= 2  # (B, S): two padding keys
    voter_valid = torch.arange(10)[None, :] != 5  # (B, Rv)
    prompt_valid = torch.arange(30)[None, :] != 11  # (B, P)
    masks = (key_valid, voter_valid, prompt_valid)

    def both(q, k):
        votes = torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, 0.25, 64, *masks)
        qr, kr = q[:, :, 30:], k[:, :, 30:]
        attn = torch.ops.maskkv.cached_attention(
            qr, kr, v, k[:, :, :30], k[:, :, :30], kept_len, resp_valid, row_end, 0.25
        )
        return votes, attn

    got = torch.compile(both, backend="aot_eager", fullgraph=True)(q, k)
    ref = (
        mv.mask_votes_reference(q, k, voter_idx, prompt_idx, 0.25, *masks),
        ca.cached_attention_reference(
            q[:, :, 30:],
            k[:, :, 30:],
            v,
            k[:, :, :30],
            k[:, :, :30],
            kept_len,
            resp_valid,
            row_end,
            0.25,
        ),
    )
    cpu_ok = all(
        torch.allclose(a, b, atol=1e-5) for a, b in zip((*got[0], got[1]), (*ref[0], ref[1]))
    )

    tv.TRITON_DEVICE_TYPES = ("cpu",)  # pretend CPU is a Triton device: trace only, never run
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        raise RuntimeError("graph captured")

    torch._dynamo.reset()
    try:
        torch.compile(both, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(q, k)
    except Exception:
        pass
    kernels = sorted(
        {
            str(n.kwargs["kernel_idx"])
            for g in graphs
            for n in g.graph.nodes
            if "triton_kernel_wrapper" in str(n.target)
        }
    )
    custom = sorted(
        {str(n.target) for g in graphs for n in g.graph.nodes if "maskkv" in str(n.target)}
    )
    print(
        json.dumps({"cpu_ok": cpu_ok, "kernel_nodes": len(kernels), "maskkv_nodes": custom}),
        flush=True,
    )


if __name__ == "__main__":
    {"interpret": interpret, "registration": registration}[sys.argv[1]]()
