"""GPU check of the Triton kernels: correctness against the references, then times.

    python scripts/gpu_check.py                      # on a CUDA machine with triton (< 5 min)
    TRITON_INTERPRET=1 python scripts/gpu_check.py --cpu-smoke   # every code path, tiny, on CPU
    python scripts/gpu_check.py --multi-gpu          # more than one GPU: tensor parallelism

1. Correctness (fresh random inputs, NaN-poisoned outputs): the launch functions of
   ``kernels/triton_votes.py`` and ``kernels/triton_cached_attention.py`` against
   ``mask_votes_reference`` / ``cached_attention_reference``, fp32 / bf16 / fp16, GQA,
   sizes that are not block multiples; votes with and without the per-row masks
   (key_valid with NaN in the padding keys and a fully padded key block, voter_valid,
   prompt_valid); ragged per-row kept_len (B, Hkv) with NaN in the padding and resp_valid
   with False entries (NaN in those response K/V); the ops themselves on CUDA tensors
   (routed to Triton, masks given); and torch.compile with Inductor, whose generated code
   must contain the kernels (the ``triton_op`` route) and match.
2. Times (ms, CUDA events via ``triton.testing.do_bench``) at P = 4k, 8k, 16k, 32k, L = 256,
   B=1, H=32, Hkv=8, D=128, bf16:
   - mask_votes: Triton vs the torch path (the chunked CPU code run on CUDA) vs the
     materialized softmax (``mask_votes_reference``); and with the three masks given
     (a left-padded row), Triton vs the torch path vs Triton without masks;
   - cached_attention with every prompt entry kept: Triton vs the torch path (SDPA with a
     key mask over the concatenation) vs plain SDPA over concatenated K/V (no mask, which
     is what the model would run without MaskKV); plus one row with budget 256;
   - select_kv: the gather of the kept rows, torch (select_kv's ``gather_kept``) vs a
     candidate Triton gather defined here (see ``kernels/select_kv.py``), and the whole op.
3. The full LLaDA loop on LLaDA-shaped layers (2 layers of hidden 4096, 32 heads, MLP 12288,
   vocabulary 126,464, bf16), gen 256, 256 steps, block 32, at P = 4k..32k: seconds per
   generation, uncached vs MaskKV 256 vs MaskKV 256 + dual cache vs the same under CUDA
   graphs (``torch.compile(backend="maskkv", options={..., "mode": "reduce-overhead"})``).
   Also: ``revote`` with the second tier in page-locked host memory (``second_tier="host"``)
   against the device tier: the same tokens and kept positions, the tier on the CPU and
   pinned, less device memory held after the prefill. And the host-synchronisation contract:
   one prefill and two steps of a tiny model (one row, and a left-padded batch) with the
   prefill and step graphs under ``torch.cuda.set_sync_debug_mode("error")``.
4. ``--multi-gpu`` (only that, on a machine with more than one GPU): MaskKV on a
   tensor-parallel model, one GPU per rank over nccl: ``examples/tensor_parallel.py --cuda``
   under ``torchrun --nproc-per-node <GPUs, at most 4, a divisor of the 4 heads>``, with the
   eager and the Inductor backend; each must report the same tokens on every rank and, at
   full budget with a prefill every step, the uncached sharded model's tokens. Never run
   here (no GPU); written against the CPU/gloo run of the same example, which CI runs.
Exit status: 0 all checks passed, 1 a check failed, 2 no CUDA (or no triton, or fewer than
two GPUs for --multi-gpu).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def fail_unless_runnable(cpu_smoke: bool) -> None:
    if triton is None:
        sys.exit(
            print("gpu_check: triton is not installed (pip install -e '.[gpu]')", file=sys.stderr)
            or 2
        )
    if cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit(print("gpu_check: --cpu-smoke needs TRITON_INTERPRET=1", file=sys.stderr) or 2)
    elif not torch.cuda.is_available():
        sys.exit(
            print(
                f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build: "
                f"{torch.backends.cuda.is_built()}). Run it on a CUDA machine, or use "
                "TRITON_INTERPRET=1 ... --cpu-smoke to exercise its code paths on CPU.",
                file=sys.stderr,
            )
            or 2
        )


if triton is not None:

    @triton.jit
    def _gather_kv_kernel(
        src_ptr,
        pos_ptr,
        dst_ptr,
        HKV,
        KMAX,
        D,
        ssb,
        ssh,
        sss,
        ssd,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """dst[b, h, j] = src[b, h, pos[b, h, j]], zeros where pos < 0; dst contiguous."""
        pid_k = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        h = pid_bh % HKV
        slots = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = slots < KMAX
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        pos = tl.load(pos_ptr + pid_bh * KMAX + slots, mask=ok, other=-1)
        rows = tl.load(
            src_ptr + b * ssb + h * ssh + pos[:, None] * sss + d[None, :] * ssd,
            mask=(pos >= 0)[:, None] & d_ok[None, :],
            other=0.0,
        )
        tl.store(
            dst_ptr + (pid_bh * KMAX + slots)[:, None] * D + d[None, :],
            rows,
            mask=ok[:, None] & d_ok[None, :],
        )


def triton_gather(k, v, pos):
    """Candidate Triton gather of the kept rows; pos (B, Hkv, Kmax) with -1 padding."""
    batch, kv_heads, kmax = pos.shape
    outs = []
    for src in (k, v):
        dst = torch.empty(
            (batch, kv_heads, kmax, src.shape[-1]), device=src.device, dtype=src.dtype
        )
        _gather_kv_kernel[(triton.cdiv(kmax, 64), batch * kv_heads)](
            src,
            pos,
            dst,
            kv_heads,
            kmax,
            src.shape[-1],
            *src.stride(),
            BLOCK_K=64,
            BLOCK_D=max(16, triton.next_power_of_2(src.shape[-1])),
        )
        outs.append(dst)
    return outs


def torch_gather(k, v, pos):
    """The gather step of ``maskkv::select_kv`` (its ``gather_kept``)."""
    from maskkv_compile.kernels.select_kv import gather_kept

    return list(gather_kept(k, v, pos.clamp(min=0), pos >= 0))


# ---- correctness -------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # attention outputs


def poisoned(fn, *args):
    """Run fn with every floating torch.empty NaN-filled; return (outputs, all written)."""
    real_empty = torch.empty

    def empty(*a, **kw):
        buf = real_empty(*a, **kw)
        return buf.fill_(float("nan")) if buf.is_floating_point() else buf

    torch.empty = empty
    try:
        out = fn(*args)
    finally:
        torch.empty = real_empty
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return outs, all(not torch.isnan(o).any().item() for o in outs)


def votes_inputs(shape, dtype, device, gen):
    b, h, hkv, s, d, rv, p = shape
    q = torch.randn(b, h, s, d, generator=gen, device=device).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen, device=device).to(dtype)
    perm = torch.randperm(s, generator=gen, device=device)
    return q, k, perm[:rv].sort().values, perm[rv : rv + p].sort().values, d**-0.5


def vote_masks(b, s, rv, p, voter_idx, device, gen):
    """key_valid (B, S), voter_valid (B, Rv), prompt_valid (B, P), random False entries; the
    last row's first min(70, S // 2) keys are padding (a whole 64-key block)."""
    key_valid = torch.rand(b, s, generator=gen, device=device) >= 0.2
    key_valid[:, voter_idx] = True
    key_valid[-1, : min(70, s // 2)] = False
    voter_valid = torch.rand(b, rv, generator=gen, device=device) >= 1 / 3
    prompt_valid = torch.rand(b, p, generator=gen, device=device) >= 1 / 3
    return key_valid, voter_valid, prompt_valid


def attention_inputs(shape, kept_len, dtype, device, gen, ragged_resp=False):
    """kept_len (B, Hkv); with ragged_resp, resp_valid masks a third of row 0's response keys
    at random and the first min(R - 1, 66) of every other row's, and row_end lets query row 0
    see one computed key and every other a random number of them. Returns also the kept
    padding (B, Hkv, K, 1) and the masked response rows (B, 1, R, 1)."""
    b, h, hkv, r, kk, d, dv = shape
    q, k, v, kept_k, kept_v = (
        torch.randn(*s, generator=gen, device=device).to(dtype)
        for s in ((b, h, r, d), (b, hkv, r, d), (b, hkv, r, dv), (b, hkv, kk, d), (b, hkv, kk, dv))
    )
    kept_len = torch.tensor(kept_len, device=device)
    resp_valid = torch.ones(b, r, dtype=torch.bool, device=device)
    row_end = torch.zeros(0, dtype=torch.long, device=device)  # no limit
    if ragged_resp:
        resp_valid[0] = torch.rand(r, generator=gen, device=device) >= 1 / 3
        resp_valid[1:, : min(r - 1, 66)] = False
        row_end = torch.randint(1, r + 1, (r,), generator=gen, device=device)
        row_end[0] = 1
    pad = (
        torch.arange(kk, device=device)[None, None, :, None] >= kept_len[:, :, None, None]
    )  # (B, Hkv, K, 1)
    masked = ~resp_valid[:, None, :, None]
    return (
        q,
        k,
        v,
        kept_k.masked_fill(pad, 0),
        kept_v.masked_fill(pad, 0),
        kept_len,
        resp_valid,
        row_end,
        d**-0.5,
        pad,
        masked,
    )


def check_rows(device, smoke):
    from maskkv_compile.kernels.cached_attention import cached_attention_reference
    from maskkv_compile.kernels.mask_votes import mask_votes_reference
    from maskkv_compile.kernels.triton_cached_attention import cached_attention_triton
    from maskkv_compile.kernels.triton_votes import mask_votes_triton

    gen = torch.Generator(device=device).manual_seed(0)
    dtypes = (
        [torch.float32, torch.bfloat16] if smoke else [torch.float32, torch.bfloat16, torch.float16]
    )
    vshapes = [
        ((1, 6, 2, 150, 32, 40, 100), False),
        ((2, 4, 2, 150, 24, 40, 100), True),
    ]  # (B, H, Hkv, S, D, Rv, P), masks
    if not smoke:
        vshapes += [
            ((2, 32, 8, 4353, 128, 257, 4000), False),
            ((2, 32, 8, 4353, 128, 257, 4000), True),
        ]
    ashapes = [
        ((1, 6, 2, 70, 90, 32, 32), [[90, 41]], False),
        ((2, 6, 2, 70, 90, 32, 32), [[90, 0], [0, 41]], True),
    ]
    if not smoke:
        ashapes.append(
            (
                (2, 32, 8, 257, 1000, 128, 128),
                [[1000, 0, 17, 999, 256, 513, 64, 1], [0, 1000, 3, 255, 257, 64, 999, 100]],
                True,
            )
        )
    rows = []
    for dtype in dtypes:
        for shape, with_masks in vshapes:
            q, k, vi, pi, scale = votes_inputs(shape, dtype, device, gen)
            masks, k_in = (None, None, None), k
            if with_masks:
                b, _, _, s, _, rv, p = shape
                masks = vote_masks(b, s, rv, p, vi, device, gen)
                k_in = k.masked_fill(
                    ~masks[0][:, None, :, None], float("nan")
                )  # padding keys: never counted
            (votes, mass), written = poisoned(mask_votes_triton, q, k_in, vi, pi, scale, *masks)
            ref_votes, ref_mass = mask_votes_reference(q, k, vi, pi, scale, *masks)
            err = max((votes - ref_votes).abs().max().item(), (mass - ref_mass).abs().max().item())
            close = [
                torch.allclose(a, b, atol=1e-4, rtol=1e-4)
                for a, b in ((votes, ref_votes), (mass, ref_mass))
            ]
            ok = written and all(close)
            rows.append(
                (
                    "mask_votes" + (" masked" if with_masks else ""),
                    str(shape),
                    str(dtype)[6:],
                    err,
                    ok,
                )
            )
        for shape, kept, ragged in ashapes:
            q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale, pad, masked = (
                attention_inputs(shape, kept, dtype, device, gen, ragged_resp=ragged)
            )
            nan_k, nan_v = (
                kept_k.masked_fill(pad, float("nan")),
                kept_v.masked_fill(pad, float("nan")),
            )
            nan_rk, nan_rv = (
                k.masked_fill(masked, float("nan")),
                v.masked_fill(masked, float("nan")),
            )
            (out,), written = poisoned(
                cached_attention_triton,
                q,
                nan_rk,
                nan_rv,
                nan_k,
                nan_v,
                kept_len,
                resp_valid,
                row_end,
                scale,
            )
            ref = cached_attention_reference(
                *(t.float() for t in (q, k, v, kept_k, kept_v)),
                kept_len,
                resp_valid,
                row_end,
                scale,
            )
            err = (out.float() - ref).abs().max().item()
            ok = written and torch.allclose(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
            rows.append(
                (
                    "cached_attention" + (" rows" if ragged else ""),
                    str(shape),
                    str(dtype)[6:],
                    err,
                    ok,
                )
            )
    k = torch.randn(2, 4, 300, 24, generator=gen, device=device)
    pos = torch.randint(-1, 300, (2, 4, 77), generator=gen, device=device)
    got, want = triton_gather(k, k * 2, pos), torch_gather(k, k * 2, pos)
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    rows.append(
        (
            "select_kv gather",
            "(2, 4, 300, 24) Kmax=77",
            "float32",
            err,
            all(map(torch.equal, got, want)),
        )
    )
    sections = [second_tier_rows]
    if device == "cuda":
        sections = [lambda _: op_and_inductor_rows(gen), lambda _: sync_rows(), *sections]
    for section in sections:
        try:
            rows += section(device)
        except Exception as error:  # noqa: BLE001 - a crash is a failed row; the next ones run
            import traceback

            traceback.print_exc()
            rows.append((f"crashed: {type(error).__name__}", "-", "-", float("nan"), False))
    return rows


def sync_rows():
    """The prefill and step graphs under ``torch.cuda.set_sync_debug_mode("error")``: any op
    that synchronises with the host inside them raises (``tests/test_host_reads.py`` counts the
    reads on the CPU; this is the same contract on CUDA, with a padded batch too)."""
    import maskkv_compile
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=2, hidden=64, heads=4, vocab=128).to("cuda")
    mask = model.config.mask_token_id
    x = torch.cat(
        [
            torch.randint(0, mask, (2, 40), generator=torch.Generator().manual_seed(1)),
            torch.full((2, 6), mask),
        ],
        dim=1,
    ).to("cuda")
    valid = torch.ones(x.shape, dtype=torch.bool, device="cuda")
    valid[1, :7] = False  # row 1 left-padded
    rows = []
    for name, kwargs in (("one layout", {}), ("padded batch", {"attention_mask": valid.long()})):
        net = maskkv_compile.optimize(model, budget=8, backend="eager")
        try:
            net(x, **kwargs)  # builds the runtime
            runtime = net.runtime
            for graph in ("_prefill", "_step"):
                inner = getattr(runtime, graph)

                def strict(*args, _inner=inner):
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        return _inner(*args)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")

                setattr(runtime, graph, strict)
            net.reset()
            y = x.clone()
            for _ in range(3):
                logits = net(y, **kwargs).logits
                y[:, -6] = logits[:, -6].argmax(-1)
            transitions = net.cache_stats()["transitions"]
            ok = transitions == {"new": 1, "step": 2}
            error = str(transitions)
        except RuntimeError as exc:
            ok, error = False, str(exc).splitlines()[0]
        rows.append((f"no sync in prefill/step graphs, {name}", error[:40], "float32", 0.0, ok))
    return rows


def second_tier_rows(device):
    """``revote`` with ``second_tier="host"`` against ``"device"`` on a tiny model: the same
    tokens and kept positions through a drop-in loop that re-votes every step; on CUDA the host
    tier is page-locked CPU memory and the device holds less after the prefill."""
    import maskkv_compile
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=2, hidden=64, heads=4, vocab=128).to(device)
    mask = model.config.mask_token_id
    x = torch.cat(
        [
            torch.randint(0, mask, (1, 40), generator=torch.Generator().manual_seed(1)),
            torch.full((1, 6), mask),
        ],
        dim=1,
    ).to(device)
    runs = {}
    for where in ("device", "host"):
        net = maskkv_compile.optimize(model, budget=4, backend="eager", revote=1, second_tier=where)
        y, held = x.clone(), None
        for _ in range(6):
            logits = net(y).logits
            if held is None and device == "cuda":
                held = torch.cuda.memory_allocated()
            masked = (y == mask).nonzero()
            if masked.numel():
                row, col = masked[0].tolist()
                y[row, col] = logits[row, col].argmax()
        stats = net.cache_stats()
        runs[where] = (
            y,
            [layer.kept_pos for layer in net.runtime.last_session.layers],
            stats,
            held,
        )
        del net
    (y, kept, stats, held), (hy, hkept, hstats, hheld) = runs["device"], runs["host"]
    same = torch.equal(y, hy) and all(torch.equal(a, b) for a, b in zip(kept, hkept))
    tier = hstats["second_tier"]
    placed = tier["device"] == "cpu" and (tier["pinned"] if device == "cuda" else True)
    lighter = hheld < held if device == "cuda" else True
    ok = same and placed and lighter and stats["revotes"] == hstats["revotes"] == 5
    note = f"tier on {tier['device']} pinned={tier['pinned']}" + (
        f" held {held} vs {hheld} B" if held else ""
    )
    return [("revote second_tier=host", note[:40], "float32", 0.0, ok)]


def op_and_inductor_rows(gen):
    """The registered ops on CUDA tensors (masks given), eagerly and under torch.compile
    (Inductor)."""
    from maskkv_compile.kernels.cached_attention import cached_attention_reference
    from maskkv_compile.kernels.mask_votes import mask_votes_reference
    from torch._inductor.utils import run_and_get_code

    rows = []
    vshape = (2, 8, 2, 600, 64, 100, 480)
    q, k, vi, pi, scale = votes_inputs(vshape, torch.bfloat16, "cuda", gen)
    masks = vote_masks(vshape[0], vshape[3], vshape[5], vshape[6], vi, "cuda", gen)
    attn_shape = (2, 8, 2, 100, 480, 64, 64)
    qa, ka, va, kept_k, kept_v, kept_len, resp_valid, row_end, _, _, _ = attention_inputs(
        attn_shape, [[480, 200], [0, 333]], torch.bfloat16, "cuda", gen, ragged_resp=True
    )
    ref_votes = mask_votes_reference(q, k, vi, pi, scale, *masks)[0]
    ref_attn = cached_attention_reference(
        qa, ka, va, kept_k, kept_v, kept_len, resp_valid, row_end, scale
    )

    def votes_fn(q, k):
        return torch.ops.maskkv.mask_votes(q, k, vi, pi, scale, 64, *masks)[0]

    def attn_fn(q, k, v):
        return torch.ops.maskkv.cached_attention(
            q, k, v, kept_k, kept_v, kept_len, resp_valid, row_end, scale
        )

    for name, fn, args, ref, tol, kernels in (
        (
            "op mask_votes",
            votes_fn,
            (q, k),
            ref_votes,
            1e-4,
            ("_row_lse_kernel", "_prompt_colsum_kernel"),
        ),
        (
            "op cached_attention",
            attn_fn,
            (qa, ka, va),
            ref_attn,
            1.6e-2,
            ("_cached_attention_kernel",),
        ),
    ):
        eager = fn(*args)
        rows.append(
            (
                name + " eager",
                "cuda",
                "bfloat16",
                (eager.float() - ref.float()).abs().max().item(),
                torch.allclose(eager.float(), ref.float(), atol=tol, rtol=tol),
            )
        )
        try:
            out, codes = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
            seen = all(name_ in "\n".join(codes) for name_ in kernels)
            err = (out.float() - ref.float()).abs().max().item()
            rows.append(
                (
                    name + " inductor",
                    "kernels in code: " + str(seen),
                    "bfloat16",
                    err,
                    seen and torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol),
                )
            )
        except Exception as exc:  # report, keep going
            rows.append(
                (
                    name + " inductor",
                    f"{type(exc).__name__}: {str(exc)[:60]}",
                    "bfloat16",
                    float("nan"),
                    False,
                )
            )
    return rows


