"""Small bidirectional stand-ins for LLaDA and Dream, built from transformers configs.

``tiny_llada`` is a Llama with ``is_causal=False`` (multi-head attention, like LLaDA);
``tiny_dream`` is a Qwen2 with ``is_causal=False`` (GQA and q/k/v biases, like Dream).
Random weights: they exercise the compiler, not the quality of the answers. Needs
``transformers`` (the ``[hf]`` extra); the core package does not.
"""

from __future__ import annotations

import torch

MASK_TOKEN_ID = 255  # last id of the tiny vocabulary, as LLaDA's mask id is outside its text ids


def set_causal(model, causal: bool):
    """Switch a transformers model's attention between causal and bidirectional, in place."""
    model.config.is_causal = causal
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal
    return model


def _bidirectional(model):
    return set_causal(model, False).eval()


def _build(
    config_cls,
    model_cls,
    *,
    layers,
    hidden,
    heads,
    kv_heads,
    vocab,
    attn,
    max_positions,
    seed,
    dtype,
    **extra,
):
    config = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        mask_token_id=vocab - 1,
        attn_implementation=attn,
        **extra,
    )
    config.is_causal = False
    torch.manual_seed(seed)
    return _bidirectional(model_cls(config)).to(dtype)


def tiny_llada(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 256,
    attn: str = "sdpa",
    max_positions: int = 8192,
    seed: int = 0,
    dtype=torch.float32,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(
        LlamaConfig,
        LlamaForCausalLM,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=heads,
        vocab=vocab,
        attn=attn,
        max_positions=max_positions,
        seed=seed,
        dtype=dtype,
    )


def tiny_dream(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    attn: str = "sdpa",
    max_positions: int = 8192,
    seed: int = 0,
    dtype=torch.float32,
):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(
        Qwen2Config,
        Qwen2ForCausalLM,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        attn=attn,
        max_positions=max_positions,
        seed=seed,
        dtype=dtype,
    )


def tiny_qwen3(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    attn: str = "sdpa",
    max_positions: int = 8192,
    seed: int = 0,
    dtype=torch.float32,
):
    """A random Qwen3 (SDAR's base, QK norms) with ``is_causal=False``: block-diffusion loops."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(
        Qwen3Config,
        Qwen3ForCausalLM,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        attn=attn,
        max_positions=max_positions,
        seed=seed,
        dtype=dtype,
        head_dim=hidden // heads,
    )


def tiny_diffusion_gemma(
    *,
    layers: int = 2,
    hidden: int = 32,
    vocab: int = 128,
    canvas: int = 16,
    sliding_window: int = 8,
    max_positions: int = 4096,
    seed: int = 0,
    dtype=torch.float32,
    **text_options,
):
    """A random transformers DiffusionGemma (encoder + denoiser, same weights): ``layers`` layers,
    the last full attention (no v_proj, larger head dim, one KV head) and the others sliding,
    4 experts, a one-layer vision tower, canvas ``canvas``. ``text_options`` override
    ``DiffusionGemmaTextConfig`` arguments (head counts, ``layer_types``, experts, ...)."""
    from transformers import (
        DiffusionGemmaConfig,
        DiffusionGemmaForBlockDiffusion,
        DiffusionGemmaTextConfig,
    )
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    text = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=1,
        sliding_window=sliding_window,
        max_position_embeddings=max_positions,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=hidden // 2,
        use_bidirectional_attention="vision",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text = DiffusionGemmaTextConfig(**{**text, **text_options})
    vision = Gemma4VisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        patch_size=4,
        position_embedding_size=64,
        pooling_kernel_size=2,
    )
    config = DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=canvas,
        image_token_id=vocab - 1,
        boi_token_id=vocab - 2,
        eoi_token_id=vocab - 3,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval().to(dtype)
    if dtype == torch.float64:  # torch's grouped_mm (the default experts kernel) has no float64
        model.set_experts_implementation("eager")
    return model
