"""A session (one prompt's cache) and the interface of the runtime's features.

A :class:`Session` holds what the runtime knows of one prompt: its
:class:`~maskkv_compile.layout.Layout`, the tokens and inputs of its last call, each layer's
kept K/V (:class:`LayerCache`), the weights it was prefilled with, and one state object per
feature. A :class:`Feature` (the dual cache, re-selection; the next one is one more class) plugs
into the runtime at these points and touches no other feature's state:

* ``start(session)``: a new session was made (its layout is known);
* ``prefill_outputs(session, named)``: after a prefill, take the feature's named outputs;
* ``step_view(session, plan)`` / ``step_graph(session, plan, call, inputs)``: before a step,
  the rows it computes and the graph it runs, with its extra inputs;
* ``step_outputs(session, plan, named)``: after a step, take the feature's named outputs;

plus ``evidence`` (device tensors routing reads with its others) and ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from maskkv_compile.kernels.select_kv import pad_kept
from maskkv_compile.layout import Layout
from maskkv_compile.logits_buffers import LogitsBuffers

if TYPE_CHECKING:
    from maskkv_compile.routing import Fallback, Plan


@dataclass
class LayerCache:
    kept_k: torch.Tensor  # (B, Hkv, Kmax, D)
    kept_v: torch.Tensor  # (B, Hkv, Kmax, Dv)
    kept_len: torch.Tensor  # (B, Hkv)
    kept_pos: torch.Tensor  # (B, Hkv, Kmax), -1 in the padding
    prompt_mass: torch.Tensor  # (B, H)


def padded_caches(flat: list[tuple[torch.Tensor, ...]]) -> list[LayerCache]:
    """The prefill's per-layer ``(kept_k, kept_v, kept_len, kept_pos, prompt_mass)`` in
    ``maskkv::select_kv``'s flat layout -> LayerCaches, each head padded to its layer's
    largest kept length. Every layer's largest is read in one ``tolist``."""
    if not flat:
        return []
    widths = torch.stack([kept_len.amax() for _, _, kept_len, _, _ in flat])
    caches = []
    for (kept_k, kept_v, kept_len, kept_pos, prompt_mass), width in zip(flat, widths.tolist()):
        k, v, pos = pad_kept(kept_k, kept_v, kept_len, kept_pos, width)
        caches.append(LayerCache(k, v, kept_len, pos, prompt_mass))
    return caches


@dataclass(frozen=True)
class Call:
    """One call's inputs, as the runtime reads them."""

    args: tuple  # the graph's flat inputs
    ids: torch.Tensor  # (B, S) token ids
    per_token: list  # other (B, S, ...) inputs
    others: list  # every other non-weight tensor input (compared by value)
    key_valid: torch.Tensor  # (B, S) bool, False at padding
    weights: tuple  # the weight signature (``weight_signature``)
    masked: torch.Tensor  # (B, S) bool: ids == the mask token
    key_end: Optional[torch.Tensor] = None  # (S,) block ends of a block-causal call (``masks``)
    # the cache object of a loop that keeps its own (``kv_loop.py``), weakly: its calls go on
    # with its own sessions only (None: a drop-in call)
    owner: Optional[Any] = None


def weight_signature(tensors: list) -> tuple:
    """Changes whenever a parameter or buffer is written in place (its version counter) or
    replaced or converted (its storage: ``.to(dtype)``, ``load_state_dict(assign=True)``). Read
    from tensor metadata only: about 40 us for a model of 300 tensors. Blind to a write through
    ``p.data``, whose alias counts its own versions (the README says to ``reset()`` then)."""
    try:
        versions = tuple([t._version for t in tensors])
    except RuntimeError:
        # an inference tensor keeps no version counter: its storage is what we have
        versions = ()
    try:
        storage = tuple([t.data_ptr() for t in tensors])
    except (RuntimeError, NotImplementedError):
        # a wrapper subclass (DTensor) has no storage of its own
        storage = tuple([id(t) for t in tensors])
    return versions, storage


