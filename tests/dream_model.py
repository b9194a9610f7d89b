"""A Dream-style model and generation loop for tests: the interface of Dream-7B's released
remote code (transformers 4.46 era), rebuilt on transformers 5.24's Qwen2.

* ``DreamStyleConfig``: a ``Qwen2Config`` whose ``model_type`` is ``"Dream"``.
* ``DreamStyleModel``: ``Qwen2Model`` (bidirectional: ``is_causal=False``) + an LM head.
  ``forward(input_ids, attention_mask=None, position_ids=None)`` accepts the attention masks
  Dream's loop passes (the string ``"full"``, a 2-D 0/1 padding mask, a ``[B, 1, N, N]`` bool
  mask) and returns ``.logits`` NOT shifted: row i is the model's output at position i, and
  the loop shifts (token i is predicted at row i-1), as in Dream.
* ``DreamGenerationMixin.diffusion_generate``: Dream's ``diffusion_generate`` rebuilt from its
  documented behaviour (algs ``origin``, ``maskgit_plus``, ``topk_margin``, ``entropy``).
* ``tiny_dream_style(...)``: a random-weight instance (mask id ``vocab - 1``, pad ``vocab - 2``).

Written from a description of Dream's interface, not from its source: it is a stand-in to
test loops and wrappers against, not a byte-for-byte copy of Dream's numerics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2Model
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from maskkv_compile.tiny_models import set_causal

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


# ----------------------------------------------------------------------------- generation


@dataclass
class DreamGenerationConfig:
    """The knobs of Dream's generation config that ``diffusion_generate`` reads."""

    mask_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    max_length: int = 20  # prompt + response, used when max_new_tokens is None
    max_new_tokens: Optional[int] = None
    steps: int = 512
    eps: float = 1e-3
    alg: str = "origin"
    alg_temp: Optional[float] = None
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    output_history: bool = False
    return_dict_in_generate: bool = False

    @classmethod
    def from_model_config(cls, config) -> "DreamGenerationConfig":
        return cls(
            **{
                name: getattr(config, name, None)
                for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id")
            }
        )

    def updated(self, **overrides) -> "DreamGenerationConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"diffusion_generate() got unknown generation options {unknown}; "
                f"known: {sorted(known)}"
            )
        return dataclasses.replace(self, **overrides)


