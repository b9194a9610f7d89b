"""DiffusionGemma: MaskKV on the encoder cache, under transformers' own ``generate``.

A random-weight DiffusionGemma (transformers' own class, a tiny config with one sliding and one
full-attention layer, 4 experts, canvas 16) generates two canvases:

1. At a budget above the cache length the optimized model's ``generate`` gives the plain
   model's tokens, with the prompt's prefill in chunks of 16 tokens (``prefill_chunk``; the
   default 1024 is for long prompts), and every encoder call stopped once the last layer wrote
   the cache (``generate`` reads nothing else of it).
2. At budget 8, the first decoder call of each canvas votes with the canvas queries, and the
   full-attention layer of the cache ``generate`` returns holds 8 entries per KV head.
3. diffusers' ``DiffusionGemmaPipeline`` is tried on the plain model. Its processor here is
   a minimal byte tokenizer with a chat template, since no real one ships offline.
4. A model with three full-attention layers gets a layer profile from ``calibrate`` (measured on
   the voting canvas), and MaskKV splits its budget over those layers by it.
"""

import torch

import maskkv_compile
from maskkv_compile.tiny_models import tiny_diffusion_gemma

model = tiny_diffusion_gemma(dtype=torch.float64)
prompt = torch.randint(3, 120, (1, 48), generator=torch.Generator().manual_seed(0))


def generate(net, **kwargs):
    torch.manual_seed(0)  # the starting canvas is drawn from torch's RNG
    return net.generate(prompt, max_new_tokens=32, max_denoising_steps=4, **kwargs)


# 1. exact at full budget
plain = generate(model).sequences
full = maskkv_compile.optimize(model, budget=4096, prefill_chunk=16)
same = torch.equal(generate(full).sequences, plain)
stats = full.cache_stats()
stopped = f"{stats['cache_only_encoder_calls']} of {stats['encoder_calls']}"
print(
    f"1. full budget, prefill in {stats['prefill_chunks']} chunks, {stopped} encoder calls "
    f"stopped once the cache was written == plain model: {same}"
)

# 2. budget 8: canvas votes, eviction in the user's cache
small = maskkv_compile.optimize(model, budget=8)
out = generate(small)
stats = small.cache_stats()
(layer,) = stats["layers"]
kept = out.cache.layers[layer["layer"]].keys.shape[-2]
print(
    f"2. budget 8: {stats['votes']} votes, {stats['encoder_calls']} encoder calls, "
    f"{stats['decoder_calls']} decoder calls; full layer {layer['layer']} keeps {kept} of "
    f"{stats['seen']} entries per KV head, at positions {layer['positions'][0][0]}"
)


# 3. diffusers' pipeline (0.42.1)
class ByteProcessor:
    """Bytes 3..122 as token ids: enough of a processor for the pipeline's calls."""

    def apply_chat_template(self, messages, **kwargs):
        text = " ".join(part["text"] for m in messages for part in m["content"] if "text" in part)
        ids = torch.tensor([[2] + [3 + b % 118 for b in text.encode()]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, sequences, **kwargs):
        return [" ".join(map(str, s.tolist())) for s in sequences]


try:
    from diffusers import DiffusionGemmaPipeline, EntropyBoundScheduler

    pipe = DiffusionGemmaPipeline(model, EntropyBoundScheduler(), ByteProcessor())
    pipe(prompt="a short prompt", gen_length=16, num_inference_steps=4, output_type="seq")
    print("3. DiffusionGemmaPipeline ran")
except ImportError as error:
    print(f"3. diffusers not installed: {error}")
except TypeError as error:
    print(f"3. DiffusionGemmaPipeline fails on the plain model: TypeError: {error}")


# 4. a layer profile over three full-attention layers
from maskkv_compile.policies import MaskKV  # noqa: E402

kinds = ["sliding_attention"] + ["full_attention"] * 3
deep = tiny_diffusion_gemma(dtype=torch.float64, layers=4, layer_types=kinds)
long_prompt = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(3))
profile = maskkv_compile.calibrate(deep, [long_prompt])
profiled = maskkv_compile.optimize(deep, budget=40, policy=MaskKV(profile=profile))
torch.manual_seed(0)
profiled.generate(long_prompt, max_new_tokens=32, max_denoising_steps=4)
kept = [entry["kept_per_kv_head"][0] for entry in profiled.cache_stats()["layers"]]
importance = ", ".join(f"{i:.3f}" for i in profile.importance)
print(f"4. layer profile ({importance}): full layers 1-3 keep {kept} of 40 x 3 entries")
