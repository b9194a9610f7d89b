"""FindAttentionPass: every attention spelling -> one canonical ``maskkv::attention`` node.

Matches
  * fused SDPA: ``torch._C._nn.scaled_dot_product_attention`` / ``F.scaled_dot_product_attention``
    (GQA via ``enable_gqa=True``);
  * the eager chain ``matmul(q, k^T) -> mul(scale) | div(c) -> softmax(-1) [-> to(dtype)]
    [-> dropout(p=0 | training=False)] -> matmul(., v)`` (Hugging Face eager, nanoGPT);
  * GQA key/value repetition feeding either spelling: ``expand`` + ``reshape`` (HF
    ``repeat_kv``) or ``repeat_interleave(n, dim=1)``; the canonical op reads the
    unrepeated (B, Hkv, S, D) tensors.

Inserts ``maskkv::attention(q, k, v, scale, softmax_dtype)`` with ``meta["maskkv_site"]``
(an :class:`AttentionSite`: layer index in graph order, module path, heads, spelling).

A mask the model builds from the sequence length alone (``mask_proofs.length_only``: an SDPA
``attn_mask`` or an additive mask on the eager scores, such as a block-causal mask made inside
``forward`` from a ``block_size`` in the config) is dropped from the site too, and named in
``AttentionSite.graph_mask``: the pipeline computes it again for each call's length
(``MaskKVGraphs.mask_fn``) and the runtime reads it like a mask the caller passed.

A softmax over an axis of fixed size while the sequence length is symbolic (an MoE router's
softmax over its experts) normalizes each token's own scores: it is not attention over the
tokens, and is left alone. (With a static trace, an axis of the sequence's size is a candidate.)

Refuses (recorded in ``skipped``, turned into an error by the pipeline): causal attention,
an attention mask computed from the call's tensors (padding: the caller passes it, and the
optimized model reads it from the call; unless ``mask_proofs`` proves it all-True: it then
masks nothing and is dropped), non-zero dropout, and an eager chain whose intermediate (scores or
probabilities) is used by anything else -- the rewrite would change what that user sees.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from maskkv_compile import kernels  # noqa: F401  (registers maskkv:: ops)
from maskkv_compile._torch_private import example_value
from maskkv_compile.naming import readable_name, stack_path  # errors name nodes by module path

from .base import GraphPass, PassResult, is_call, is_method
from .mask_proofs import allows_everything, length_only

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
SOFTMAX_TARGETS = (F.softmax, torch.softmax, torch.nn.functional.softmax)
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.bmm)
DROPOUT_TARGETS = (F.dropout, torch.dropout)
# a constant scale on the scores (in place too: Falcon's ``scores /= sqrt(d)``)
_SCALES = (operator.mul, operator.imul, torch.mul)
_DIVIDES = (operator.truediv, operator.itruediv, torch.div)
# ways scores are combined with another tensor before the softmax (for refusals that say so)
_COMBINED = {
    operator.add: "added to",
    operator.iadd: "added to",
    torch.add: "added to",
    "add": "added to",
    "add_": "added to",
    "masked_fill": "masked by",
    "masked_fill_": "masked by",
    torch.masked_fill: "masked by",
}


@dataclass(frozen=True)
class AttentionSite:
    layer: int
    module_path: str
    heads: int
    kv_heads: int
    head_dim: int
    spelling: str  # "sdpa", "eager", plus "+gqa" when KV heads are shared
    scale: (
        float  # nan when the graph computes it (dynamo's unspecialized floats under dynamic=True)
    )
    node: str  # name of the canonical node
    graph_mask: Optional[str] = None  # the dropped mask the model built from the length alone


class SiteRefused(Exception):
    """A candidate attention the pass cannot prove safe to rewrite."""


def _module_path(node: fx.Node) -> str:
    path = stack_path(node)
    return "?" if path is None else path or "<root>"


def _kwarg(node: fx.Node, name: str, position: int, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise SiteRefused(
            f"the {what} ({readable_name(node.name)}) is also used by "
            f"{', '.join(readable_name(u.name) for u in users[1:]) or 'nothing'}"
        )
    return users[0]


def unrepeat_kv(node: fx.Node) -> fx.Node:
    """Undo HF ``repeat_kv`` (x[:, :, None].expand(...).reshape(...)) or repeat_interleave(n,
    dim=1)."""
    if is_method(node, "reshape", "view") or is_call(node, torch.reshape):
        expanded = node.args[0]
        if isinstance(expanded, fx.Node) and is_method(expanded, "expand"):
            unsqueezed = expanded.args[0]
            if isinstance(unsqueezed, fx.Node) and is_call(unsqueezed, operator.getitem):
                index = unsqueezed.args[1]
                if isinstance(index, tuple) and len(index) >= 3 and index[2] is None:
                    return unsqueezed.args[0]
    if is_method(node, "repeat_interleave") or is_call(node, torch.repeat_interleave):
        dim = _kwarg(node, "dim", 2)
        if dim == 1:
            return node.args[0]
    return node


def _transposed_key(node: fx.Node) -> fx.Node:
    """k from k.transpose(-2, -1) / k.transpose(2, 3) / k.mT."""
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = {d % 4 for d in node.args[1:3]}
        if dims == {2, 3}:
            return node.args[0]
    raise SiteRefused(
        f"the second operand of the score matmul ({readable_name(node.name)}) is "
        "not a transposed key"
    )


def _sequence_length(gm: fx.GraphModule):
    """The sequence length's expression (``graph_info.analyse``), or None for a graph without
    token ids (every softmax is then a candidate)."""
    from .graph_info import UnsupportedModelError, analyse

    try:
        return analyse(gm).seq_expr
    except UnsupportedModelError:
        return None


def _may_normalize_over_tokens(softmax: fx.Node, seq) -> bool:
    """False when the softmax's axis has a fixed size that cannot be the sequence's: its input
    is then normalized within each token's own scores."""
    value = example_value(softmax.args[0]) if isinstance(softmax.args[0], fx.Node) else None
    dim = _kwarg(softmax, "dim", 1)
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int):
        return True
    size = value.shape[dim]
    if isinstance(size, torch.SymInt) or seq is None:
        return True
    return isinstance(seq, int) and size == seq