@dataclass
class DreamModelOutput:
    sequences: torch.Tensor
    history: Optional[list] = None


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus: keep the most probable tokens until their mass reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    mass_before = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = torch.zeros_like(mass_before, dtype=torch.bool)
    drop_sorted[..., 1:] = mass_before[..., :-1] > top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _sample(logits, *, temperature, top_p, top_k, alg, generator):
    """(M, V) logits -> (confidence (M,), tokens (M,)) as Dream's alg defines confidence."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _filter_top_p(logits, top_p)
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = torch.special.xlogy(probs, probs).sum(-1)  # negative entropy
    return confidence, tokens


class DreamGenerationMixin:
    """Dream's ``diffusion_generate`` as a mixin.

    Everything it reads from ``self`` (a wrapper providing just these can borrow the method:
    ``DreamGenerationMixin.diffusion_generate(wrapper, ids, ...)``):

    * ``self(x, attention_mask, tok_idx)``: called positionally; returns an object with
      ``.logits`` (B, N, V), unshifted. ``attention_mask`` is the string ``"full"`` with
      ``tok_idx=None`` when nothing is padded, else a ``[B, 1, N, N]`` bool mask and
      ``tok_idx`` (B, N) positions;
    * ``self.generation_config``: a ``DreamGenerationConfig``, or None;
    * ``self.config``: only when ``generation_config`` is None (its special token ids);
    * ``self.device``: where the inputs go and new tensors are made.

    Helpers are module functions, never ``self.`` methods, so that list stays complete.
    """

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[DreamGenerationConfig] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ):
        """Fill ``max_new_tokens`` masks after ``input_ids`` (left-padded if ``attention_mask``
        has zeros). ``kwargs`` override fields of the generation config (``max_new_tokens``,
        ``steps``, ``temperature``, ``top_p``, ``top_k``, ``alg``, ``alg_temp``, ``eps``,
        ``output_history``, ``return_dict_in_generate``, ...). Random draws use ``generator``,
        or the global torch RNG when it is None (as Dream does).

        Returns (B, N) token ids, or a ``DreamModelOutput`` with ``return_dict_in_generate``.
        """
        base = generation_config if generation_config is not None else self.generation_config
        if base is None:
            base = DreamGenerationConfig.from_model_config(self.config)
        cfg = base.updated(**kwargs)
        if cfg.mask_token_id is None:
            raise ValueError("the generation config has no mask_token_id")
        if cfg.alg not in DREAM_ALGS:
            raise ValueError(f"alg must be one of {DREAM_ALGS}, got {cfg.alg!r}")
        device = self.device
        x = input_ids.to(device)
        prompt_len = x.shape[1]
        total = (
            prompt_len + cfg.max_new_tokens if cfg.max_new_tokens is not None else cfg.max_length
        )
        if total <= prompt_len:
            raise ValueError(
                f"nothing to generate: {total} total tokens for a prompt of {prompt_len}"
            )
        x = F.pad(x, (0, total - prompt_len), value=cfg.mask_token_id)

        if attention_mask is not None and bool((attention_mask == 0).any()):
            padded = F.pad(attention_mask.to(device), (0, total - prompt_len), value=1)
            tok_idx = (padded.long().cumsum(-1) - 1).masked_fill(padded == 0, 1)
            real = padded.bool()
            attention = torch.logical_and(
                real[:, None, None, :], real[:, None, :, None]
            )  # [B, 1, N, N]
        else:
            tok_idx, attention = None, "full"

        timesteps = torch.linspace(1, cfg.eps, cfg.steps + 1, device=device)
        history = [] if cfg.output_history else None
        sample = dict(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, generator=generator
        )
        for i in range(cfg.steps):
            masked = x == cfg.mask_token_id
            logits = self(x, attention, tok_idx).logits
            logits = torch.cat(
                [logits[:, :1], logits[:, :-1]], dim=1
            )  # token i is predicted at row i-1
            masked_logits = logits[masked]
            t, s = timesteps[i], timesteps[i + 1]
            last = i == cfg.steps - 1
            if cfg.alg == "origin":
                p_transfer = 1 if last else 1 - s / t
                fill = torch.full(
                    (masked_logits.shape[0],), cfg.mask_token_id, dtype=x.dtype, device=device
                )
                chosen = torch.rand(fill.shape, device=device, generator=generator) < p_transfer
                if bool(chosen.any()):
                    fill[chosen] = _sample(masked_logits[chosen], alg="origin", **sample)[1]
                x[masked] = fill
            else:
                confidence, tokens = _sample(masked_logits, alg=cfg.alg, **sample)
                masks_per_row = masked.sum() / masked.shape[0]
                count = int(masks_per_row) if last else int(masks_per_row * (1 - s / t))
                if count > 0:
                    scores = torch.full(
                        x.shape, float("-inf"), dtype=confidence.dtype, device=device
                    )
                    scores[masked] = confidence
                    if not cfg.alg_temp:
                        picked = torch.topk(scores, count, dim=-1).indices
                    else:
                        weights = torch.softmax(scores / cfg.alg_temp, dim=-1)
                        picked = torch.multinomial(weights, count, generator=generator)
                    proposal = torch.full_like(x, cfg.mask_token_id)
                    proposal[masked] = tokens
                    x.scatter_(1, picked, proposal.gather(1, picked))
            if history is not None:
                history.append(x.clone())
        if cfg.return_dict_in_generate:
            return DreamModelOutput(sequences=x, history=history)
        return x


# ----------------------------------------------------------------------------- model


class DreamStyleConfig(Qwen2Config):
    model_type = "Dream"


class DreamStyleModel(DreamGenerationMixin, Qwen2PreTrainedModel):
    config_class = DreamStyleConfig

    def __init__(self, config: DreamStyleConfig):
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.generation_config = DreamGenerationConfig.from_model_config(config)

    def _transformers_mask(self, attention_mask):
        """Dream's mask argument -> what transformers 5.24's Qwen2Model takes.

        "full"/None -> None (bidirectional, no mask). 2-D 0/1 -> as is: with
        ``config.is_causal=False`` transformers builds a bidirectional key-padding mask.
        4-D bool (True = attend) -> transformers' mask preparation returns any 4-D mask as is and
        the attention function gets it unchanged: SDPA takes a bool mask; eager ADDS the mask to
        the scores, so it becomes 0 / finfo(dtype).min. A 4-D float mask is taken as additive.
        """
        if isinstance(attention_mask, str):
            if attention_mask != "full":
                raise ValueError(
                    f"the only string attention_mask is 'full', got {attention_mask!r}"
                )
            return None
        if attention_mask is None or attention_mask.dim() == 2:
            return attention_mask
        if attention_mask.dim() != 4:
            raise ValueError(
                "attention_mask must be 'full', 2-D or 4-D, "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool:
            return attention_mask
        # A pad query attends to nothing in Dream's mask. Its output is never read (pad keys are
        # masked for every real query), but a fully masked row is NaN in eager's float32 softmax
        # (and in some SDPA kernels), and NaN values times zero weights would reach real rows
        # in the next layer. Such rows attend to every key instead: finite, and still unread.
        attention_mask = attention_mask | ~attention_mask.any(-1, keepdim=True)
        implementation = self.config._attn_implementation
        if implementation == "sdpa":
            return attention_mask
        if implementation == "eager":
            dtype = self.lm_head.weight.dtype
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            return additive.masked_fill(~attention_mask, torch.finfo(dtype).min)
        raise ValueError(
            f"a 4-D bool mask is supported with sdpa and eager attention, not {implementation!r}"
        )

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        kwargs.pop("use_cache", None)  # a KV cache is useless to a bidirectional denoiser
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=self._transformers_mask(attention_mask),
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


def tiny_dream_style(
    *,
    attn: str = "sdpa",
    dtype=torch.float32,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 256,
    seed: int = 0,
    max_positions: int = 8192,
) -> DreamStyleModel:
    """A random-weight Dream-style model: GQA, q/k/v biases, rope theta 1e6, bidirectional."""
    config = DreamStyleConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        use_cache=False,
        mask_token_id=vocab - 1,
        pad_token_id=vocab - 2,
        eos_token_id=vocab - 3,
        bos_token_id=vocab - 4,
        attn_implementation=attn,
    )
    config.is_causal = False
    torch.manual_seed(seed)
    return set_causal(DreamStyleModel(config), False).eval().to(dtype)
