"""The MaskKV runtime: decides, call by call, between the prefill and the step graph.

A *session* is one prompt's cache: its :class:`~maskkv_compile.layout.Layout` (each row's
prompt, response and padding, and the rows the step computes), the tokens of the call that
last used it, and each layer's kept K/V. Up to ``config.max_sessions`` live at once, most
recent first. Each call is routed by evidence from its tokens (``ids``, (B, S)), its padding
(``key_valid``, from the caller's attention mask) and its other per-token inputs
(token_type_ids, position_ids, ...):

1. CONTINUE: a session continues when the call has its shape, device and padding, and the
   same tokens and per-token inputs at every prompt position of every row. A session with
   an empty prompt in some row (an all-mask row with no conditional row to copy) matches no
   call: there is nothing to tell its continuation from a new prompt, so each such call is
   a fresh prefill (correct, uncached).
2. RESTART: a continuing call in which some response position that held a committed token
   at the session's last call holds the mask token again starts a new generation: the
   layout is inferred afresh and the prefill graph runs. (Committing the mask id itself, as
   a random-weight model may, never looks like a restart: nothing went back.) The loops of
   the optimized model (``generate``, and any ``*generate`` method of the wrapped model
   called through it) also start from an empty runtime, so every generation begins with a
   prefill whatever it commits.
3. REFRESH: a continuing call that is the ``prompt_refresh``-th since the session's prefill
   reruns the prefill graph on the current tokens with the same layout: the prompt K/V are
   recomputed and re-selected, the voters being the session's response positions (masked
   or already committed).
4. STEP: any other continuing call runs the step graph: only the computed rows. With
   ``block_length`` set (the dual cache, ``blocks.py``), a step whose current block (the
   lowest block of response positions still holding a mask) is not the cached one is a
   BLOCK_REFRESH: the step graph over every response row, whose response K/V are kept; the
   block's later calls are BLOCK_STEPs: the step graph over the block's rows only, against
   [kept prompt ; cached K/V of the other response rows]. The first step after every
   prefill or refresh is a block refresh.
   With ``revote`` set, a step that ``revote.due`` names runs the re-vote graph instead,
   which also replaces every layer's kept entries (``maskkv_compile/revote.py``).
5. NEW: a call that continues no session is a new prompt. Its layout comes from its own
   mask tokens (see ``layout.py``; every row must hold one, else ``NoMaskTokenError``),
   where a *masked copy* row (CFG's unconditional row, in the same batch or sent in its own
   call right after the conditional one) takes its reference row's response. The prefill
   graph runs; the oldest session is dropped if there are too many.

Returned logits are (B, S, V) like the original model's: each row's response rows (and,
for Dream, the row before each response position, which holds its logits) carry the
model's logits, every other row zeros (the prompt is not recomputed). Inside
``response_logits_only()`` they are (B, R, V): position j holds the logits that predict
row b's j-th response token (already shifted for Dream), which needs every row to have
the same number of response positions. At a block step only the current block's response
rows carry logits; every other response row is zeros in both forms. Other outputs (e.g. hidden states) cover the rows
the graph computed: all rows at a prefill, the computed rows at a step. ``reset()`` drops
every session. Every transition is counted (``counts``) and logged at DEBUG.

Host reads (each one a synchronisation on CUDA): a STEP or BLOCK_STEP reads the device
once, in routing (every live session's evidence, ``Session.evidence``, stacked and read with
one ``tolist``); the step graph itself reads nothing, so it can be replayed as a CUDA graph.
What the host needs about a layout (lengths, the logits read plan, each row's response
positions for the dual cache) is read once when the layout is made, at the prefill or block
refresh. The prefill graph reads nothing under every policy but AdaKV and random (head budgets
are allocated on the device, selection scores computed for every row at once, and the kept
caches are flat, of a static size); the runtime then reads every layer's kept lengths at once,
to pad each head of a layer to the layer's largest (``LayerCache``), and the layout is read
when it is made. AdaKV's head allocation and the random scores read inside the prefill graph,
once per layer. ``tests/test_host_reads.py`` counts them.

Sessions live in the runtime of one dynamo graph. When dynamo recompiles (a new batch
size, changed guards), the new graph's runtime starts empty, so the next call is a prefill
of whatever it is given (``optimize`` marks the sequence dim the same way on every call,
so its own calls do not trigger this).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from maskkv_compile import blocks, revote
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.inductor import SEQ, InductorGraph
from maskkv_compile.kernels.select_kv import pad_kept
from maskkv_compile.layout import Layout, NoMaskTokenError, infer_layout
from maskkv_compile.passes import PREFILL_OUTPUTS_PER_LAYER, RESPONSE_KV_OUTPUTS_PER_LAYER
from maskkv_compile.passes.base import split_layer_outputs
from maskkv_compile.pipeline import MaskKVGraphs, build_graphs
from maskkv_compile.policies import format_budget_table

__all__ = ["MaskKVRuntime", "NoMaskTokenError", "padding", "response_logits_only"]

log = logging.getLogger("maskkv_compile.runtime")

_RESPONSE_ONLY = contextvars.ContextVar("maskkv_response_logits_only", default=False)
_KEY_VALID: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("maskkv_key_valid", default=None)


@contextlib.contextmanager
def response_logits_only():
    """Within this block MaskKV models return logits for the response rows only, (B, R, V)."""
    token = _RESPONSE_ONLY.set(True)
    try:
        yield
    finally:
        _RESPONSE_ONLY.reset(token)


@contextlib.contextmanager
def padding(key_valid: Optional[torch.Tensor]):
    """The (B, S) padding of the calls made in this block (False = padding); set by the
    optimized model from the caller's attention mask, which is not traced into the graphs."""
    token = _KEY_VALID.set(key_valid)
    try:
        yield
    finally:
        _KEY_VALID.reset(token)


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