@dataclass(eq=False)
class Session:
    layout: Layout
    ids: torch.Tensor  # (B, S) the tokens of the last call
    masked: torch.Tensor  # (B, S) bool: where the last call held the mask token
    per_token: list[torch.Tensor]  # the other per-token inputs of the prefill, (B, S, ...)
    others: list[torch.Tensor]  # the other tensor inputs of the prefill
    weights: tuple  # the weight signature of the prefill
    layers: list[LayerCache] = field(default_factory=list)
    steps_since_prefill: int = 0
    logits: Optional[LogitsBuffers] = None  # the (B, S, V) buffers of the drop-in call
    owner: Optional[Any] = None  # the call's ``owner``: the loop's cache object, weakly
    state: dict[str, Any] = field(
        default_factory=dict
    )  # feature name -> its state for this session

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)

    @property
    def resp_idx(self) -> torch.Tensor:
        """The rows the step graph computes (the response rows, plus Dream's read rows)."""
        return self.layout.rows

    # the features' states, under the names the tests and tools read
    @property
    def block(self):
        dual = self.state.get("dual_cache")
        return None if dual is None else dual.block

    @property
    def tier(self):
        revote = self.state.get("revote")
        return None if revote is None else revote.tier

    def matches(self, call: Call) -> bool:
        """Host facts allow the call to continue this session (shape, device, inputs)."""
        return (
            self.layout.has_prompt
            and self.owned_like(call)
            and call.ids.shape == self.ids.shape
            and call.ids.device == self.ids.device
            # a block-causal call continues a block session only, and a call without blocks
            # one without (the block ends themselves are compared on the device)
            and (call.key_end is None) == (self.layout.key_end is None)
            and len(call.per_token) == len(self.per_token)
            and len(call.others) == len(self.others)
            and all(x.shape == y.shape for x, y in zip(call.per_token, self.per_token))
            and all(
                x.shape == y.shape and x.dtype == y.dtype for x, y in zip(call.others, self.others)
            )
        )

    def owned_like(self, call: Call) -> bool:
        """The call and this session come from the same loop's cache object, or both from
        drop-in calls: two loops of one prompt, each with its own cache, never share a
        session."""
        if self.owner is None or call.owner is None:
            return self.owner is call.owner
        return self.owner() is not None and self.owner() is call.owner()

    def continues(self, call: Call) -> torch.Tensor:
        """0-d bool on the call's device: the call has this session's padding and block ends
        (its attention mask), and its tokens, per-token inputs (at every prompt position) and
        other inputs are the session's. Computed without reading the device (routing reads
        every fact of a call at once)."""
        layout = self.layout
        prompt = layout.prompt  # (B, S)
        differs = (call.key_valid != layout.key_valid).any() | (
            prompt & (call.ids != self.ids)
        ).any()
        if call.key_end is not None:  # (S,) both: ``matches`` held
            differs = differs | (call.key_end != layout.key_end).any()
        for x, y in zip(call.per_token, self.per_token):
            at_prompt = prompt.view(*prompt.shape, *[1] * (x.dim() - 2))  # (B, S, 1, ...)
            differs = differs | (at_prompt & (x != y)).any()
        for x, y in zip(call.others, self.others):
            differs = differs | (x != y).any()
        return ~differs

    def may_extend(self, call: Call) -> bool:
        """Host facts allow the call to be this block session's window grown by blocks."""
        return (
            self.layout.block_start is not None
            and self.owned_like(call)
            and call.key_end is not None
            and self.layout.has_prompt
            and call.ids.shape[0] == self.ids.shape[0]
            and call.ids.shape[1] > self.ids.shape[1]
            and call.ids.device == self.ids.device
            and len(call.per_token) == len(self.per_token)
            and len(call.others) == len(self.others)
            and all(
                x.shape[0] == y.shape[0] and x.shape[2:] == y.shape[2:]
                for x, y in zip(call.per_token, self.per_token)
            )
            and all(
                x.shape == y.shape and x.dtype == y.dtype for x, y in zip(call.others, self.others)
            )
        )

    def extends(self, call: Call) -> torch.Tensor:
        """0-d bool: the call is this session's window grown by one block, whatever the loop
        committed in the finished block: the same prefix (tokens, padding, per-token inputs,
        other inputs), the same block ends up to the old window's end, one new block from there
        to the end, and no mask token left in the old window (a loop that moves on before its
        block is done passes masks before its last block: that call runs whole, as a new
        window would) (``may_extend`` held)."""
        layout, seq = self.layout, self.ids.shape[1]
        prefix = layout.prompt  # (B, S_old)
        differs = (
            (call.key_valid[:, :seq] != layout.key_valid).any()
            | (prefix & (call.ids[:, :seq] != self.ids)).any()
            | (call.key_end[:seq] != layout.key_end).any()
            | (call.key_end[seq:] != call.ids.shape[1]).any()
            | (call.masked[:, :seq] & call.key_valid[:, :seq]).any()
        )
        for x, y in zip(call.per_token, self.per_token):
            at_prefix = prefix.view(*prefix.shape, *[1] * (x.dim() - 2))  # (B, S_old, 1, ...)
            differs = differs | (at_prefix & (x[:, :seq] != y)).any()
        for x, y in zip(call.others, self.others):
            differs = differs | (x != y).any()
        return ~differs

    def agrees(self, call: Call) -> torch.Tensor:
        """0-d bool: the call holds the tokens this session's last call had committed in its
        response (its block, for a block window), at the same positions (for a grown window,
        in its first ``S`` positions). A preference between sessions, not a condition: an
        editing loop rewrites committed tokens."""
        seq = self.ids.shape[1]
        committed = self.layout.response & ~self.masked  # (B, S)
        return ~(committed & (call.ids[:, :seq] != self.ids)).any()

    def restarted(self, call: Call) -> torch.Tensor:
        """0-d bool: a response position that held a committed token at the last call holds the
        mask token again (a new generation of the same prompt). For a block window whose last
        call was its prefill, also the very same call again: block loops commit a token at
        every call, so it is the generation run again (a window refined in one call), and its
        first call attends to the whole prefix, not to the kept one."""
        again = ((call.masked > self.masked) & self.layout.response).any()  # masked now, not then
        if self.layout.block_start is not None and self.steps_since_prefill == 0:
            again = again | (call.ids == self.ids).all()
        return again


