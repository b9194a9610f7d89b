"""``calibrate`` for DiffusionGemma: each full-attention layer's importance, measured on the
canvas of the first decoder call (the call whose queries vote), for MaskKV's layer budgets."""

from __future__ import annotations

import torch

from maskkv_compile.diffusion_gemma.model_rules import full_layers, layer_fingerprint


class _FirstDecoderCallDone(Exception):
    """Raised by :func:`calibrate`'s hook: the voting call has been measured."""


@torch.no_grad()
def calibrate(model: torch.nn.Module, prompts):
    """The layer profile of a DiffusionGemma model (``maskkv_compile.calibrate`` runs this).

    Per prompt ((1, P) or (P,) token ids), transformers' ``generate`` runs up to its first
    decoder call (the call whose canvas queries vote), and each full-attention layer's
    importance ``I_l = 1 - mean_i cos(h_in[i], h_out[i])`` is measured on its canvas rows, with
    ``h_in`` the decoder layer's input and ``h_out = h_in +`` its normed attention output (the
    residual after the attention sub-layer). The canvas is drawn with a fixed seed, and the
    caller's RNG is left as it was."""
    from maskkv_compile.profile import LayerProfile, attention_importance

    full = full_layers(model)
    layers = model.model.decoder.layers
    captured: dict[int, list[torch.Tensor]] = {}

    def layer_input(layer):
        def hook(module, args, kwargs):
            captured[layer] = [args[0] if args else kwargs["hidden_states"]]

        return hook

    def attention_output(layer):
        def hook(module, args, output):
            captured[layer].append(output)

        return hook

    def stop(module, args, output):
        raise _FirstDecoderCallDone

    hooks = [layers[i].register_forward_pre_hook(layer_input(i), with_kwargs=True) for i in full]
    hooks += [
        layers[i].post_attention_layernorm.register_forward_hook(attention_output(i)) for i in full
    ]
    hooks.append(model.model.decoder.register_forward_hook(stop))
    per_prompt = []
    model.eval()
    try:
        for prompt in prompts:
            prompt = prompt if prompt.dim() == 2 else prompt[None]
            if prompt.shape[0] != 1:
                raise ValueError(f"calibrate takes one prompt at a time, got {tuple(prompt.shape)}")
            captured.clear()
            device = prompt.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                try:
                    model.generate(prompt, max_new_tokens=model.config.canvas_length)
                except _FirstDecoderCallDone:
                    pass
            missing = [i for i in full if len(captured.get(i, ())) != 2]
            if missing:
                raise RuntimeError(f"calibrate: no decoder call reached full layers {missing}")
            per_prompt.append(
                [attention_importance(h, h + a) for h, a in (captured[i] for i in full)]
            )
    finally:
        for hook in hooks:
            hook.remove()
    if not per_prompt:
        raise ValueError("calibrate needs at least one prompt")
    return LayerProfile.from_measurements(
        per_prompt,
        layer_fingerprint(model),
        layers="full_attention",
        canvas_length=model.config.canvas_length,
    )
