"""Train a tiny LLaDA-style diffusion LM on RULER-style needle retrieval (see docs/tiny_dllm.md).

A 4-layer bidirectional Llama (``is_causal=False``) learns RULER-style needle retrieval with the
masked-diffusion objective of LLaDA: per sequence ``t ~ U(0, 1)``, every answer token is masked
with probability ``t`` (at least one), prompt tokens with probability ``prompt_rate * t``; the
loss is the cross-entropy on the masked positions (weighted 1/t on answer tokens as in LLaDA,
clipped). Curriculum: the haystack length grows when the held-out exact match at the current
length is high enough. Task generator: :func:`needle_task` below (seeded).

Status: retrieval did NOT emerge within the time box (see docs/tiny_dllm.md); no checkpoint ships.

    python scripts/train_tiny_dllm.py --minutes 20 --out out/tiny_dllm

Writes ``<out>/log.jsonl`` (loss, exact match per step), ``<out>/last`` and ``<out>/best``
(``save_pretrained`` folders; best = highest exact match at the longest haystack reached).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Optional

import torch
import torch.nn.functional as F

# Vocabulary of the tiny diffusion LM, for a RULER-style
# needle-in-a-haystack task: a haystack of filler tokens with ``needles`` needles
# ``KEY V1 V2`` at random depths, then ``SEP`` and query groups ``QUERY KEY V1 V2``.
# The answer (V1 V2 of the last group) is the masked span.
DLLM_KEYS = 24          # ids 0..23
DLLM_VALUES = 24        # ids 24..47
DLLM_FILLER = range(48, 58)
DLLM_BOS, DLLM_SEP, DLLM_QUERY = 58, 59, 60
DLLM_VOCAB = 64
DLLM_MASK = DLLM_VOCAB - 1
DLLM_VALUE_LEN = 2


def needle_task(gen: torch.Generator, haystack: int, needles: int, queries: int = 1,
                depth: Optional[float] = None) -> tuple[list[int], list[tuple[int, int]]]:
    """One sequence: ``BOS haystack SEP (QUERY key v1 v2)*queries``; returns the ids and the
    ``[start, stop)`` of every answer. ``haystack`` counts all tokens between BOS and SEP (needles
    included). ``depth`` in [0, 1] puts the first needle (the one the last query asks for) at
    that relative depth; otherwise every needle goes to a random depth."""
    if not 1 <= queries <= needles:
        raise ValueError(f"need 1 <= queries <= needles, got {queries} queries, {needles} needles")
    def randint(n):
        return int(torch.randint(n, (1,), generator=gen))

    keys = torch.randperm(DLLM_KEYS, generator=gen)[:needles].tolist()
    values = [[DLLM_KEYS + randint(DLLM_VALUES) for _ in range(DLLM_VALUE_LEN)] for _ in keys]
    width = 1 + DLLM_VALUE_LEN
    n_filler = haystack - width * needles
    if n_filler < 0:
        raise ValueError(f"haystack {haystack} too short for {needles} needles")
    filler = (torch.randint(len(DLLM_FILLER), (n_filler,), generator=gen) + DLLM_FILLER[0]).tolist()
    # insertion points into the filler, one per needle (sorted; equal points keep needle order)
    points = [randint(n_filler + 1) for _ in keys]
    if depth is not None:
        points[0] = round(depth * n_filler)
    order = sorted(range(len(keys)), key=lambda i: (points[i], i))
    body, prev = [], 0
    for i in order:
        body += filler[prev:points[i]] + [keys[i]] + values[i]
        prev = points[i]
    body += filler[prev:]
    ids = [DLLM_BOS] + body + [DLLM_SEP]
    # queries: the last one asks for needle 0, the others for other needles (distinct, so that
    # no answer is given away by another query; at most ``needles`` queries)
    asked = (torch.randperm(needles - 1, generator=gen) + 1).tolist()[:queries - 1] + [0]
    answers = []
    for i in asked:
        ids += [DLLM_QUERY, keys[i]]
        answers.append((len(ids), len(ids) + DLLM_VALUE_LEN))
        ids += values[i]
    return ids, answers


STAGES = (32, 64, 128, 256)  # haystack lengths of the curriculum


def build_model(hidden=160, layers=4, heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=DLLM_VOCAB, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, mask_token_id=DLLM_MASK, attn_implementation="sdpa",
                         tie_word_embeddings=False, rope_theta=10000.0)
    config.is_causal = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def batch(gen, size, haystack, needles, queries):
    """(x, answer-mask) of ``size`` sequences of one length (the haystack is fixed per batch)."""
    rows, ans = [], []
    n = needles if isinstance(needles, int) else int(torch.randint(needles[0], needles[1] + 1, (1,), generator=gen))
    q = n if queries is None else min(queries, n)
    for _ in range(size):
        ids, answers = needle_task(gen, haystack, n, q)
        rows.append(ids)
        a = torch.zeros(len(ids), dtype=torch.bool)
        for s, e in answers:
            a[s:e] = True
        ans.append(a)
    width = max(len(r) for r in rows)
    x = torch.full((size, width), DLLM_MASK, dtype=torch.long)
    is_ans = torch.zeros((size, width), dtype=torch.bool)
    valid = torch.zeros((size, width), dtype=torch.bool)
    for i, (r, a) in enumerate(zip(rows, ans)):
        # right-align so that every sequence ends with its answer (lengths differ by the query groups);
        # left padding is the mask token and is excluded from the loss
        x[i, width - len(r):] = torch.tensor(r)
        is_ans[i, width - len(r):] = a
        valid[i, width - len(r):] = True
    return x, is_ans, valid


def diffusion_loss(model, x, is_ans, valid, gen, prompt_rate=0.1, weight=True):
    b = x.shape[0]
    t = torch.rand(b, 1, generator=gen).clamp(min=0.05)
    r = torch.rand(x.shape, generator=gen)
    masked = is_ans & (r < t)
    # at least one answer token masked per sequence
    first = torch.where(is_ans, torch.rand(x.shape, generator=gen), -1.0).argmax(1)
    masked[torch.arange(b), first] = True
    masked |= (~is_ans) & valid & (r < prompt_rate * t)
    inp = torch.where(masked, DLLM_MASK, x)
    logits = model(inp).logits
    ce = F.cross_entropy(logits[masked], x[masked], reduction="none")
    w = torch.where(is_ans, 1.0 / t if weight else 1.0, 1.0).expand_as(x)[masked].clamp(max=5.0)
    ans_tokens = is_ans[masked]
    return (ce * w).sum() / masked.sum(), ce[ans_tokens].mean().item()


@torch.no_grad()
def exact_match(model, haystack, needles, n=64, seed=10**6, depth=None):
    """Held-out exact match of the last answer (greedy unmasking, one token per step, uncached)."""
    gen = torch.Generator().manual_seed(seed + haystack * 100 + needles)
    model.eval()
    seqs = [needle_task(gen, haystack, needles, 1, depth=depth) for _ in range(n)]
    x = torch.tensor([s[0] for s in seqs])
    start, stop = seqs[0][1][-1]
    truth = x[:, start:stop].clone()
    x[:, start:stop] = DLLM_MASK
    for _ in range(stop - start):
        logits = model(x).logits[:, start:stop].float()
        logits[..., DLLM_MASK] = float("-inf")
        conf, tok = torch.softmax(logits, -1).max(-1)
        still = x[:, start:stop] == DLLM_MASK
        conf = torch.where(still, conf, float("-inf"))
        pick = conf.argmax(1)
        rows = torch.arange(n)
        x[rows, start + pick] = tok[rows, pick]
    model.train()
    return (x[:, start:stop] == truth).all(1).float().mean().item()


def plot_curves(log_path, png):
    """Loss / answer cross-entropy (smoothed) and held-out exact match vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in open(log_path)]
    steps = [r["step"] for r in recs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "answer_ce"):
        vals = [r[key] for r in recs]
        k = 50
        smooth = [sum(vals[max(0, i - k):i + 1]) / len(vals[max(0, i - k):i + 1]) for i in range(len(vals))]
        a.plot(steps, smooth, label=f"{key} (mean of 50 steps)")
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend()
    a.set_title("masked-diffusion loss")
    evals = [r for r in recs if any(k.startswith("em_") for k in r)]
    for h in STAGES:
        pts = [(r["step"], r[f"em_{h}"]) for r in evals if f"em_{h}" in r]
        if pts:
            b.plot(*zip(*pts), marker=".", label=f"haystack {h}")
    b.set_xlabel("step")
    b.set_ylabel("exact match (2 needles, held out, uncached)")
    b.set_ylim(-0.02, 1.02)
    b.legend()
    b.set_title("held-out retrieval")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--out", default="out/tiny_dllm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--value-len", type=int, default=DLLM_VALUE_LEN, help="tokens per needle value (the answer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--advance-at", type=float, default=0.85, help="exact match that moves to the next length")
    ap.add_argument("--max-needles", type=int, default=6)
    ap.add_argument("--min-needles", type=int, default=1)
    ap.add_argument("--prompt-rate", type=float, default=0.1, help="prompt tokens masked with prob prompt_rate * t")
    ap.add_argument("--no-weight", action="store_true", help="no 1/t weight on answer tokens")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--init", help="continue from this save_pretrained folder (optimizer state restarts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", metavar="PNG", help="only plot <out>/log.jsonl to PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.plot:
        return plot_curves(os.path.join(args.out, "log.jsonl"), args.plot)
    os.makedirs(args.out, exist_ok=True)
    globals()["DLLM_VALUE_LEN"] = args.value_len  # read by needle_task
    model = build_model(args.hidden, args.layers, args.heads, seed=args.seed)
    if args.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(os.path.join(args.init, "model.safetensors")), strict=False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    stage, best, step, t0 = 0, -1.0, 0, time.time()
    deadline = t0 + 60 * args.minutes
    log = open(os.path.join(args.out, "log.jsonl"), "a")
    warmup = args.warmup
    while time.time() < deadline:
        lr = args.lr * min(1.0, (step + 1) / warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        # lengths up to the current stage, biased to the current one
        hay = STAGES[stage] if rng.random() < 0.6 else rng.choice(STAGES[:stage + 1])
        bsz = max(8, args.batch * 64 // max(64, hay))  # roughly constant tokens per step
        x, is_ans, valid = batch(gen, bsz, hay, (args.min_needles, args.max_needles), None)
        loss, ans_ce = diffusion_loss(model, x, is_ans, valid, gen, args.prompt_rate, not args.no_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        rec = {"step": step, "time": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
               "answer_ce": round(ans_ce, 4), "haystack": hay, "stage": STAGES[stage]}
        if step % args.eval_every == 0:
            em = {f"em_{h}": exact_match(model, h, 2, n=64) for h in STAGES[:stage + 2] if h <= 256}
            rec.update(em)
            cur = em[f"em_{STAGES[stage]}"]
            score = STAGES[stage] * 10 + cur  # longer haystack first, then exact match
            if score > best:
                best = score
                model.save_pretrained(os.path.join(args.out, "best"))
            model.save_pretrained(os.path.join(args.out, "last"))
            if cur >= args.advance_at and stage + 1 < len(STAGES):
                stage += 1
            print(json.dumps(rec), flush=True)
        elif step % 20 == 0:
            print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    model.save_pretrained(os.path.join(args.out, "last"))


if __name__ == "__main__":
    main()