class Feature:
    """A runtime feature: the hooks are no-ops unless a subclass fills them in."""

    name = "feature"

    def start(self, session: Session) -> Optional["Fallback"]:
        """A new session (its layout is known); returns why the feature does not apply to it, if
        that makes the session slower than it could be (counted and warned by the runtime)."""

    def evidence(self, session: Session, call: Call) -> dict[str, torch.Tensor]:
        """0-d device tensors that routing reads with the session's other facts."""
        return {}

    def prefill_outputs(self, session: Session, named: dict) -> None:
        """After a prefill: ``named`` maps output group -> per-layer tuples (``passes.base``)."""

    def step_view(self, session: Session, plan: "Plan"):
        """Before a step: what it computes instead of the session's layout and kept entries
        (a ``dual_cache.StepView``), or None."""
        return None

    def step_graph(self, session: Session, plan: "Plan", call: Call, inputs: dict) -> Optional[str]:
        """Before a step: update ``inputs`` (graph input name -> tensor) in place and return the
        name of the graph to run instead of "step", or None."""
        return None

    def step_outputs(self, session: Session, plan: "Plan", named: dict) -> None:
        """After a step: take the feature's named outputs."""

    def extend(self, session: Session, finished: Layout, response_kv: list) -> bool:
        """A block-causal window grew by one block (``session.layout`` is the new one):
        ``response_kv`` holds each layer's K/V of ``finished.rows``, the finished block. Returns
        True when the feature takes them (the runtime then does not append them to the kept
        prefix itself)."""
        return False

    def stats(self, session: Optional[Session]) -> dict:
        return {}