@dataclass(eq=False)
class Session:
    layout: Layout
    ids: torch.Tensor  # (B, S) the tokens of the last call
    per_token: list[torch.Tensor]  # the other per-token inputs of the prefill, (B, S, ...)
    layers: list[LayerCache] = field(default_factory=list)
    steps_since_prefill: int = 0
    logits_buffer: Optional[torch.Tensor] = None  # (B, S, V) with config.reuse_logits
    block: Optional[blocks.BlockCache] = None  # the dual cache of the current block (block_length)
    block_note: Optional[str] = None  # why the dual cache does not apply to this session
    block_positions: Optional[torch.Tensor] = None  # (B, R) each row's response positions (block_length)
    tier: Optional[revote.SecondTier] = None  # with config.revote: the full prompt K/V (revote.py)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)

    @property
    def resp_idx(self) -> torch.Tensor:
        """The rows the step graph computes (the response rows, plus Dream's read rows)."""
        return self.layout.rows

    def evidence(self, ids: torch.Tensor, per_token: list[torch.Tensor], key_valid: torch.Tensor,
                 mask_token_id: int, block_length: Optional[int]) -> Optional[torch.Tensor]:
        """Whether the call continues this session, as a (3,) int64 tensor on the call's device:
        [continues, restarted, current block or -1], or None when host facts already rule it out
        (no prompt in some row, another shape or device). Computed without reading the device,
        so that routing reads it once per call (on CUDA each read is a synchronisation).

        continues: same padding, same tokens and per-token inputs at every prompt position;
        restarted: some response position that held a committed token at the last call holds
        the mask token again; current block: see ``blocks.current_block`` (-1 without blocks).
        """
        layout = self.layout
        if not (layout.has_prompt and ids.shape == self.ids.shape and ids.device == self.ids.device
                and all(x.shape == y.shape for x, y in zip(per_token, self.per_token))):
            return None
        prompt = layout.prompt  # (B, S)
        differs = (key_valid != layout.key_valid).any() | (prompt & (ids != self.ids)).any()
        for x, y in zip(per_token, self.per_token):
            at_prompt = prompt.view(*prompt.shape, *[1] * (x.dim() - 2))  # (B, S, 1, ...)
            differs = differs | (at_prompt & (x != y)).any()
        restarted = ((ids == mask_token_id) & (self.ids != mask_token_id) & layout.response).any()
        if self.block_positions is None:
            block = torch.full((), -1, dtype=torch.long, device=ids.device)
        else:
            block = blocks.current_block(ids, self.block_positions, mask_token_id, block_length)
        return torch.stack([(~differs).long(), restarted.long(), block])


@dataclass
class Counts:
    prefills: int = 0
    steps: int = 0
    transitions: Counter = field(default_factory=Counter)  # new, restart, refresh, step, block_refresh, block_step
    revotes: int = 0  # step calls that re-selected the hot cache (config.revote)


