"""What the drop-in contract's (B, S, V) logits cost at a real vocabulary, and the ways out.

An unmodified loop calls ``model(x).logits`` and gets (B, S, V) logits, zeros in the prompt
rows. At LLaDA's vocabulary (126,464) and an 8k prompt that is a 4 GB fp32 tensor, allocated
and zeroed every step, while the step itself computes only the response rows. This times one
MaskKV step (a 2-layer model with LLaDA's vocabulary, so that the step's own work is small
and the output handling shows) four ways, side by side in one process:

  * drop-in (B, S, V), a new zeroed tensor per call (the default);
  * drop-in (B, S, V) with ``reuse_logits=True`` (one buffer per prompt, only computed rows
    rewritten);
  * ``response_logits_only()``: (B, R, V);
  * and, for scale, what LLaDA's own loop does with (B, S, V) logits after the call
    (softmax, argmax, gather of the confidences), which no option of ours can remove.

    python benchmarks/bench_dropin_logits.py [--prompt-len 8192] [--gen-length 64] [--vocab 126464]

Median of ``--repeats`` steps after one warm-up step; peak RSS above the level before each run.
"""

import argparse
import statistics
import time

import torch

import maskkv_compile
from maskkv_compile.measure import human_bytes, measure, table
from maskkv_compile.tiny_models import tiny_llada

parser = argparse.ArgumentParser()
parser.add_argument("--prompt-len", type=int, default=8192)
parser.add_argument("--gen-length", type=int, default=64)
parser.add_argument("--vocab", type=int, default=126464)
parser.add_argument("--budget", type=int, default=256)
parser.add_argument("--repeats", type=int, default=9)
parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
args = parser.parse_args()

dtype = getattr(torch, args.dtype)
model = tiny_llada(
    layers=2,
    hidden=64,
    heads=1,
    vocab=args.vocab,
    max_positions=args.prompt_len + args.gen_length,
    dtype=dtype,
)
mask_id = model.config.mask_token_id
with torch.no_grad():
    model.lm_head.weight[mask_id] = 0  # a trained dLLM never predicts the mask id
prompt = torch.randint(0, mask_id, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
x = torch.cat([prompt, torch.full((1, args.gen_length), mask_id)], dim=1)


def llada_consumer(logits):
    """What LLaDA's loop does with the logits of one step (temperature 0)."""
    x0 = logits.argmax(-1)
    p = torch.softmax(logits.float(), dim=-1)
    return torch.gather(p, -1, x0[..., None]).squeeze(-1)


def timed_steps(optimized, response_only=False, consume=False):
    optimized.reset()
    times = []
    with measure() as m:
        for step in range(args.repeats + 2):  # the prefill, one warm-up step, then the timed steps
            start = time.perf_counter()
            with torch.no_grad():
                if response_only:
                    with maskkv_compile.response_logits_only():
                        logits = optimized(x).logits
                else:
                    logits = optimized(x).logits
                if consume:
                    llada_consumer(logits)
            if step >= 2:
                times.append(time.perf_counter() - start)
            del logits
    assert optimized.runtime.counts.steps == args.repeats + 1, "the step graph did not run"
    return statistics.median(times), m.peak_rss_delta


fresh = maskkv_compile.optimize(model, budget=args.budget, backend="eager")
reused = maskkv_compile.optimize(
    model,
    budget=args.budget,
    backend="eager",
    config=maskkv_compile.MaskKVConfig(reuse_logits=True),
)
runs = {
    "response_logits_only(): (B, R, V)": timed_steps(fresh, response_only=True),
    "drop-in (B, S, V), new tensor per call": timed_steps(fresh),
    "drop-in (B, S, V), reuse_logits=True": timed_steps(reused),
    "drop-in + LLaDA's own use of the logits": timed_steps(fresh, consume=True),
    "reuse_logits + LLaDA's own use of the logits": timed_steps(reused, consume=True),
}
base = runs["response_logits_only(): (B, R, V)"][0]
full_bytes = x.numel() * args.vocab * torch.finfo(dtype).bits // 8
print(
    f"vocab {args.vocab}, prompt {args.prompt_len}, response {args.gen_length}, {args.dtype}, "
    f"budget {args.budget}; one (B, S, V) logits tensor = {human_bytes(full_bytes)}; "
    f"{torch.get_num_threads()} threads"
)
print(
    table(
        [
            [name, f"{t * 1e3:.1f} ms", f"{t / base:.1f}x", human_bytes(peak)]
            for name, (t, peak) in runs.items()
        ],
        headers=["one step", "median", "vs response-only", "peak RSS"],
    )
)
