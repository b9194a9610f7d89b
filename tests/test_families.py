"""Transformer families beyond Llama and Qwen, run the way a user would: a random-weight model from
transformers' own config class, made bidirectional, driven by LLaDA's loop through ``optimize``.

For each family:
* the prefill is exact: its response rows carry the plain model's logits (float64; float32
  where the family's MoE kernel takes no float64). With ``prompt_refresh=1`` every call is this
  graph, so the loop gives the plain tokens; ``test_exactness.py`` holds the routing to that;
* the prefill projects the vocabulary on the response rows only (``head_sliced``), also when
  the logits are scaled, soft-capped or biased after the head;
* the step path runs under eviction (one prefill, then steps, no fallback).

Each family was picked for something the passes must see through: a softmax MoE router
(Mixtral, Qwen3-MoE: SDAR-30B's base) that is not attention; logits scaled after the head
(Cohere, Granite), soft-capped (Gemma 2) or given a vocabulary bias (ESM); a score scale written
in place (Falcon's eager attention); an all-open mask that BERT-style eager code builds inside
forward (RoFormer); fused projections, parallel residuals and partial rotary (GPT-NeoX, Phi).
The families MaskKV refuses say why by name.
"""

from __future__ import annotations

import pytest
import torch
from loops import llada_loop
from maskkv_compile.passes import UnsupportedModelError

import maskkv_compile
from maskkv_compile.tiny_models import set_causal

transformers = pytest.importorskip("transformers")

PROMPT, GEN, STEPS = 12, 8, 4
SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
)
NO_SPECIAL_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)

# name -> (config and model class prefix, config fields, attention implementation)
DECODERS = {
    "mixtral": ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2), "sdpa"),
    "qwen3_moe": (
        "Qwen3Moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16),
        "sdpa",
    ),
    "cohere": ("Cohere", dict(logit_scale=0.5), "sdpa"),
    "granite": ("Granite", dict(logits_scaling=4.0), "sdpa"),
    "gemma2": (
        "Gemma2",
        dict(head_dim=16, attn_logit_softcapping=None, final_logit_softcapping=5.0),
        "eager",
    ),
    "falcon": ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2), "eager"),
    "gpt_neox": ("GPTNeoX", dict(rotary_pct=0.5), "sdpa"),
    "phi": ("Phi", dict(partial_rotary_factor=0.5), "eager"),
}
ENCODERS = {
    "bert": ("Bert", dict(pad_token_id=0), "sdpa"),
    "modernbert": ("ModernBert", dict(pad_token_id=0, global_attn_every_n_layers=1), "sdpa"),
    "esm": ("Esm", dict(pad_token_id=0, position_embedding_type="rotary"), "sdpa"),
    "roformer": ("RoFormer", dict(pad_token_id=0, embedding_size=64), "eager"),
}
MASK = SIZES["vocab_size"] - 2  # an id no family reserves


def _build(prefix: str, head: str, fields: dict, attention: str) -> torch.nn.Module:
    config_fields = dict(SIZES)
    if head == "ForCausalLM":
        config_fields.update(num_key_value_heads=2, **NO_SPECIAL_TOKENS)
    config_fields.update(fields)
    if prefix == "Falcon":  # Falcon names its KV heads and MLP width its own way
        config_fields.pop("num_key_value_heads")
        config_fields.pop("intermediate_size")
    config = getattr(transformers, f"{prefix}Config")(**config_fields)
    config._attn_implementation = attention
    moe = "Moe" in prefix or prefix == "Mixtral"  # grouped_mm takes no float64
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}{head}")(config)
    model = set_causal(model, False).eval().to(torch.float32 if moe else torch.float64)
    with torch.no_grad():  # a trained dLLM never predicts the mask token
        out = model.get_output_embeddings()
        out.weight[MASK] = 0
        if getattr(out, "bias", None) is not None:
            out.bias[MASK] = -1e9
    return model


def _check(model: torch.nn.Module) -> None:
    prompt = torch.randint(3, MASK, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    x = torch.cat([prompt, torch.full((1, GEN), MASK)], dim=1)
    with torch.no_grad():
        plain = model(x).logits[:, PROMPT:]
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager", mask_token_id=MASK)
    with torch.no_grad():  # the prefill attends to the whole prompt, then keeps 4 per head
        first = optimized(x).logits[:, PROMPT:]
    torch.testing.assert_close(first, plain, rtol=1e-6, atol=1e-6)
    assert optimized.runtime.graphs.head_sliced  # the prefill's LM head reads the response rows

    optimized.reset()
    tokens = llada_loop(optimized, prompt, MASK, GEN, STEPS)
    assert not (tokens == MASK).any()
    stats = optimized.cache_stats()
    assert dict(stats["transitions"]) == {"new": 1, "step": STEPS - 1}
    assert not stats["fallbacks"] and stats["prompt_len"] == PROMPT


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_family_exact_and_on_the_step_path(family):
    prefix, fields, attention = DECODERS[family]
    _check(_build(prefix, "ForCausalLM", fields, attention))


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_masked_lm_family_exact_and_on_the_step_path(family):
    prefix, fields, attention = ENCODERS[family]
    _check(_build(prefix, "ForMaskedLM", fields, attention))


@pytest.mark.parametrize(
    ("prefix", "head", "fields", "says"),
    [
        (
            "Gemma2",
            "ForCausalLM",
            dict(head_dim=16, attn_logit_softcapping=50.0),
            "soft-capped .*attn_logit_softcapping",
        ),
        ("DebertaV2", "ForMaskedLM", dict(pad_token_id=0), "masked by a tensor .*DeBERTa"),
        ("MPNet", "ForMaskedLM", dict(pad_token_id=0), "added to a tensor .*relative-position"),
    ],
)
def test_refused_families_say_why(prefix, head, fields, says):
    model = _build(prefix, head, fields, "eager")
    optimized = maskkv_compile.optimize(model, budget=4, backend="eager", mask_token_id=MASK)
    x = torch.full((1, PROMPT + GEN), MASK)
    x[:, :PROMPT] = 5
    with pytest.raises(UnsupportedModelError, match=says):
        optimized(x)
