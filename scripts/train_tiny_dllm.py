"""Train a tiny LLaDA-style diffusion LM on RULER-style needle retrieval (docs/tiny_dllm.md).

The shipped ``maskkv_compile/data/tiny_dllm`` is run 13 of docs/tiny_dllm.md, about 12 minutes
on a 2-core CPU (stopped by hand after 5,750 steps):

    python scripts/train_tiny_dllm.py --minutes 38 --layers 3 --ar-steps 4000 --copy-frac 0 \
        --out out/ar

``--ar-steps`` is what makes retrieval emerge: causal next-token pretraining first (as Dream
starts from an autoregressive model), then the masked-diffusion loss below. Twelve earlier runs
without it sat on a "guess among the needles" plateau. Any checkpoint this script writes plugs
into ``maskkv-compile eval --model tiny-dllm --checkpoint DIR``.

A bidirectional Llama (``is_causal=False``) learns with LLaDA's masked-diffusion objective: per
sequence ``t ~ U(0.05, 1)``, every answer token is masked with probability ``t`` (at least one
per sequence), filler tokens with probability ``filler_rate * t``, and the loss is the
cross-entropy on the masked tokens, weighted ``1/t`` (clipped at 5). Batches come from
:mod:`maskkv_compile.evaluation.needles`:

* ``needle``: needles ``key v1 v2`` in a Markov-chain filler haystack, every needle queried once;
* ``copy`` (``--copy-frac``): a random segment repeated at a random place in random tokens,
  the second copy to fill in (the induction circuit retrieval needs, in its densest form);
* ``filler`` (``--filler-warmup`` steps): the filler alone, masked, so that the attention
  learns to read neighbours before any answer is asked for;
* ``ar`` (the first ``--ar-steps`` steps): causal attention and next-token loss on needle
  sequences, before any of the above.

Curriculum: the haystack grows (``--stages``) when held-out exact match at the current length
(2 needles, greedy low-confidence unmasking, uncached) reaches ``--advance-at``.

    python scripts/train_tiny_dllm.py --minutes 30 --out out/tiny_dllm
    python scripts/train_tiny_dllm.py --minutes 30 --out out/tiny_dllm --resume   # continue
    python scripts/train_tiny_dllm.py --out out/tiny_dllm --plot docs/tiny_dllm_curves.png

Writes ``<out>/log.jsonl`` (loss per step, exact match per evaluation) and ``<out>/last``
(``save_pretrained`` folder plus ``train_state.pt``: optimizer, step, stage, generators).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from _training import TrainState, llama, smoothed  # scripts/_training.py

from maskkv_compile.evaluation import needles as task
from maskkv_compile.tiny_models import set_causal


def build_model(hidden: int, layers: int, heads: int, max_positions: int, seed: int = 0):
    model = llama(task.VOCAB, task.MASK, hidden, layers, heads, max_positions, seed)
    return set_causal(model, False)


def next_token_loss(model, x: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Autoregressive pretraining: next-token cross-entropy on every position; returns (loss,
    CE on the answer tokens)."""
    logits = model(x).logits[:, :-1]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
    )
    return ce.mean(), ce[answer[:, 1:].reshape(-1)].mean().item()