class MaskKVRuntime:
    """Callable with the captured graph's flat inputs; returns its flat outputs."""

    def __init__(self, graphs: MaskKVGraphs, config: MaskKVConfig, mask_token_id: int):
        self.graphs = graphs
        self.config = config
        self.mask_token_id = mask_token_id
        self.sessions: list[Session] = []
        self.counts = Counts()
        self.last_session: Optional[Session] = None
        names = [n.name for n in graphs.canonical.graph.nodes if n.op == "placeholder"]
        self.tokens_pos = names.index(graphs.info.tokens)
        self.per_token_pos = [names.index(name) for name in graphs.info.per_token]
        per_row = {name: (1,) for name in ("key_valid", "voter_valid", "prompt_valid", "resp_valid")}
        self._prefill = self._compile(graphs.prefill, {"resp_idx": (0,), "voter_idx": (0,), "prompt_idx": (0,), **per_row})
        step_dynamic = {"resp_idx": (0,), **per_row, **{f"kept_{kv}_{i}": (2,) for i in range(len(graphs.sites)) for kv in "kv"}}
        self._step = self._compile(graphs.step, step_dynamic)
        if graphs.revote is not None:  # the step graph that also re-selects (revote.py)
            self._revote = self._compile(graphs.revote, {**step_dynamic, **revote.dynamic_dims(len(graphs.sites))})

    @classmethod
    def from_graph(cls, gm, config: MaskKVConfig, mask_token_id: int) -> "MaskKVRuntime":
        return cls(build_graphs(gm, config), config, mask_token_id)

    def _compile(self, gm, dynamic_extra: dict):
        if self.config.backend == "eager":
            return gm
        info = self.graphs.info
        dynamic = {info.tokens: (1,), **{name: (1,) for name in info.per_token}, **{name: SEQ for name in info.seq_symbols},
                   **dynamic_extra}
        return InductorGraph(gm, dynamic, info.tokens)

    def reset(self) -> None:
        """Drop every session and start the counts afresh."""
        self.sessions.clear()
        self.last_session = None
        self.counts = Counts()

    # -- routing ---------------------------------------------------------------------------
    def _route(self, ids: torch.Tensor, per_token: list[torch.Tensor],
               key_valid: torch.Tensor) -> tuple[Session, str, Optional[int]]:
        """(session, transition, current block): transition is "new", "restart", "refresh" or
        "step"; the block (``blocks.current_block``) is None without the dual cache or when no
        mask is left. Every live session's evidence is read from the device at once."""
        candidates = [(s, e) for s in self.sessions
                      if (e := s.evidence(ids, per_token, key_valid, self.mask_token_id, self.config.block_length)) is not None]
        session = block = None
        if candidates:
            facts = torch.stack([e for _, e in candidates]).tolist()  # the call's one device read
            match = next((i for i, (continues, _, _) in enumerate(facts) if continues), None)
            if match is not None:
                session, (_, restarted, block) = candidates[match][0], facts[match]
                self.sessions.remove(session)
                if not restarted:
                    self.sessions.insert(0, session)
                    refresh = self.config.prompt_refresh
                    due = refresh is not None and session.steps_since_prefill + 1 >= refresh
                    return session, "refresh" if due else "step", None if block < 0 else block
        references = [(s.ids, s.layout) for s in self.sessions
                      if s.ids.shape == ids.shape and s.ids.device == ids.device and torch.equal(s.layout.key_valid, key_valid)]
        layout = infer_layout(ids, key_valid, self.mask_token_id, shift=self.config.logits_shift,
                              policy=self.config.policy, window=self.config.window, references=references)
        fresh = Session(layout, ids, [x.clone() for x in per_token])
        if self.config.block_length is not None:
            fresh.block_positions, fresh.block_note = blocks.response_positions(layout, self.config.block_length)
        if layout.has_prompt:
            self.sessions.insert(0, fresh)
            del self.sessions[self.config.max_sessions :]
        return fresh, "new" if session is None else "restart", None

    # -- execution -------------------------------------------------------------------------
    def __call__(self, *args):
        ids = args[self.tokens_pos]
        per_token = [args[i] for i in self.per_token_pos]
        key_valid = _KEY_VALID.get()
        if key_valid is None or key_valid.shape != ids.shape:
            key_valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        with torch.no_grad():
            session, transition, block = self._route(ids, per_token, key_valid)
            block_at = None  # (block index, response positions) at a block refresh
            if transition == "step" and block is not None:
                transition, block_at = self._block_transition(session, block)
            log.debug("%s: %s (prompt %s, response %s)", transition, tuple(ids.shape), session.layout.prompt_lens,
                      session.layout.response_lens)
            self.counts.transitions[transition] += 1
            if transition in ("step", "block_refresh", "block_step"):
                outputs = self._run_step(args, session, transition, block_at)
            else:
                outputs = self._run_prefill(args, session)
            session.ids = ids.clone()
        self.last_session = session
        return outputs

    def _per_row_inputs(self, layout: Layout) -> dict:
        return {"resp_idx": layout.rows, "key_valid": layout.key_valid, "resp_valid": layout.resp_valid,
                "voter_idx": layout.voter_idx, "voter_valid": layout.voter_valid,
                "prompt_idx": layout.prompt_idx, "prompt_valid": layout.prompt_valid}

    def _run_prefill(self, args, session: Session):
        extra = self._per_row_inputs(session.layout)
        if not session.layout.padded:  # (B, 0): no padding, a fact the ops then need not read
            extra["key_valid"] = session.layout.key_valid[:, :0]
        outputs = self._prefill(*args, *(extra[name] for name in self.graphs.prefill_inputs))
        if self.graphs.revote is not None:  # the second tier comes last
            outputs, session.tier = revote.take_tier(outputs, session.layout, len(self.graphs.sites), self.config.logits_shift,
                                                     self.config.second_tier)
        base, caches = split_layer_outputs(outputs, PREFILL_OUTPUTS_PER_LAYER, len(self.graphs.sites))
        session.layers = padded_caches(caches)
        session.steps_since_prefill = 0
        session.block = None  # the next step is a block refresh
        self.counts.prefills += 1
        logits = base[self.graphs.info.logits_index]
        if not self.graphs.head_sliced:
            logits = logits.index_select(1, session.layout.rows)
        return self._with_logits(base, logits, session)

    def _block_transition(self, session: Session, index: int) -> tuple[str, Optional[tuple]]:
        """("block_refresh", (index, positions)) when the call's current block is not the cached
        one, else ("block_step", None)."""
        if session.block is not None and session.block.index == index:
            return "block_step", None
        return "block_refresh", (index, session.block_positions)

    def _run_step(self, args, session: Session, transition: str = "step", block_at: Optional[tuple] = None):
        block = session.block if transition == "block_step" else None
        layout = block.layout if block is not None else session.layout
        extra = self._per_row_inputs(layout)
        for layer, cache in enumerate(session.layers):
            kept = block.layers[layer] if block is not None else (cache.kept_k, cache.kept_v, cache.kept_len)
            extra.update({f"kept_k_{layer}": kept[0], f"kept_v_{layer}": kept[1], f"kept_len_{layer}": kept[2]})
        if revote.due(self.config, session, transition):  # the re-vote graph replaces the hot cache
            masked = None
            if self.config.revote_voters == "masked":
                masked = revote.still_masked(session.tier, session.layout, args[self.tokens_pos], self.mask_token_id,
                                             self.config.logits_shift)
            extra.update(revote.graph_inputs(session.tier, masked))
            outputs = revote.take_selection(self._revote(*args, *(extra[name] for name in self.graphs.revote_inputs)),
                                            session, len(self.graphs.sites))
            self.counts.revotes += 1
        else:
            outputs = self._step(*args, *(extra[name] for name in self.graphs.step_inputs))
        if self.config.block_length is not None:  # the step graph also returns each layer's response K/V
            outputs, pairs = split_layer_outputs(outputs, RESPONSE_KV_OUTPUTS_PER_LAYER, len(self.graphs.sites))
            if block_at is not None:  # a block refresh: build the block's merged caches
                index, positions = block_at
                session.block = blocks.build_block_cache(index, self.config.block_length, session.layout, positions,
                                                         self.config.logits_shift, session.layers, pairs)
        session.steps_since_prefill += 1
        self.counts.steps += 1
        return self._with_logits(outputs, outputs[self.graphs.info.logits_index], session, block)

    def _with_logits(self, outputs, logits: torch.Tensor, session: Session, block: Optional[blocks.BlockCache] = None):
        """The (B, C, V) logits of the computed rows, as the caller's contract wants them."""
        layout = block.layout if block is not None else session.layout
        if _RESPONSE_ONLY.get():
            if layout.read_idx is None:
                raise ValueError(
                    f"response_logits_only() needs the same number of response positions in every row, got "
                    f"{layout.response_lens}; call without it to get (B, S, V) logits"
                )
            logits = _read_rows(logits, layout.read_plan)  # (B, R, V)
            if block is not None:  # (B, n, V) of the block -> (B, R, V), zeros outside it
                full = logits.new_zeros((logits.shape[0], session.layout.response_lens[0], logits.shape[-1]))
                full[:, block.start : block.stop] = logits
                logits = full
        else:
            if not layout.all_returned:  # rows computed for a batch mate are not this row's logits
                logits = logits.masked_fill(~layout.returned[..., None], 0)
            full = session.logits_buffer
            if full is None or full.dtype != logits.dtype:
                full = logits.new_zeros((*session.shape, logits.shape[-1]))  # (B, S, V)
                session.logits_buffer = full if self.config.reuse_logits else None
            full.index_copy_(1, layout.rows, logits)  # only the computed rows: the others stay zero
            logits = full
        outputs = list(outputs)
        outputs[self.graphs.info.logits_index] = logits
        return tuple(outputs)

    # -- introspection ---------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """What the last prompt's cache holds.

        prompt_len / response_len: the longest row's (``prompt_lens`` / ``response_lens``: each
        row's). Per layer, ``kept_per_kv_head`` is the first row's kept entries per KV head and
        ``kept_per_row`` every row's. bytes: held by the padded per-layer K/V tensors;
        valid_bytes: the kept entries alone (the difference is each layer's padding up to its
        largest row and head); uniform_bytes: a cache keeping min(budget, P_b) entries in every
        head of every row. prefills / steps / transitions: what this runtime has run so far;
        revotes: the step calls that re-selected (``revote``); second_tier: with ``revote``, the
        bytes of the full prompt K/V the session keeps outside the hot cache (``revote.stats``).
        """
        session = self.last_session
        if session is None:
            return {"prompt_len": 0, "response_len": 0, "layers": [], "bytes": 0, "valid_bytes": 0, "uniform_bytes": 0,
                    "prefills": self.counts.prefills, "steps": self.counts.steps}
        prompt_lens, response_lens = session.layout.prompt_lens, session.layout.response_lens
        layers = []
        for site, cache in zip(self.graphs.sites, session.layers):
            entry = (cache.kept_k.shape[-1] + cache.kept_v.shape[-1]) * cache.kept_k.element_size()  # one (k, v) pair
            kept = cache.kept_len.tolist()
            layers.append({
                "layer": site.layer,
                "module": site.module_path,
                "kept_per_kv_head": kept[0],
                "kept_per_row": kept,
                "padded_to": int(cache.kept_k.shape[2]),
                "bytes": cache.kept_k.nbytes + cache.kept_v.nbytes,
                "valid_bytes": int(cache.kept_len.sum()) * entry,
                "uniform_bytes": site.kv_heads * sum(min(self.config.budget, p) for p in prompt_lens) * entry,
            })
        return {
            "policy": self.config.policy,
            "prompt_len": max(prompt_lens),
            "response_len": max(response_lens),
            "prompt_lens": prompt_lens,
            "response_lens": response_lens,
            "layers": layers,
            **{key: sum(layer[key] for layer in layers) for key in ("bytes", "valid_bytes", "uniform_bytes")},
            "prefills": self.counts.prefills,
            "steps": self.counts.steps,
            "transitions": dict(self.counts.transitions),
            "block_cache": self._block_stats(session),
            "revotes": self.counts.revotes,
            "second_tier": revote.stats(session.tier),
        }

    def _block_stats(self, session: Session) -> Optional[dict]:
        """The dual cache (None without ``block_length``): current block, response columns it
        covers, bytes of the merged per-layer caches, and why it does not apply, if so."""
        if self.config.block_length is None:
            return None
        block = session.block
        return {"block_length": self.config.block_length, "current_block": None if block is None else block.index,
                "columns": None if block is None else (block.start, block.stop),
                "bytes": 0 if block is None else block.bytes, "note": session.block_note}

    def budget_table(self) -> str:
        """Layers x KV heads kept, for the first row of the last prompt."""
        session = self.last_session
        return format_budget_table([cache.kept_len[0] for cache in session.layers]) if session else "(no prompt yet)"


def _read_rows(logits: torch.Tensor, plan: tuple[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """(B, C, V) logits of the computed rows -> (B, R, V), by the layout's ``read_plan``: the
    common layouts are a view or one index_select instead of a gather over B x R x V elements."""
    kind, index = plan
    if kind == "all":
        return logits
    if kind == "select":
        return logits.index_select(1, index)
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