class FindAttentionPass(GraphPass):
    name = "FindAttentionPass"

    def run(self, gm: fx.GraphModule) -> PassResult:
        graph = gm.graph
        skipped: list[str] = []
        sites = 0
        seq = _sequence_length(gm)
        for node in list(graph.nodes):
            try:
                if is_call(node, *SDPA_TARGETS):
                    match = self._match_sdpa(node)
                elif is_call(node, *SOFTMAX_TARGETS) or is_method(node, "softmax"):
                    if not _may_normalize_over_tokens(node, seq):
                        continue  # a per-token softmax (an MoE router): not attention
                    match = self._match_eager(node)
                else:
                    continue
            except SiteRefused as refusal:
                skipped.append(f"{_module_path(node)} ({readable_name(node.name)}): {refusal}")
                continue
            out_node, q, k, v, scale, softmax_dtype, spelling, graph_mask = match
            k, v = unrepeat_kv(k), unrepeat_kv(v)
            with graph.inserting_before(out_node):
                canon = graph.call_function(
                    torch.ops.maskkv.attention.default, (q, k, v, scale, softmax_dtype)
                )
            canon.meta.update(out_node.meta)
            qv, kv = example_value(q), example_value(k)
            gqa = "+gqa" if kv.shape[1] != qv.shape[1] else ""
            canon.meta["maskkv_site"] = AttentionSite(
                layer=sites,
                module_path=_module_path(out_node),
                heads=int(qv.shape[1]),
                kv_heads=int(kv.shape[1]),
                head_dim=int(qv.shape[-1]),
                spelling=spelling + gqa,
                scale=scale if isinstance(scale, float) else float("nan"),
                node=canon.name,
                graph_mask=None if graph_mask is None else graph_mask.name,
            )
            out_node.replace_all_uses_with(canon)
            sites += 1
        return PassResult(self.name, matches=sites, changed=sites > 0, skipped=tuple(skipped))

    @staticmethod
    def _match_sdpa(node: fx.Node):
        q, k, v = node.args[:3]
        if _kwarg(node, "is_causal", 5, False) is not False:
            raise SiteRefused(
                "causal attention (is_causal=True); MaskKV needs bidirectional attention"
            )
        mask = _kwarg(node, "attn_mask", 3)
        if mask is not None and allows_everything(mask):  # an all-True mask masks nothing
            mask = None
        if mask is not None and not length_only(mask):
            raise SiteRefused(
                "an attention mask computed from the call's tensors is passed (a causal "
                "attention mask, or padding); MaskKV needs bidirectional or block-causal "
                "attention, with padding passed by the caller"
            )
        if _kwarg(node, "dropout_p", 4, 0.0) not in (0, 0.0):
            raise SiteRefused("dropout_p is not 0; put the model in eval mode")
        scale = _kwarg(node, "scale", 6)
        if scale is None:
            scale = 1.0 / math.sqrt(example_value(q).shape[-1])
        return node, q, k, v, scale, None, "sdpa", mask

    @staticmethod
    def _match_eager(softmax: fx.Node):
        dim = _kwarg(softmax, "dim", 1)
        if dim not in (-1, 3):
            raise SiteRefused(f"softmax over dim {dim}, not the key dim")
        softmax_dtype = softmax.kwargs.get("dtype")
        scaled = softmax.args[0]
        scale = 1.0
        mask = None
        if is_call(scaled, operator.add, torch.add):  # scores + a mask
            a, b = scaled.args[:2]
            for candidate, scores in ((b, a), (a, b)):
                if isinstance(candidate, fx.Node) and length_only(candidate):
                    _single_user(scores, "score tensor")
                    mask, scaled = candidate, scores
                    break
        while is_call(scaled, *_SCALES, *_DIVIDES):
            a, b = scaled.args[:2]
            const, tensor = (b, a) if isinstance(b, (int, float)) else (a, b)
            if not isinstance(const, (int, float)):
                raise SiteRefused(
                    f"scores are combined with a tensor ({readable_name(scaled.name)}): an "
                    "attention mask or bias"
                )
            if scaled.target in _DIVIDES and not isinstance(b, (int, float)):
                raise SiteRefused(
                    f"a constant is divided by the scores ({readable_name(scaled.name)}), not "
                    "the scores by a constant"
                )
            scale = scale / const if scaled.target in _DIVIDES else scale * const
            _single_user(tensor, "score tensor")
            scaled = tensor
        if is_call(scaled, torch.tanh) or is_method(scaled, "tanh"):
            raise SiteRefused(
                f"the scores are soft-capped ({readable_name(scaled.name)}: tanh(scores / c) * c, "
                "as Gemma 2's attn_logit_softcapping); maskkv::attention computes "
                "softmax(scale * q @ k^T) only"
            )
        combined = _COMBINED.get(getattr(scaled, "target", None))
        if combined is not None and getattr(scaled, "op", None) in ("call_function", "call_method"):
            raise SiteRefused(
                f"the scores are {combined} a tensor ({readable_name(scaled.name)}) computed from "
                "the call's values, not from its length alone (a relative-position bias, as "
                "DeBERTa's and MPNet's, or a padding mask built inside forward); "
                "maskkv::attention computes softmax(scale * q @ k^T) under the caller's padding "
                "and block masks only"
            )
        if not (isinstance(scaled, fx.Node) and (is_call(scaled, *MATMUL_TARGETS))):
            raise SiteRefused(
                "softmax input "
                f"{readable_name(scaled.name) if isinstance(scaled, fx.Node) else scaled} is "
                "not a scaled q @ k^T"
            )
        scores = scaled
        q, kt = scores.args[:2]
        k = _transposed_key(kt)
        probs = _single_user(softmax, "attention probabilities")
        while is_method(probs, "to", "type_as", "float", "half", "bfloat16") or is_call(
            probs, *DROPOUT_TARGETS
        ):
            if is_call(probs, *DROPOUT_TARGETS):
                p = _kwarg(probs, "p", 1, 0.5)
                training = _kwarg(probs, "training", 2, True)
                if p not in (0, 0.0) and training is not False:
                    raise SiteRefused(
                        "dropout on the attention probabilities is active; put "
                        "the model in eval mode"
                    )
            probs = _single_user(probs, "attention probabilities")
        if not (is_call(probs, *MATMUL_TARGETS) and probs.args[0] is not None):
            raise SiteRefused(
                f"attention probabilities feed {readable_name(probs.name)}, not a matmul with v"
            )
        out = probs
        v = out.args[1]
        q_dtype = example_value(q).dtype
        dtype: Optional[torch.dtype] = (
            softmax_dtype if softmax_dtype not in (None, q_dtype) else None
        )
        return out, q, k, v, scale, dtype, "eager", mask


def attention_sites(gm: fx.GraphModule) -> list[tuple[fx.Node, AttentionSite]]:
    """The canonical attention nodes of a graph, in layer order."""
    return [(n, n.meta["maskkv_site"]) for n in gm.graph.nodes if "maskkv_site" in n.meta]