def needle_batch(
    gen: torch.Generator, size: int, haystack: int, needles: int, keys: int = len(task.KEYS)
) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` sequences querying all of their ``needles`` needles; all have the same length."""
    rows = [
        task.needle_task(gen, haystack, needles, queries=needles, keys=keys) for _ in range(size)
    ]
    x = torch.tensor([r.ids for r in rows])
    answer = torch.zeros_like(x, dtype=torch.bool)
    for i, r in enumerate(rows):
        for start, stop in r.answers:
            answer[i, start:stop] = True
    return x, answer


def diffusion_loss(
    model, x: torch.Tensor, answer: torch.Tensor, gen: torch.Generator, filler_rate: float
) -> tuple[torch.Tensor, float]:
    """LLaDA's objective on the answer tokens and, at ``filler_rate`` times the answer rate, on
    the filler (which teaches the attention to look at neighbours, as text does); returns
    (weighted loss, plain answer CE)."""
    b = x.shape[0]
    t = torch.rand(b, 1, generator=gen).clamp(min=0.05)
    r = torch.rand(x.shape, generator=gen)
    masked = answer & (r < t)
    if answer.any():
        one = torch.where(answer, torch.rand(x.shape, generator=gen), -1.0).argmax(
            1
        )  # at least one per row
        masked[torch.arange(b), one] = True
    filler = (x >= task.FILLER[0]) & (x <= task.FILLER[-1]) & ~answer
    masked |= filler & (r < filler_rate * t)
    logits = model(torch.where(masked, task.MASK, x)).logits
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    weight = (1.0 / t).expand_as(x)[masked].clamp(max=5.0)
    return (ce * weight).sum() / masked.sum(), ce[
        answer[masked] if answer.any() else masked[masked]
    ].mean().item()


@torch.no_grad()
def exact_match(
    model, haystack: int, needles: int, n: int = 64, seed: int = 10**6, keys: int = len(task.KEYS)
) -> float:
    """Held-out exact match of the last answer: greedy low-confidence unmasking, one token per
    step, uncached (the evaluation suite's loop), on sequences the training stream never draws."""
    gen = torch.Generator().manual_seed(seed + 100 * haystack + needles)
    seqs = [task.needle_task(gen, haystack, needles, keys=keys) for _ in range(n)]
    x = torch.tensor([s.ids for s in seqs])
    start, stop = seqs[0].answers[-1]
    truth = x[:, start:stop].clone()
    x[:, start:stop] = task.MASK
    was_training = model.training
    model.eval()
    rows = torch.arange(n)
    for _ in range(stop - start):
        logits = model(x).logits[:, start:stop].float()
        logits[..., task.MASK] = float("-inf")
        conf, tok = logits.softmax(-1).max(-1)
        conf = torch.where(x[:, start:stop] == task.MASK, conf, float("-inf"))
        pick = conf.argmax(1)
        x[rows, start + pick] = tok[rows, pick]
    model.train(was_training)
    return (x[:, start:stop] == truth).all(1).float().mean().item()


def plot_curves(log_path: str, png: str) -> None:
    """Answer cross-entropy (smoothed) and held-out exact match per haystack length vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(log_path)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"ar": "autoregressive pretraining", "needle": "needle task", "copy": "copy task"}
    for kind in names:
        pts = [(r["step"], r["answer_ce"]) for r in recs if r.get("task") == kind]
        if pts:
            steps, vals = zip(*pts)
            a.plot(steps, smoothed(vals), label=f"{names[kind]} (mean of 50 batches)")
    a.set_xlabel("step")
    a.set_ylabel("cross-entropy on answer tokens")
    a.set_yscale("log")
    a.legend()
    evals = [r for r in recs if "em" in r]
    for h in sorted({int(k) for r in evals for k in r["em"]}):
        pts = [(r["step"], r["em"][str(h)]) for r in evals if str(h) in r["em"]]
        b.plot(*zip(*pts), marker=".", label=f"haystack {h}")
    b.set_xlabel("step")
    b.set_ylabel("held-out exact match (2 needles, uncached)")
    b.set_ylim(-0.02, 1.02)
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30, help="wall-clock budget of this run")
    ap.add_argument("--out", default="out/tiny_dllm")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/last (optimizer and curriculum too)",
    )
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument(
        "--tokens", type=int, default=2048, help="tokens per batch (rows = tokens // length)"
    )
    ap.add_argument(
        "--copy-frac", type=float, default=0.25, help="share of batches from the copy task"
    )
    ap.add_argument(
        "--filler-rate", type=float, default=0.5, help="filler masked at this times the answer rate"
    )
    ap.add_argument(
        "--filler-warmup", type=int, default=0, help="steps on the filler alone before any answer"
    )
    ap.add_argument(
        "--ar-steps",
        type=int,
        default=0,
        help="causal next-token pretraining steps before the diffusion loss",
    )
    ap.add_argument(
        "--stages", type=int, nargs="+", default=[32, 64, 128, 256], help="haystack lengths"
    )
    ap.add_argument(
        "--advance-at", type=float, default=0.9, help="exact match that moves to the next length"
    )
    ap.add_argument("--max-needles", type=int, default=4)
    ap.add_argument(
        "--keys", type=int, default=len(task.KEYS), help="draw needle keys from this many key ids"
    )
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PNG", help="only plot <out>/log.jsonl to PNG")
    args = ap.parse_args()
    if args.plot:
        return plot_curves(os.path.join(args.out, "log.jsonl"), args.plot)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    last = os.path.join(args.out, "last")
    model = build_model(
        args.hidden,
        args.layers,
        args.heads,
        max_positions=max(1024, 2 * max(args.stages) + 64),
        seed=args.seed,
    )
    state = TrainState(model, args.lr, gen_seed=args.seed, rng_seed=args.seed)
    if args.resume:
        step, stage = state.resume(last)
    else:
        step, stage = 0, 0
    opt, gen, rng = state.opt, state.gen, state.rng
    model.train()

    def save() -> None:
        state.save(last, step, stage)

    t0 = time.time()
    deadline = t0 + 60 * args.minutes
    with open(os.path.join(args.out, "log.jsonl"), "a") as log:
        while time.time() < deadline:
            state.warm_up_lr(args.lr, args.warmup, step)
            # the current length most of the time, an earlier one otherwise (no forgetting)
            hay = args.stages[stage] if rng.random() < 0.6 else rng.choice(args.stages[: stage + 1])
            set_causal(model, step < args.ar_steps)
            if (
                step < args.ar_steps
            ):  # autoregressive pretraining first, as Dream starts from an AR model
                kind = "ar"
                x, answer = needle_batch(
                    gen,
                    max(4, args.tokens // hay),
                    hay,
                    rng.randint(1, args.max_needles),
                    args.keys,
                )
            elif (
                step < args.ar_steps + args.filler_warmup
            ):  # the filler alone first: neighbour heads before retrieval
                kind = "filler"
                x, answer = needle_batch(gen, max(4, args.tokens // hay), hay, 1)
                answer = torch.zeros_like(answer)
            elif rng.random() < args.copy_frac:
                kind = "copy"
                x, answer = task.copy_task(gen, max(4, args.tokens // hay), hay)
            else:
                kind = "needle"
                n = rng.randint(1, args.max_needles)
                x, answer = needle_batch(gen, max(4, args.tokens // hay), hay, n, args.keys)
            if kind == "ar":
                loss, answer_ce = next_token_loss(model, x, answer)
            else:
                filler_rate = {"filler": 1.0, "needle": args.filler_rate, "copy": 0.0}[kind]
                loss, answer_ce = diffusion_loss(model, x, answer, gen, filler_rate)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            rec = {
                "step": step,
                "time": round(time.time() - t0, 1),
                "task": kind,
                "haystack": hay,
                "loss": round(loss.item(), 4),
                "answer_ce": round(answer_ce, 4),
            }
            if step % args.eval_every == 0:
                set_causal(model, False)
                rec["em"] = {
                    str(h): exact_match(model, h, 2, keys=args.keys)
                    for h in args.stages[: stage + 2]
                }
                if rec["em"][str(args.stages[stage])] >= args.advance_at and stage + 1 < len(
                    args.stages
                ):
                    stage += 1
                rec["stage"] = args.stages[stage]
                save()
                print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    save()


if __name__ == "__main__":
    main()
