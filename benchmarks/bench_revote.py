"""What re-selection (``revote``) costs per step, against one-shot MaskKV and prompt refresh.

Every configuration runs the same generation (a prefill, then ``--gen-length - 1`` step calls,
each committing the leftmost mask with a fixed token, so every configuration does the same
work) ``--repeats`` times, round-robin over the configurations so that load on a shared CPU
drifts over all of them alike. Printed side by side from one run: median prefill ms, mean
step ms over the generation's step calls (re-vote steps included), tokens/s over the whole
generation, the step cost relative to one-shot MaskKV at the same budget, and for each re-vote
interval k how many times cheaper its step is than ``prompt_refresh=k`` (when both ran).
With ``--gen-length`` = 1 + a multiple of every interval, each interval fires exactly
(step calls / k) times, so the mean is the cost averaged over a whole generation.

    python benchmarks/bench_revote.py --model tiny-dllm --budget 13 --revote 1 4 8 --refresh 1 4 8
    python benchmarks/bench_revote.py --model tiny-dllm --haystack 1000 --budget 50 \
        --revote 1 4 8 --refresh 1 4 8
    python benchmarks/bench_revote.py --model llama --prompt-len 2048 --layers 4 --hidden 256 \
        --budget 102 --revote 1 4 8 --refresh 1 4 8 --repeats 3
    python benchmarks/bench_revote.py --model llada-shape --prompt-len 2048 --layers 1 \
        --hidden 4096 --budget 102 --revote 1 4 --refresh 4 --repeats 1 --no-baselines
"""

import argparse
import statistics
import time

import torch

import maskkv_compile
from maskkv_compile.measure import table

