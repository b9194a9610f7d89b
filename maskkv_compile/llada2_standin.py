"""A small LLaDA2-shaped block-diffusion model and its generation loop (random weights): what the
tests, the block-diffusion example and the README run MaskKV against, as ``tiny_models`` does
for LLaDA and Dream.

Written from the conventions of inclusionAI's released LLaDA2.0 / LLaDA2.1 remote code and of the
diffusers ``LLaDA2Pipeline`` (read, not copied). It is a stand-in to test MaskKV's handling of
block-diffusion callers against, not a byte-for-byte copy of LLaDA2's numerics.

Architecture (per layer): RMSNorm -> attention -> residual -> RMSNorm -> MLP -> residual, where

* attention has one fused ``query_key_value`` projection (query heads, then key heads, then value
  heads, each ``head_dim`` wide), GQA, RMSNorm on each query and key head (``use_qk_norm``), rotary
  on the first ``partial_rotary_factor * head_dim`` channels of each head only, an output
  projection ``dense``, and goes through transformers' attention interface
  (``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``, or the eager reference) with
  ``is_causal=False`` and the caller's 4-D mask;
* the MLP is a SwiGLU for the first ``first_k_dense_replace`` layers, then a mixture of experts:
  a sigmoid router with an ``expert_bias`` used for selection only, group-limited top-k (experts in
  ``n_group`` groups, a group scored by the sum of its best two experts, ``topk_group`` groups
  kept), the chosen sigmoid scores renormalised and scaled by ``routed_scaling_factor``, plus a
  shared expert. Experts are evaluated densely (every expert on every token, weighted by a
  scattered gate) so the forward has no data-dependent shapes and traces with ``fullgraph=True``.

Logits are NOT shifted: row i is the prediction for position i, as in LLaDA2.

``forward(input_ids, attention_mask=None, position_ids=None)`` accepts

* ``None``: full bidirectional attention;
* a 4-D ``[B or 1, 1, Q, K]`` mask: float additive (0 / -inf, what LLaDA2's ``generate`` passes)
  or bool (True = may attend); used as given;
* a 2-D ``[B, K]`` 0/1 key-padding mask (what diffusers' ``LLaDA2Pipeline`` passes): converted
  here to the block-causal mask of ``config.block_length`` on the grid that starts at position 0
  (LLaDA2's grid), with padded keys removed from every row (as transformers' masks do); a row
  left with no key keeps its own, so no row is empty.
  With ``config.block_length=None`` a 2-D mask gives bidirectional attention with key padding.

``LLaDA2StyleModel.generate`` is LLaDA2's block-wise refinement loop (see its docstring), with
LLaDA2.1's token editing (``editing_threshold``, ``max_post_steps``) as an option.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# ----------------------------------------------------------------------------- config


class LLaDA2StyleConfig(PreTrainedConfig):
    model_type = "llada2_style_moe"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        moe_intermediate_size: int = 32,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: Optional[int] = None,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        use_qk_norm: bool = True,
        num_experts: Optional[int] = 8,
        num_shared_experts: Optional[int] = 1,
        num_experts_per_tok: int = 2,
        n_group: int = 4,
        topk_group: int = 2,
        routed_scaling_factor: float = 2.5,
        first_k_dense_replace: int = 1,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        mask_token_id: int = 255,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        block_length: Optional[int] = 32,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.use_qk_norm = use_qk_norm
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.block_length = block_length
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.is_causal = False


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _partial_rotary(x, cos, sin):
    """Rotary on the first ``cos.shape[-1]`` channels of each head; the rest pass through."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention: GQA by repeating k/v, additive float mask (bool is converted)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        scores = scores + attention_mask[:, :, :, : key.shape[-2]].to(scores.dtype)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