# ---- timing ------------------------------------------------------------------------------


def bench(fn, device):
    """Milliseconds per call: CUDA do_bench (median), or the best of 2 calls on CPU."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def timing_rows(device, smoke):
    from maskkv_compile.kernels.cached_attention import cached_attention_torch
    from maskkv_compile.kernels.mask_votes import mask_votes_chunked, mask_votes_reference
    from maskkv_compile.kernels.select_kv import pad_kept, select_kv
    from maskkv_compile.kernels.triton_cached_attention import cached_attention_triton
    from maskkv_compile.kernels.triton_votes import mask_votes_triton

    b, h, hkv, d, resp = (1, 4, 2, 16, 16) if smoke else (1, 32, 8, 128, 256)
    prompts = (64, 128) if smoke else (4096, 8192, 16384, 32768)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []  # (kernel, P, triton ms, torch path ms, baseline name, baseline ms)
    for prompt in prompts:
        seq = prompt + resp
        q = torch.randn(b, h, seq, d, generator=gen, device=device).to(dtype)
        k = torch.randn(b, hkv, seq, d, generator=gen, device=device).to(dtype)
        v = torch.randn(b, hkv, seq, d, generator=gen, device=device).to(dtype)
        vi, pi, scale = (
            torch.arange(prompt, seq, device=device),
            torch.arange(prompt, device=device),
            d**-0.5,
        )
        rows.append(
            (
                "mask_votes",
                prompt,
                bench(lambda: mask_votes_triton(q, k, vi, pi, scale), device),
                bench(lambda: mask_votes_chunked(q, k, vi, pi, scale), device),
                "materialized",
                bench(lambda: mask_votes_reference(q, k, vi, pi, scale), device),
            )
        )
        masks = vote_masks(b, seq, resp, prompt, vi, device, gen)
        rows.append(
            (
                "mask_votes masked",
                prompt,
                bench(lambda: mask_votes_triton(q, k, vi, pi, scale, *masks), device),
                bench(lambda: mask_votes_chunked(q, k, vi, pi, scale, 64, *masks), device),
                "triton no masks",
                bench(lambda: mask_votes_triton(q, k, vi, pi, scale), device),
            )
        )
        qr, kr, vr = q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:]
        kept_k, kept_v = k[:, :, :prompt], v[:, :, :prompt]
        kept_len = torch.full((b, hkv), prompt, device=device)
        resp_valid = torch.ones((b, resp), dtype=torch.bool, device=device)
        row_end = torch.zeros(0, dtype=torch.long, device=device)  # no limit
        rows.append(
            (
                "cached_attention all kept",
                prompt,
                bench(
                    lambda: cached_attention_triton(
                        qr, kr, vr, kept_k, kept_v, kept_len, resp_valid, row_end, scale
                    ),
                    device,
                ),
                bench(
                    lambda: cached_attention_torch(
                        qr, kr, vr, kept_k, kept_v, kept_len, resp_valid, row_end, scale
                    ),
                    device,
                ),
                "SDPA concat",
                bench(lambda: sdpa(qr, k, v, scale=scale, enable_gqa=True), device),
            )
        )
        budgets = torch.full((b, hkv), min(256, prompt), device=device)
        votes = torch.rand(b, hkv, prompt, generator=gen, device=device)
        slots = hkv * min(256, prompt)
        flat = select_kv(k, v, votes, pi, budgets, slots)
        pos = pad_kept(*flat, int(flat[2].max()))[2]  # (B, Hkv, Kmax), as the runtime pads it
        rows.append(
            (
                "select_kv gather",
                prompt,
                bench(lambda: triton_gather(k, v, pos), device),
                bench(lambda: torch_gather(k, v, pos), device),
                "whole select_kv",
                bench(lambda: select_kv(k, v, votes, pi, budgets, slots), device),
            )
        )
    budget = min(256, prompts[0])
    kept_len = torch.tensor(
        [[budget - 7 * (i % 4) for i in range(hkv)]] * b, device=device
    )  # (B, Hkv)
    kept_k, kept_v = k[:, :, :budget], v[:, :, :budget]
    rows.append(
        (
            f"cached_attention budget {budget}",
            "-",
            bench(
                lambda: cached_attention_triton(
                    qr, kr, vr, kept_k, kept_v, kept_len, resp_valid, row_end, scale
                ),
                device,
            ),
            bench(
                lambda: cached_attention_torch(
                    qr, kr, vr, kept_k, kept_v, kept_len, resp_valid, row_end, scale
                ),
                device,
            ),
            "SDPA concat",
            bench(
                lambda: sdpa(
                    qr,
                    torch.cat([kept_k, kr], 2),
                    torch.cat([kept_v, vr], 2),
                    scale=scale,
                    enable_gqa=True,
                ),
                device,
            ),
        )
    )
    return rows, (b, h, hkv, d, resp, str(dtype)[6:])


def loop_rows(device, smoke, deadline=None, prompt_lengths=None, compiled_baseline=True):
    """The full LLaDA loop on LLaDA-shaped layers: uncached vs MaskKV vs MaskKV + dual cache
    (and the dual cache under CUDA graphs, ``mode="reduce-overhead"``), seconds per generation.
    Each run is warmed up on a short prompt first (compiles), then timed once per prompt
    length with a synchronize on both sides. A run that raises prints its error as its row.
    Rows print as they are measured; past ``deadline`` (a ``time.perf_counter()`` value) no
    further run or length is started, so a bounded lease still returns what was measured."""
    import maskkv_compile
    from maskkv_compile.bench import build_model
    from maskkv_compile.generate import generate

    layers, hidden, vocab = (1, 128, 512) if smoke else (2, 4096, 126464)
    prompts, gen_length, steps, block, budget = (
        ((64, 128), 16, 16, 4, 8) if smoke else ((4096, 8192, 16384, 32768), 256, 256, 32, 256)
    )
    prompts = tuple(prompt_lengths or prompts)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = build_model(
        "llada-shape",
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        max_positions=max(prompts) + gen_length,
    ).to(device, dtype)
    mask_id = model.config.mask_token_id
    loop = dict(mask_token_id=mask_id, gen_length=gen_length, steps=steps, block_length=block)
    backend = "eager" if smoke else "inductor"
    runs = {
        "uncached": model,
        f"MaskKV {budget}": maskkv_compile.optimize(model, budget=budget, backend=backend),
        f"MaskKV {budget} + dual cache": maskkv_compile.optimize(
            model, budget=budget, backend=backend, block_length=block
        ),
    }
    if not smoke:
        # the strongest baseline a user has without MaskKV: the uncached model under Inductor
        if compiled_baseline:
            runs["uncached, compiled"] = torch.compile(model, dynamic=True)
        runs[f"MaskKV {budget} + dual, reduce-overhead"] = torch.compile(
            model,
            backend="maskkv",
            options={
                "budget": budget,
                "block_length": block,
                "mask_token_id": mask_id,
                "mode": "reduce-overhead",
            },
        )

    def timed(runner, prompt):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate(runner, prompt, **loop)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    gen = torch.Generator().manual_seed(0)
    rows = []  # (run, P, seconds or error)
    for name, runner in runs.items():
        if deadline is not None and time.perf_counter() > deadline:
            print(f"  {name}: skipped (past --deadline-s)", flush=True)
            continue
        try:
            timed(
                runner, torch.randint(0, mask_id, (1, 64), generator=gen).to(device)
            )  # warm-up: compiles
        except Exception as error:  # noqa: BLE001 - report, go on with the other runs
            rows += [(name, p, f"{type(error).__name__}: {str(error)[:80]}") for p in prompts]
            continue
        for prompt_len in prompts:
            if deadline is not None and time.perf_counter() > deadline:
                print(f"  {name} P={prompt_len}: skipped (past --deadline-s)", flush=True)
                break
            prompt = torch.randint(0, mask_id, (1, prompt_len), generator=gen).to(device)
            try:
                rows.append((name, prompt_len, timed(runner, prompt)))
            except Exception as error:  # noqa: BLE001
                rows.append((name, prompt_len, f"{type(error).__name__}: {str(error)[:80]}"))
            print(f"  {name} P={prompt_len}: {rows[-1][2]}", flush=True)
    setup = (
        f"LLaDA-shaped, {layers} layers, hidden {hidden}, vocab {vocab}, {str(dtype)[6:]}, "
        f"gen {gen_length}, "
        f"{steps} steps, block {block}, budget {budget}, backend {backend}"
    )
    return rows, setup


def multi_gpu_check() -> int:
    """The tensor-parallel example on every GPU (up to 4), eager and Inductor; 0 ok, 1 failed,
    2 < 2 GPUs."""
    import subprocess

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        print(f"gpu_check --multi-gpu: needs more than one GPU, found {count}", file=sys.stderr)
        return 2
    ranks = max(n for n in (2, 4) if n <= count)  # the example's model has 4 heads
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    failed = 0
    for backend in ("eager", "inductor"):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "examples/tensor_parallel.py",
            "--cuda",
            "--backend",
            backend,
        ]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
        out = result.stdout
        ok = (
            result.returncode == 0
            and "same tokens on every rank: True" in out
            and "full budget + refresh every step == uncached sharded model: True" in out
        )
        failed += not ok
        print(
            f"tensor parallel, {ranks} GPUs, nccl, backend {backend}: {'ok' if ok else 'FAIL'} "
            f"({time.perf_counter() - started:.0f} s)\n{out}"
        )
        if not ok:
            print(result.stderr[-4000:], file=sys.stderr)
    return 1 if failed else 0


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return f"{transformers.__version__} ({os.path.dirname(transformers.__file__)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1"
    )
    parser.add_argument(
        "--multi-gpu", action="store_true", help="only the tensor-parallel check, one GPU per rank"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no full-loop run after this many seconds (the rest print as skipped)",
    )
    parser.add_argument(
        "--prompts", type=int, nargs="+", help="full-loop prompt lengths (default 4k..32k)"
    )
    parser.add_argument("--no-times", action="store_true", help="skip the kernel times")
    parser.add_argument(
        "--no-compiled-baseline", action="store_true", help="skip the uncached model compiled"
    )
    args = parser.parse_args()
    if args.multi_gpu:
        return multi_gpu_check()
    fail_unless_runnable(args.cpu_smoke)
    device = "cpu" if args.cpu_smoke else "cuda"
    started = time.perf_counter()
    if device == "cuda":
        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"triton {triton.__version__}, transformers {_transformers_version()}"
        )

    import traceback

    try:
        rows = check_rows(device, args.cpu_smoke)
    except Exception:  # noqa: BLE001 - a crash is a failed check; the sections after still run
        traceback.print_exc()
        rows = [("check_rows crashed", "-", "-", float("nan"), False)]
    print(f"\n{'check':<28} {'shape':<40} {'dtype':<9} {'max err':>9}  result")
    for name, shape, dtype, err, ok in rows:
        print(f"{name:<28} {shape:<40} {dtype:<9} {err:>9.2e}  {'ok' if ok else 'FAIL'}")
    failed = sum(not ok for *_, ok in rows)

    try:
        if args.no_times:
            raise RuntimeError("kernel times skipped (--no-times)")
        times, (b, h, hkv, d, resp, dtype) = timing_rows(device, args.cpu_smoke)
    except RuntimeError as skipped:
        print(skipped)
        times, (b, h, hkv, d, resp, dtype) = [], ("-",) * 6
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failed += 1
        times, (b, h, hkv, d, resp, dtype) = [], ("-",) * 6
    print(f"\ntimes in ms, B={b} H={h} Hkv={hkv} D={d} L={resp} {dtype}; speed-up = other / triton")
    print(
        f"{'kernel':<30} {'P':>6} {'triton':>9} {'torch path':>11} {'x':>6}  "
        f"{'baseline':<16} {'ms':>9} {'x':>6}"
    )
    for name, prompt, t_tri, t_torch, base, t_base in times:
        print(
            f"{name:<30} {prompt!s:>6} {t_tri:>9.3f} {t_torch:>11.3f} {t_torch / t_tri:>5.1f}x  "
            f"{base:<16} {t_base:>9.3f} {t_base / t_tri:>5.1f}x"
        )
    deadline = None if args.deadline_s is None else started + args.deadline_s
    loops, setup = loop_rows(
        device, args.cpu_smoke, deadline, args.prompts, not args.no_compiled_baseline
    )
    uncached = {p: t for name, p, t in loops if name == "uncached" and isinstance(t, float)}
    print(f"\nfull loop, seconds per generation: {setup}; speed-up = uncached / run")
    print(f"{'run':<40} {'P':>6} {'s':>9} {'x':>7}")
    for name, prompt, t in loops:
        if isinstance(t, float):
            ratio = f"{uncached[prompt] / t:>6.1f}x" if prompt in uncached else "      -"
            print(f"{name:<40} {prompt:>6} {t:>9.2f} {ratio}")
        else:
            print(f"{name:<40} {prompt:>6} {t}")
    print(f"\n{failed} of {len(rows)} checks failed; {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
