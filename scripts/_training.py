"""What the project's training scripts share (``train_tiny_dllm.py``, ``train_ruler.py``): the
Llama they train, the resumable state (weights, optimizer, both random generators, step and
curriculum stage) and the smoothing of their curves."""

from __future__ import annotations

import os
import random

import torch


def llama(
    vocab: int,
    mask_token_id: int,
    hidden: int,
    layers: int,
    heads: int,
    max_positions: int,
    seed: int = 0,
):
    """A random-weight Llama (MLP 4x, untied head, SDPA) with the task's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        mask_token_id=mask_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class TrainState:
    """The model, its AdamW, the batch generator and the curriculum's ``random.Random``;
    ``save(folder, step, stage)`` writes them with the loop's step and stage (``save_pretrained``
    + ``train_state.pt``), and ``resume`` continues exactly from there."""

    def __init__(self, model, lr: float, gen_seed: int, rng_seed: int):
        self.model = model
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98)
        )
        self.gen = torch.Generator().manual_seed(gen_seed)
        self.rng = random.Random(rng_seed)

    def load_weights(self, folder: str) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))

    def resume(self, folder: str) -> tuple[int, int]:
        """Load everything ``save`` wrote; returns (step, stage)."""
        self.load_weights(folder)
        state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=False)
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.rng.setstate(state["rng"])
        return state["step"], state["stage"]

    def save(self, folder: str, step: int, stage: int) -> None:
        self.model.save_pretrained(folder)
        torch.save(
            {
                "optimizer": self.opt.state_dict(),
                "gen": self.gen.get_state(),
                "rng": self.rng.getstate(),
                "step": step,
                "stage": stage,
            },
            os.path.join(folder, "train_state.pt"),
        )

    def warm_up_lr(self, lr: float, warmup: int, step: int) -> None:
        """Linear warm-up over ``warmup`` steps, then ``lr``."""
        for group in self.opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)


def smoothed(values, k: int = 50) -> list[float]:
    """The running mean of the last ``k + 1`` values at each point."""
    return [
        sum(values[max(0, i - k) : i + 1]) / len(values[max(0, i - k) : i + 1])
        for i in range(len(values))
    ]
