"""Block diffusion: MaskKV under the three loops people run, unmodified.

A LLaDA2-shaped model (random weights, ``maskkv_compile.llada2_standin``) generates block by block
on the growing window [prompt ; finished blocks ; current block] with a block-causal mask:

1. the model's own ``generate`` (LLaDA2's loop: a 4-D additive bf16 block mask), called on the
   optimized model, which runs that loop through MaskKV;
2. diffusers' ``LLaDA2Pipeline`` (a 2-D mask and position ids: the model makes the blocks);
3. an SDAR-style loop (``bench_block.block_generate``: a 4-D mask, on a Qwen3);
4. the same loop with Fast-dLLM v2's token shift (a position's logits one row earlier) on a
   Qwen2, optimized with ``family="dream"``;
5. SDAR's released loop, which keeps its own KV cache and sends only the block, with
   ``store_kv=`` saying which calls store (``maskkv_compile.sdar_standin``; ``kv_loop.py``);
6. Fast-dLLM v2's released loop (``batch_sample``): its own cache too,
   ``update_past_key_values=`` on the prefill and commits, the prefill's and each commit's last
   row read as the next block's first token (``maskkv_compile.fastdllm_standin``); then with its
   block cache on: a refresh keeps the block's K/V, a small-block call computes only its own
   rows against them (``block_refresh`` and ``block_step``), as the released model does.

At a budget above the prompt each equals the plain model token for token; at a small budget the
prefix cache keeps the entries the block's mask tokens voted for, and each new block's votes
re-select [kept prefix ; finished block] back into the budget.
"""

import torch

import maskkv_compile
from maskkv_compile.bench_block import block_generate, build_model
from maskkv_compile.fastdllm_standin import fastdllm_cached_generate, tiny_fastdllm
from maskkv_compile.llada2_standin import tiny_llada2
from maskkv_compile.sdar_standin import sdar_cached_generate, tiny_sdar
from maskkv_compile.tiny_models import tiny_dream

MASK = 255
model = tiny_llada2(block_length=8)
with torch.no_grad():
    model.lm_head.weight[MASK] = 0  # a trained dLLM never predicts the mask
prompt = torch.randint(0, 250, (1, 45), generator=torch.Generator().manual_seed(0))
settings = dict(block_length=8, steps=4, gen_length=24, mask_id=MASK)

# 1. LLaDA2's own generate, through MaskKV
optimized = maskkv_compile.optimize(model, budget=1024, backend="eager")
same = torch.equal(optimized.generate(prompt, **settings), model.generate(prompt, **settings))
print("1. own generate == plain model:", same, "|", optimized.cache_stats()["transitions"])

# 2. diffusers' LLaDA2Pipeline, unmodified
try:
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
except ImportError:
    print("2. diffusers is not installed: skipped")
else:

    def pipeline(net):
        pipe = LLaDA2Pipeline(model=net, scheduler=BlockRefinementScheduler())
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            input_ids=prompt,
            use_chat_template=False,
            gen_length=24,
            block_length=8,
            num_inference_steps=4,
            temperature=0.0,
            mask_token_id=MASK,
            output_type="seq",
        )
        return out.sequences

    optimized.reset()
    same = torch.equal(pipeline(optimized), pipeline(model))
    print("2. LLaDA2Pipeline == plain model:", same, "|", optimized.cache_stats()["transitions"])

# 3. an SDAR-style loop on a Qwen3, at a small budget
qwen = build_model(layers=2, hidden=256, vocab=1024, max_positions=512)
long_prompt = torch.randint(0, 250, (1, 200), generator=torch.Generator().manual_seed(1))
small = maskkv_compile.optimize(qwen, budget=32, backend="eager")
out = block_generate(small, long_prompt, gen_length=32, block_length=16, steps=4)
stats = small.cache_stats()
print(
    "3. SDAR-style loop at budget 32:",
    stats["transitions"],
    "| masks left:",
    int((out == MASK).sum()),
)
kept = stats["layers"][0]["kept_per_kv_head"]
print(f"   layer 0 keeps {kept} per KV head of {stats['prompt_len']} prefix entries:")
print(
    "   the budget, re-selected at each growth by the new block's votes over",
    f"[kept ; finished block] ({stats['reselects']} re-selections)",
)

# 4. Fast-dLLM v2's token shift on a Qwen2: the row before the block predicts its first token
qwen2 = tiny_dream()  # float32, the dtype of the loop's block mask
with torch.no_grad():
    qwen2.lm_head.weight[MASK] = 0
shifted = dict(gen_length=24, block_length=8, steps=4, shift=1)
exact = maskkv_compile.optimize(qwen2, budget=1024, backend="eager", family="dream")
same = torch.equal(
    block_generate(exact, prompt, **shifted), block_generate(qwen2, prompt, **shifted)
)
print("4. token-shift loop == plain model:", same, "|", exact.cache_stats()["transitions"])

# 5. SDAR's released loop: its own KV cache, only the block sent, store_kv= on prefill and commits
sdar = tiny_sdar()
with torch.no_grad():
    sdar.lm_head.weight[MASK] = 0
cached = dict(gen_length=32, block_length=16, steps=4, mask_id=MASK)
exact = maskkv_compile.optimize(sdar, budget=1024, backend="eager")
same = torch.equal(
    sdar_cached_generate(exact, long_prompt, **cached),
    sdar_cached_generate(sdar, long_prompt, **cached),
)
print("5. SDAR's cached loop == plain model:", same, "|", exact.cache_stats()["transitions"])
evicting = maskkv_compile.optimize(sdar, budget=32, backend="eager")
out = sdar_cached_generate(evicting, long_prompt, **cached)
kept = evicting.cache_stats()["layers"][0]["kept_per_kv_head"]
print("   at budget 32: layer 0 keeps", kept, "per KV head | masks left:", int((out == MASK).sum()))

# 6. Fast-dLLM v2's released loop: its own cache, update_past_key_values= on prefill and commits
fast = tiny_fastdllm()
with torch.no_grad():
    fast.lm_head.weight[MASK] = 0
loop = dict(block_size=16, max_new_tokens=32, small_block_size=8, mask_id=MASK)
exact = maskkv_compile.optimize(fast, budget=1024, backend="eager", family="dream")
same = torch.equal(
    fastdllm_cached_generate(exact, long_prompt, **loop),
    fastdllm_cached_generate(fast, long_prompt, **loop),
)
print(
    "6. Fast-dLLM v2's cached loop == plain model:", same, "|", exact.cache_stats()["transitions"]
)
exact.reset()
same = torch.equal(
    fastdllm_cached_generate(exact, long_prompt, use_block_cache=True, **loop),
    fastdllm_cached_generate(fast, long_prompt, use_block_cache=True, **loop),
)
print("   with its block cache == plain model:", same, "|", exact.cache_stats()["transitions"])
evicting = maskkv_compile.optimize(fast, budget=32, backend="eager", family="dream")
out = fastdllm_cached_generate(evicting, long_prompt, use_block_cache=True, **loop)
kept = evicting.cache_stats()["layers"][0]["kept_per_kv_head"]
print("   at budget 32: layer 0 keeps", kept, "per KV head | masks left:", int((out == MASK).sum()))