parser = argparse.ArgumentParser()
parser.add_argument(
    "--model",
    choices=["tiny-dllm", "llama", "llada-shape"],
    default="tiny-dllm",
    help="llada-shape: maskkv-compile bench's preset (head dim 128, MLP 3 x hidden, vocab 126464)",
)
parser.add_argument("--prompt-len", type=int, default=256, help="llama and llada-shape")
parser.add_argument(
    "--haystack",
    type=int,
    default=None,
    help="tiny-dllm only: a one-needle haystack of this many tokens (default: the suite's "
    "256-token sample; the model has 1024 positions)",
)
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--hidden", type=int, default=256)
parser.add_argument(
    "--gen-length", type=int, default=17, help="a prefill, then gen-length - 1 step calls"
)
parser.add_argument("--budget", type=int, nargs="+", default=[13, 26])
parser.add_argument("--policy", default="maskkv")
parser.add_argument("--revote", type=int, nargs="+", default=[1, 4])
parser.add_argument("--refresh", type=int, nargs="+", default=[1, 4])
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--backend", choices=["eager", "inductor"], default="eager")
parser.add_argument(
    "--baselines",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also time the uncached model and the full cache (--no-baselines at sizes where the "
    "uncached loop takes minutes)",
)
args = parser.parse_args()
torch.manual_seed(0)

if args.model == "tiny-dllm":
    from maskkv_compile.evaluation.models import load_bundle
    from maskkv_compile.evaluation.needles import needle_task

    bundle = load_bundle("tiny-dllm", 1, ["single"])
    model, mask_id, sample = bundle.model, bundle.mask_id, bundle.samples[0]
    if args.haystack is None:
        prompt = torch.tensor([sample.ids[: sample.start]])
    else:  # the same task on a longer haystack: BOS haystack SEP QUERY key, then the masked value
        task = needle_task(torch.Generator().manual_seed(0), args.haystack, needles=1)
        prompt = torch.tensor([task.ids[: task.answers[0][0]]])
    profile = maskkv_compile.calibrate(
        model,
        bundle.calibration,
        gen_length=bundle.calibration_gen_length,
        mask_token_id=mask_id,
        progress=False,
    )
elif args.model == "llada-shape":
    from maskkv_compile.bench import build_model

    model = build_model(
        "llada-shape",
        layers=args.layers,
        hidden=args.hidden,
        vocab=126464,
        max_positions=args.prompt_len + args.gen_length + 16,
    )  # its mask row zeroed
    mask_id = model.config.mask_token_id
    prompt = torch.randint(0, mask_id, (1, args.prompt_len))
    profile = None
else:
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(
        layers=args.layers, hidden=args.hidden, heads=max(args.hidden // 64, 1), vocab=512
    )
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        model.lm_head.weight[mask_id] = (
            0  # random weights may predict the mask id; a trained dLLM never does
        )
    prompt = torch.randint(0, mask_id, (1, args.prompt_len))
    profile = None
x0 = torch.cat([prompt, torch.full((1, args.gen_length), mask_id)], dim=1)
fill = 1 if mask_id != 1 else 2  # the token every configuration commits

configs = (
    {"uncached": None, "full cache": dict(budget=1 << 16, policy="mask_voting_uniform")}
    if args.baselines
    else {}
)
for b in args.budget:
    configs[f"B={b} one-shot"] = dict(budget=b, policy=args.policy)
    configs.update(
        {f"B={b} revote {k}": dict(budget=b, policy=args.policy, revote=k) for k in args.revote}
    )
    configs.update(
        {
            f"B={b} refresh {k}": dict(budget=b, policy=args.policy, prompt_refresh=k)
            for k in args.refresh
        }
    )
nets = {}
for name, options in configs.items():
    if options is None:
        nets[name] = model
        continue
    prof = profile if options["policy"] in ("maskkv", "squeezeattention") else None
    nets[name] = maskkv_compile.optimize(
        model, mask_token_id=mask_id, backend=args.backend, profile=prof, **options
    )


@torch.no_grad()
def generate(net):
    """(prefill seconds, [step seconds]) of one generation."""
    if hasattr(net, "reset"):
        net.reset()
    x, times = x0.clone(), []
    for _ in range(args.gen_length):
        t0 = time.perf_counter()
        _ = net(x).logits
        times.append(time.perf_counter() - t0)
        x[0, int((x[0] == mask_id).nonzero()[0, 0])] = fill
    return times[0], times[1:]


for net in nets.values():  # warm-up: traces and compiles
    generate(net)
prefill = {name: [] for name in nets}
steps = {name: [] for name in nets}
for _ in range(args.repeats):
    for name, net in nets.items():
        p, s = generate(net)
        prefill[name].append(p)
        steps[name].append(sum(s) / len(s))
counts = {name: net.cache_stats() for name, net in nets.items() if hasattr(net, "cache_stats")}

rows = []
for name in nets:
    step_ms = 1e3 * statistics.median(steps[name])
    budget = name.split()[0]
    base = f"{budget} one-shot"
    rel = step_ms / (1e3 * statistics.median(steps[base])) if base in steps else None
    total = statistics.median(prefill[name]) + step_ms / 1e3 * (args.gen_length - 1)
    stats = counts.get(name, {})
    tier = (stats.get("second_tier") or {}).get("bytes", 0)
    refresh = name.replace(" revote ", " refresh ")
    cheaper = (
        statistics.median(steps[refresh]) / statistics.median(steps[name])
        if " revote " in name and refresh in steps
        else None
    )
    rows.append(
        [
            name,
            f"{1e3 * statistics.median(prefill[name]):.1f}",
            f"{step_ms:.2f}",
            "" if rel is None else f"{rel:.2f}x",
            "" if cheaper is None else f"{cheaper:.2f}x",
            f"{args.gen_length / total:.1f}",
            stats.get("revotes", ""),
            stats.get("bytes", ""),
            tier or "",
        ]
    )
print(
    f"{args.model}: prompt {prompt.shape[1]}, {args.gen_length} tokens in {args.gen_length} calls, "
    f"policy {args.policy}, backend {args.backend}, median of {args.repeats} round-robin repeats"
)
print(
    table(
        rows,
        [
            "configuration",
            "prefill ms",
            "step ms (mean over the generation)",
            "step vs one-shot",
            "refresh k / revote k",
            "tokens/s",
            "re-votes (last generation)",
            "hot cache bytes",
            "second tier bytes",
        ],
    )
)
