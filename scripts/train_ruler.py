"""Train the long-context diffusion LMs of the RULER-style suite (docs/ruler_models.md).

One autoregressive pretraining run, then two diffusion runs from its checkpoint:

    # 1. causal next-token pretraining on every task, context 256 -> 2048
    python scripts/train_ruler.py ar --minutes 60 --out out/ruler_ar
    # 2a. full-attention masked diffusion (LLaDA-style)
    python scripts/train_ruler.py diffusion --init out/ruler_ar/last --out out/ruler_full
    # 2b. block diffusion (block-causal attention, block 32; LLaDA2 / SDAR-style)
    python scripts/train_ruler.py diffusion --attention block --init out/ruler_ar/last \
        --out out/ruler_block
    python scripts/train_ruler.py plot --out out/ruler_full --png docs/ruler_full_curves.png

Autoregressive pretraining first is what made the project's tiny-dllm retrieve (docs/tiny_dllm.md):
an induction circuit forms under next-token training, and the diffusion stage re-routes it.
SDAR and Fast-dLLM v2 make their block-diffusion models from AR models the same way.

Data: :mod:`maskkv_compile.evaluation.ruler`, every task, uniform, seeds 0.. (evaluation uses
seeds from 10**6, the shipped suite from 7*10**6: never drawn here). Curriculum: the context
grows through ``--stages`` when the held-out score at the current length reaches
``--advance-at`` (AR: teacher-forced exact match of the answer; diffusion: exact match of the
generated answer, greedy low-confidence unmasking, uncached, averaged over tasks); 40 % of the
batches come from shorter stages already passed.

Diffusion loss (LLaDA): per row ``t ~ U(0.05, 1)``, each answer token masked with probability
``t`` (at least one), cross-entropy on the masked tokens weighted ``1/t`` (clipped at 5). With
``--attention block`` the attention is block-causal over blocks of ``--block`` tokens counted from
position 0; one block overlapping the answer is drawn per row and only its answer tokens are
masked (earlier answer blocks are clean, as they are finished at inference; later ones are
invisible to it).

Writes ``<out>/log.jsonl`` and ``<out>/last`` (``save_pretrained`` folder + ``train_state.pt``).
Writing an integer into ``<out>/threads`` changes the thread count at the next evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from _training import TrainState, llama, smoothed  # scripts/_training.py

from maskkv_compile.evaluation import ruler
from maskkv_compile.tiny_models import set_causal

EVAL_SEED = 10**6


def build_model(hidden: int, layers: int, heads: int, max_positions: int, seed: int = 0):
    return llama(ruler.VOCAB, ruler.MASK, hidden, layers, heads, max_positions, seed)


def ar_loss(model, x, answer, answer_weight: float):
    """Next-token cross-entropy: mean over every position plus ``answer_weight`` times the mean
    over the answer tokens (a few % of a sequence, and the only place retrieval is asked for).
    Returns (loss, answer CE)."""
    logits = model(x).logits[:, :-1]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    )
    answer_ce = ce[answer[:, 1:].reshape(-1)].mean()
    return ce.mean() + answer_weight * answer_ce, answer_ce.item()


def repeat_batch(gen: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences ``BOS s s s ...``: a random segment of keys and values repeated to
    ``length``; the answer is every repeat. Next-token training on these is the densest
    induction signal there is (every repeated token is predictable only by matching its
    predecessor earlier on), which retrieval and copying then reuse."""
    seg = 8 + int(torch.randint(25, (1,), generator=gen))
    pool = ruler.VALUES[-1] + 1
    base = torch.randint(pool, (rows, seg), generator=gen)
    reps = -(-(length - 1) // seg)
    x = torch.cat([torch.full((rows, 1), ruler.BOS), base.repeat(1, reps)[:, : length - 1]], 1)
    answer = torch.arange(length)[None, :].expand(rows, -1) > seg
    return x, answer


def diffusion_loss(model, x, answer, gen, block=None):
    b, n = x.shape
    t = torch.rand(b, 1, generator=gen).clamp(min=0.05)
    target = answer.clone()
    kwargs = {}
    if block is not None:  # one answer block per row; later answer tokens masked, no loss
        blk = torch.arange(n) // block
        first = (answer.float().argmax(1) // block)[:, None]
        last = blk[-1]
        pick = first + (torch.rand(b, 1, generator=gen) * (last - first + 1)).long()
        target = answer & (blk[None] == pick)
        later = answer & (blk[None] > pick)
        kwargs["attention_mask"] = ruler.block_mask(n, block)
    else:
        later = torch.zeros_like(answer)
    masked = target & (torch.rand(x.shape, generator=gen) < t)
    one = torch.where(target, torch.rand(x.shape, generator=gen), -1.0).argmax(1)
    masked[torch.arange(b), one] = True
    logits = model(torch.where(masked | later, ruler.MASK, x), **kwargs).logits
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    weight = (1.0 / t).expand_as(x)[masked].clamp(max=5.0)
    return (ce * weight).sum() / masked.sum(), ce.mean().item()


def eval_sequences(task: str, length: int, n: int) -> list[ruler.RulerSequence]:
    gen = torch.Generator().manual_seed(EVAL_SEED + 1000 * ruler.TASKS.index(task) + length)
    return [ruler.ruler_task(gen, task, length) for _ in range(n)]


@torch.no_grad()
def teacher_forced_em(model, task: str, length: int, n: int) -> float:
    """AR stage: every answer token is the argmax given the true ones before it."""
    seqs = eval_sequences(task, length, n)
    x = torch.tensor([s.ids for s in seqs])
    pred = model(x).logits[:, :-1].argmax(-1)
    ok = [bool((pred[i, s.start - 1 :] == x[i, s.start :]).all()) for i, s in enumerate(seqs)]
    return sum(ok) / n


@torch.no_grad()
def generate_answers(model, seqs, block=None) -> torch.Tensor:
    """Fill every row's answer span: one token per step, the most confident masked position
    (in the row's current block when ``block`` is set), the mask id never predicted."""
    x = torch.tensor([s.ids for s in seqs])
    n = x.shape[1]
    starts = torch.tensor([s.start for s in seqs])[:, None]
    x[torch.arange(n)[None] >= starts] = ruler.MASK
    kwargs = {"attention_mask": ruler.block_mask(n, block)} if block else {}
    lo = int(starts.min())
    for _ in range(n - lo):
        masked = x[:, lo:] == ruler.MASK
        if not masked.any():
            break
        logits = model(x, **kwargs).logits[:, lo:].float()
        logits[..., ruler.MASK] = float("-inf")
        conf, tok = logits.softmax(-1).max(-1)
        allowed = masked
        if block:
            pos = torch.arange(lo, n)[None]
            current = torch.where(masked, pos, n).min(1, keepdim=True).values // block
            allowed = masked & (pos // block == current)
        conf = torch.where(allowed, conf, -1.0)
        pick = conf.argmax(1)
        rows = masked.any(1).nonzero()[:, 0]
        x[rows, lo + pick[rows]] = tok[rows, pick[rows]]
    return x


def generated_em(model, task: str, length: int, n: int, block=None) -> float:
    seqs = eval_sequences(task, length, n)
    x = generate_answers(model, seqs, block)
    return sum(tuple(x[i, s.start :].tolist()) == s.answer for i, s in enumerate(seqs)) / n


def plot_curves(log_path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(log_path)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    pts = [(r["step"], r["answer_ce"]) for r in recs if "answer_ce" in r]
    if pts:
        steps, vals = zip(*pts)
        a.plot(steps, smoothed(vals))
    a.set_xlabel("step")
    a.set_ylabel(f"answer cross-entropy (mean of {50} batches)")
    a.set_yscale("log")
    evals = [r for r in recs if "em" in r]
    for task in ruler.TASKS:
        p = [(r["step"], r["em"][task]) for r in evals if task in r["em"]]
        if p:
            b.plot(*zip(*p), marker=".", label=task)
    for r in evals:
        if r.get("advanced"):
            b.axvline(r["step"], color="gray", lw=0.5)
            b.text(r["step"], 1.03, str(r["length"]), fontsize=7)
    b.set_xlabel("step (gray lines: context grows)")
    b.set_ylabel("held-out exact match at the current context")
    b.set_ylim(-0.02, 1.08)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=("ar", "diffusion", "plot"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", help="plot: where to write the curves")
    ap.add_argument("--init", help="diffusion: the AR checkpoint folder to start from")
    ap.add_argument("--attention", choices=("full", "block"), default="full")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per batch")
    ap.add_argument("--stages", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument(
        "--answer-weight", type=float, default=1.0, help="ar: weight of the answer tokens' mean CE"
    )
    ap.add_argument(
        "--repeat-frac",
        type=float,
        default=0.25,
        help="ar: share of rows that repeat a random segment (induction warm-up)",
    )
    ap.add_argument("--advance-at", type=float, default=0.9)
    ap.add_argument(
        "--advance-tasks",
        nargs="+",
        choices=ruler.TASKS,
        default=list(ruler.TASKS),
        help="the tasks whose mean score gates the curriculum (default: all)",
    )
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.stage == "plot":
        return plot_curves(os.path.join(args.out, "log.jsonl"), args.png)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    last = os.path.join(args.out, "last")
    max_positions = max(args.stages) + 64
    model = build_model(args.hidden, args.layers, args.heads, max_positions, args.seed)
    gen_seed = args.seed + (0 if args.stage == "ar" else 17)
    state = TrainState(model, args.lr, gen_seed=gen_seed, rng_seed=args.seed)
    if args.init:
        state.load_weights(args.init)
    if args.resume:
        step, stage = state.resume(last)
    else:
        step, stage = 0, 0
    opt, gen, rng = state.opt, state.gen, state.rng
    causal = args.stage == "ar"
    block = args.block if args.attention == "block" and not causal else None
    set_causal(model, causal)
    model.config.ruler = {"attention": "causal" if causal else args.attention, "block": block}
    model.train()

    def save() -> None:
        state.save(last, step, stage)

    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    with open(os.path.join(args.out, "log.jsonl"), "a") as log:
        while time.time() < deadline:
            state.warm_up_lr(args.lr, args.warmup, step)
            length = (
                args.stages[stage] if rng.random() < 0.6 else rng.choice(args.stages[: stage + 1])
            )
            rows = max(2, args.tokens // length)
            x, answer = ruler.batch(gen, ruler.TASKS, rows, length)
            if causal and args.repeat_frac > 0:  # induction warm-up rows (see repeat_batch)
                k = max(1, round(args.repeat_frac * rows))
                xr, ar = repeat_batch(gen, k, length)
                x, answer = torch.cat([x[k:], xr]), torch.cat([answer[k:], ar])
            if causal:
                loss, answer_ce = ar_loss(model, x, answer, args.answer_weight)
            else:
                loss, answer_ce = diffusion_loss(model, x, answer, gen, block)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            rec = {
                "step": step,
                "time": round(time.time() - t0, 1),
                "length": length,
                "loss": round(loss.item(), 4),
                "answer_ce": round(answer_ce, 4),
            }
            if step % args.eval_every == 0:
                model.eval()
                cur = args.stages[stage]
                if causal:
                    em = {t: teacher_forced_em(model, t, cur, args.eval_n) for t in ruler.TASKS}
                else:
                    em = {t: generated_em(model, t, cur, args.eval_n, block) for t in ruler.TASKS}
                model.train()
                rec = {"step": step, "time": round(time.time() - t0, 1), "length": cur, "em": em}
                gate = [em[t] for t in args.advance_tasks]
                mean = sum(gate) / len(gate)
                if mean >= args.advance_at and stage + 1 < len(args.stages):
                    stage += 1
                    rec["advanced"] = True
                save()
                print(json.dumps(rec), flush=True)
                threads = os.path.join(args.out, "threads")
                if os.path.exists(threads):
                    torch.set_num_threads(int(open(threads).read()))
            log.write(json.dumps(rec) + "\n")
            log.flush()
    save()


if __name__ == "__main__":
    main()
