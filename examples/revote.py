"""Re-selection while decoding (``revote``) on the project's trained retrieval dLLM.

tiny-dllm (``maskkv_compile/data/tiny_dllm``, trained by ``scripts/train_tiny_dllm.py``) reads a
256-token haystack of key -> value needles and fills the value of a queried key, one token
per step, through the unmodified drop-in loop (``model(x).logits``). At a budget of 5% of the
prompt, one-shot Mask-Voting keeps what the step-0 queries attend to, which is not always
what the second value token needs; ``revote=1`` lets every step's own queries re-select the
kept entries from the second tier (the full prompt K/V kept at the prefill), without
recomputing any prompt row. Prints exact-match retrieval for the uncached model, one-shot
MaskKV and re-voting MaskKV, and the routing counts that prove which path ran.

    python examples/revote.py               # about 30 s on a 2-core CPU
    python examples/revote.py --samples 16 --budget 26
"""

import argparse

import torch

import maskkv_compile
from maskkv_compile.evaluation import load_bundle
from maskkv_compile.evaluation.suite import infill


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="haystacks per task")
    parser.add_argument(
        "--budget", type=int, default=13, help="kept prompt entries per KV head per layer"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle("tiny-dllm", samples=args.samples)
    model, mask_id = bundle.model, bundle.model.config.mask_token_id
    prompt_len = bundle.samples[0].prompt_len
    print(
        f"tiny-dllm, {len(bundle.samples)} haystacks, prompt {prompt_len} tokens, "
        f"budget {args.budget} "
        f"({100 * args.budget / prompt_len:.0f}% of the prompt)"
    )
    runs = {
        "uncached": model,
        "MaskKV, one-shot votes": maskkv_compile.optimize(
            model, budget=args.budget, backend="eager"
        ),
        "MaskKV, revote=1": maskkv_compile.optimize(
            model, budget=args.budget, backend="eager", revote=1
        ),
    }
    for name, net in runs.items():
        hits, revotes, steps = 0, 0, 0
        for sample in bundle.samples:
            if net is not model:
                net.reset()  # one prompt per generation; counts per sample
            filled, _, _ = infill(net, sample, mask_id)
            hits += filled == sample.truth()
            if net is not model:
                stats = net.cache_stats()
                assert stats["prompt_len"] > 0 and stats["prefills"] == 1, (
                    stats
                )  # cached: one prefill, then steps
                revotes, steps = revotes + stats["revotes"], steps + stats["steps"]
        counts = "" if net is model else f"   ({steps} steps, {revotes} of them re-votes)"
        print(f"{name:<24} exact match {hits}/{len(bundle.samples)}{counts}")


if __name__ == "__main__":
    main()