class LLaDA2StyleAttention(nn.Module):
    def __init__(self, config: LLaDA2StyleConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query_key_value = nn.Linear(
            config.hidden_size,
            (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
            bias=config.use_qkv_bias,
        )
        if config.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias
        )

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        bsz, q_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(
            bsz, q_len, self.num_heads + 2 * self.num_key_value_heads, self.head_dim
        )
        q, k, v = qkv.split(
            [self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=2
        )
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.config.use_qk_norm:
            q = self.query_layernorm(q)
            k = self.key_layernorm(k)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = _partial_rotary(q, cos, sin)
        k = _partial_rotary(k, cos, sin)
        impl = self.config._attn_implementation or "sdpa"
        attention: Callable = _eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = attention(
            self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, is_causal=False
        )
        return self.dense(out.reshape(bsz, q_len, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2StyleRouter(nn.Module):
    """Sigmoid scores; selection on scores + expert_bias, group-limited; weights from raw scores."""

    def __init__(self, config: LLaDA2StyleConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, x):  # x: [T, H]
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [T, E]
        routing = scores + self.expert_bias.float()
        t = routing.shape[0]
        per_group = routing.view(t, self.n_group, -1)
        group_score = per_group.topk(min(2, per_group.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
        group_idx = group_score.topk(self.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_score).scatter(1, group_idx, 1.0).bool()
        expert_keep = group_keep.unsqueeze(-1).expand_as(per_group).reshape(t, -1)
        idx = routing.masked_fill(~expert_keep, float("-inf")).topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.top_k > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.routed_scaling_factor


class LLaDA2StyleMoE(nn.Module):
    def __init__(self, config: LLaDA2StyleConfig):
        super().__init__()
        self.config = config
        self.experts = nn.ModuleList(
            [
                SwiGLU(config.hidden_size, config.moe_intermediate_size)
                for _ in range(config.num_experts)
            ]
        )
        self.gate = LLaDA2StyleRouter(config)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        idx, w = self.gate(x)
        dense_w = torch.zeros(
            x.shape[0], self.config.num_experts, dtype=w.dtype, device=x.device
        ).scatter(1, idx, w)
        every = torch.stack([expert(x) for expert in self.experts], dim=1)  # [T, E, H]
        y = (every * dense_w.to(every.dtype).unsqueeze(-1)).sum(1).view(b, s, h)
        if self.shared_experts is not None:
            y = y + self.shared_experts(hidden_states)
        return y


class LLaDA2StyleDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2StyleConfig, layer_idx: int):
        super().__init__()
        self.attention = LLaDA2StyleAttention(config, layer_idx)
        use_moe = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = (
            LLaDA2StyleMoE(config)
            if use_moe
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None):
        hidden_states = hidden_states + self.attention(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------- masks


def llada2_block_mask(
    num_blocks: int, block_length: int, *, dtype=torch.float32, device=None
) -> torch.Tensor:
    """LLaDA2's mask: ``tril`` over blocks, expanded to positions, ``log`` (1 -> 0, 0 -> -inf).

    Returns ``[1, 1, num_blocks*block_length, num_blocks*block_length]`` in ``dtype`` (LLaDA2.0's
    released ``generate`` casts it to bfloat16; the stand-in uses the model's dtype by default).
    """
    blocks = torch.tril(torch.ones(num_blocks, num_blocks, device=device))
    full = blocks.repeat_interleave(block_length, dim=0).repeat_interleave(block_length, dim=1)
    return full[None, None].log().to(dtype)


def _mask_from_padding(padding: torch.Tensor, block_length: Optional[int], dtype) -> torch.Tensor:
    """2-D key-padding mask -> 4-D additive mask: block-causal on the grid from 0 (or full), keys
    that are padding removed (for every row, padding rows included, as transformers' masks do);
    a row left with no key at all keeps its diagonal."""
    k = padding.shape[-1]
    pos = torch.arange(k, device=padding.device)
    if block_length is None:
        allowed = torch.ones(k, k, dtype=torch.bool, device=padding.device)
    else:
        blk = pos // block_length
        allowed = blk[None, :] <= blk[:, None]
    allowed = allowed[None, None] & padding.bool()[:, None, None, :]
    # a row that sees no key (padding in a block of padding) sees itself, so it is not NaN
    lonely = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (lonely & torch.eye(k, dtype=torch.bool, device=padding.device))
    return torch.zeros((), dtype=dtype, device=padding.device).masked_fill(~allowed, float("-inf"))


# ----------------------------------------------------------------------------- model


class LLaDA2StylePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2StyleConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_flex_attn = False
    _no_split_modules = ["LLaDA2StyleDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, LLaDA2StyleRouter):
            module.weight.normal_(0.0, std)
            module.expert_bias.zero_()


class LLaDA2StyleModel(LLaDA2StylePreTrainedModel):
    """Embeddings + decoder layers + final norm + LM head (LLaDA2's ``LLaDA2MoeModelLM`` shape)."""

    def __init__(self, config: LLaDA2StyleConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LLaDA2StyleDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        rope_dim = int(config.head_dim * config.partial_rotary_factor)
        rope_dim -= rope_dim % 2
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def _rotary(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, rope_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def _prepare_mask(self, attention_mask, dtype):
        if attention_mask is None or attention_mask.dim() == 4:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                return attention_mask
            return None if attention_mask is None else attention_mask.to(dtype)
        if attention_mask.dim() == 2:
            return _mask_from_padding(attention_mask, self.config.block_length, dtype)
        raise ValueError(
            f"attention_mask must be 2-D or 4-D, got shape {tuple(attention_mask.shape)}"
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states: bool = False,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = self._prepare_mask(attention_mask, inputs_embeds.dtype)
        position_embeddings = self._rotary(inputs_embeds, position_ids)
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, mask)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden
        logits = self.lm_head(hidden).float()
        return CausalLMOutputWithPast(
            logits=logits, hidden_states=tuple(all_hidden) if all_hidden else None
        )

    # ------------------------------------------------------------------------- generation

    @staticmethod
    def num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
        """LLaDA2's schedule: ``block_length // steps`` per step, the remainder on the first
        steps."""
        if steps <= 0:
            return torch.zeros(0, dtype=torch.int64)
        out = torch.full((steps,), block_length // steps, dtype=torch.int64)
        out[: block_length % steps] += 1
        return out

    @staticmethod
    def _sample(logits, temperature, top_k, top_p, generator=None):
        """Greedy at temperature 0 (token, its softmax prob); else temperature/top-k/top-p
        multinomial."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if temperature == 0:
            probs = F.softmax(flat, dim=-1)
            tok = flat.argmax(-1, keepdim=True)
        else:
            flat = flat / temperature
            if top_k:
                kth = flat.topk(top_k, dim=-1).values[..., -1:]
                flat = flat.masked_fill(flat < kth, float("-inf"))
            if top_p is not None and top_p < 1.0:
                srt, order = flat.sort(dim=-1, descending=True)
                drop = F.softmax(srt, dim=-1).cumsum(-1) > top_p
                drop[..., 1:] = drop[..., :-1].clone()
                drop[..., 0] = False
                flat = flat.masked_fill(
                    torch.zeros_like(drop).scatter(-1, order, drop), float("-inf")
                )
            probs = F.softmax(flat, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator)
        return tok.view(logits.shape[:-1]), probs.gather(-1, tok).view(logits.shape[:-1])

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor,
        temperature: float = 0.0,
        block_length: int = 32,
        steps: int = 32,
        gen_length: int = 2048,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        eos_early_stop: bool = False,
        minimal_topk: int = 1,
        threshold: float = 0.95,
        eos_id: Optional[int] = None,
        mask_id: Optional[int] = None,
        editing_threshold: Optional[float] = None,
        max_post_steps: int = 16,
        mask_dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
        return_full: bool = False,
    ) -> torch.Tensor:
        """LLaDA2's block-wise refinement (batch 1, as released).

        * ``steps = min(steps, gen_length // minimal_topk)`` refinement steps per block.
        * Grid: ``num_blocks = ceil((P + gen_length) / block_length)`` blocks from position 0; the
          prompt sits at positions ``[0, P)`` (not padded to a block boundary: the block holding
          the prompt's tail is shared with the first generated tokens), the rest is ``mask_id``.
        * Mask: :func:`llada2_block_mask` over the whole grid (``mask_dtype``, default the model's
          dtype); position ids ``arange(total_length)``.
        * Blocks ``P // block_length .. num_blocks - 1``: the window is
          ``x[:, :(b+1)*block_length]`` with the mask's top-left ``window x window`` corner and
          the first ``window`` position ids,
          passed to ``self.forward`` (not ``self(...)``) once per step; the last ``block_length``
          logits are sampled. A step commits the masked positions whose probability exceeds
          ``threshold`` if there are at least the schedule's count of them, else the top
          ``min(count, masks left)`` by probability. The block ends when no mask is left.
        * LLaDA2.1 editing (``editing_threshold > 0``): in every step, already-decoded,
          non-prompt positions of the current block whose sampled token differs and whose
          probability exceeds ``editing_threshold`` are rewritten; once no mask is left the block
          keeps refining while edits happen, for at most ``max_post_steps`` post steps.
        * ``eos_early_stop``: return at once when a committed EOS has no mask before it; after each
          block, stop if the generated part holds ``eos_id``.

        Returns the generated tokens ``x[:, P : P + first_eos + 1]`` (all ``gen_length`` without
        EOS), or the whole grid up to ``P + gen_length`` with ``return_full=True``.
        """
        if inputs.shape[0] != 1:
            raise ValueError("LLaDA2's generate is batch 1; use the diffusers pipeline for batches")
        if mask_id is None:
            mask_id = self.config.mask_token_id
        steps = min(steps, gen_length // minimal_topk)
        device = self.lm_head.weight.device
        prompt = inputs.to(device)
        p = prompt.shape[1]
        num_blocks = (p + gen_length + block_length - 1) // block_length
        total = num_blocks * block_length
        mask = llada2_block_mask(
            num_blocks, block_length, dtype=mask_dtype or self.dtype, device=device
        )
        position_ids = torch.arange(total, device=device)[None]
        x = torch.full((1, total), mask_id, dtype=torch.long, device=device)
        x[:, :p] = prompt
        schedule = self.num_transfer_tokens(block_length, steps)
        editing = editing_threshold is not None and editing_threshold > 0

        for b in range(p // block_length, num_blocks):
            end = (b + 1) * block_length
            cur_x, cur_mask, cur_pos = x[:, :end], mask[:, :, :end, :end], position_ids[:, :end]
            editable = torch.arange(end - block_length, end, device=device) >= p
            step, post = 0, 0
            while True:
                block = cur_x[:, -block_length:]
                masked = block == mask_id
                if not masked.any():
                    if not editing:
                        break
                    post += 1
                    if post > max_post_steps:
                        break
                elif step >= steps:
                    break
                logits = self.forward(cur_x, attention_mask=cur_mask, position_ids=cur_pos).logits
                x0, p0 = self._sample(
                    logits[:, -block_length:], temperature, top_k, top_p, generator
                )
                transfer = torch.zeros_like(masked)
                if masked.any():
                    n = int(schedule[min(step, len(schedule) - 1)])
                    conf = torch.where(masked, p0, torch.full_like(p0, -torch.inf))
                    high = conf[0] > threshold
                    if int(high.sum()) >= n:
                        transfer[0] = high
                    else:
                        transfer[0, conf[0].topk(min(n, int(masked.sum()))).indices] = True
                    step += 1
                edits = torch.zeros_like(masked)
                if editing:
                    edits = (~masked) & editable[None] & (x0 != block) & (p0 > editing_threshold)
                changed = transfer | edits
                if changed.any():
                    block[changed] = x0[changed]
                if not masked.any() and not edits.any():
                    break
                if eos_early_stop and eos_id is not None and (x0[changed] == eos_id).any():
                    eos_at = (cur_x[0] == eos_id).nonzero().flatten()
                    eos_at = eos_at[eos_at >= p]
                    if len(eos_at) and (cur_x[0, p : eos_at[0]] != mask_id).all():
                        return (
                            cur_x[:, : eos_at[0] + 1]
                            if return_full
                            else cur_x[:, p : eos_at[0] + 1]
                        )
            if eos_id is not None and (x[0, p:end] == eos_id).any():
                break

        out = x[:, : p + gen_length]
        if return_full:
            return out
        gen = out[:, p:]
        eos_at = (gen[0] == eos_id).nonzero().flatten() if eos_id is not None else gen.new_zeros(0)
        return gen[:, : int(eos_at[0]) + 1] if len(eos_at) else gen


def tiny_llada2(
    *,
    dtype=torch.float32,
    seed: int = 0,
    layers: int = 3,
    attn: str = "sdpa",
    block_length: Optional[int] = 4,
    **overrides,
) -> LLaDA2StyleModel:
    """A random-weight LLaDA2-shaped model: hidden 64, 4 query / 2 KV heads (head_dim 16, rotary
    on 8 channels), vocab 256 with mask id 255, layer 0 dense then MoE (8 experts in 4 groups,
    top-2 from 2 groups, one shared expert). ``block_length`` is only what a 2-D mask becomes."""
    config = LLaDA2StyleConfig(num_hidden_layers=layers, block_length=block_length, **overrides)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LLaDA2StyleModel(config)
    # A non-zero expert bias so that selection (biased) and weights (unbiased) differ, as in LLaDA2.
    for module in model.modules():
        if isinstance(module, LLaDA2StyleRouter):
            module.expert_bias.normal_(0.0, 0.1)
    return model.eval().to(dtype)
