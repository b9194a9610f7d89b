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


def run_votes(case, gen):
    from maskkv_compile.kernels.mask_votes import mask_votes_reference
    from maskkv_compile.kernels.triton_votes import mask_votes_triton

    b, h, hkv, s, d, rv, p = case["shape"]
    dtype = DTYPES[case["dtype"]]
    q = layout(torch.randn(b, h, s, d, generator=gen).to(dtype), case.get("strided", False))
    k = layout(torch.randn(b, hkv, s, d, generator=gen).to(dtype) * 2, case.get("strided", False))
    perm = torch.randperm(s, generator=gen)  # voters and prompt disjoint; the rest is padding
    voter_idx, prompt_idx = perm[:rv].sort().values, perm[rv : rv + p].sort().values
    scale = d**-0.5
    real_empty, torch.empty = poisoned_empty()
    try:
        votes, mass = mask_votes_triton(q, k, voter_idx, prompt_idx, scale)
    finally:
        torch.empty = real_empty
    ref_votes, ref_mass = mask_votes_reference(q, k, voter_idx, prompt_idx, scale)
    atol, rtol = VOTES_TOL[case["dtype"]]
    return [(votes, ref_votes, atol, rtol), (mass, ref_mass, atol, rtol)]


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
    kept_len = torch.tensor(case["kept_len"], dtype=torch.long)
    pad = torch.arange(kk)[None, :, None] >= kept_len[:, None, None]  # (Hkv, K, 1)
    kept_k, kept_v = kept_k.masked_fill(pad, 0), kept_v.masked_fill(pad, 0)
    # the kernel must never read the padding: give it NaN there
    nan_k, nan_v = kept_k.masked_fill(pad, float("nan")), kept_v.masked_fill(pad, float("nan"))
    scale = d**-0.5
    real_empty, torch.empty = poisoned_empty()
    try:
        out = cached_attention_triton(q, k, v, nan_k, nan_v, kept_len, scale)
    finally:
        torch.empty = real_empty
    f32 = [t.float() for t in (q, k, v, kept_k, kept_v)]
    ref = cached_attention_reference(*f32, kept_len, scale)
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
            result["close"] = all(torch.allclose(got, ref, atol=a, rtol=r) for got, ref, a, r in pairs)
            result["ok"] = result["all_written"] and result["close"]
        except Exception as exc:  # reported per case
            result["error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(result), flush=True)


def registration() -> None:
    from torch._dynamo.backends.common import aot_autograd

    from maskkv_compile.kernels import cached_attention as ca
    from maskkv_compile.kernels import mask_votes as mv
    from maskkv_compile.kernels import triton_cached_attention as tca
    from maskkv_compile.kernels import triton_votes as tv

    tv.register_cuda(mv.mask_votes, mv.mask_votes_chunked)
    tca.register_cuda(ca.cached_attention, ca.cached_attention_torch)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    v = torch.randn(1, 2, 10, 16, generator=gen)
    voter_idx, prompt_idx = torch.arange(30, 40), torch.arange(30)
    kept_len = torch.tensor([30, 7])

    def both(q, k):
        votes = torch.ops.maskkv.mask_votes(q, k, voter_idx, prompt_idx, 0.25)
        qr, kr = q[:, :, 30:], k[:, :, 30:]
        attn = torch.ops.maskkv.cached_attention(qr, kr, v, k[:, :, :30], k[:, :, :30], kept_len, 0.25)
        return votes, attn

    got = torch.compile(both, backend="aot_eager", fullgraph=True)(q, k)
    ref = (
        mv.mask_votes_reference(q, k, voter_idx, prompt_idx, 0.25),
        ca.cached_attention_reference(q[:, :, 30:], k[:, :, 30:], v, k[:, :, :30], k[:, :, :30], kept_len, 0.25),
    )
    cpu_ok = all(torch.allclose(a, b, atol=1e-5) for a, b in zip((*got[0], got[1]), (*ref[0], ref[1])))

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
        {str(n.kwargs["kernel_idx"]) for g in graphs for n in g.graph.nodes if "triton_kernel_wrapper" in str(n.target)}
    )
    custom = sorted({str(n.target) for g in graphs for n in g.graph.nodes if "maskkv" in str(n.target)})
    print(json.dumps({"cpu_ok": cpu_ok, "kernel_nodes": len(kernels), "maskkv_nodes": custom}), flush=True)


if __name__ == "__main__":
    {"interpret": interpret, "registration": registration}[sys.argv[1]]()
