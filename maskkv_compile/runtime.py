"""The MaskKV runtime: runs, call by call, the plan ``routing.decide`` makes.

A *session* is one prompt's cache (``session.py``): its
:class:`~maskkv_compile.layout.Layout` (each row's prompt, response and padding, and the rows
the step computes), the tokens of the call that last used it, each layer's kept K/V, the
weights it was prefilled with, and the state of each feature. Up to
``config.max_sessions`` live at once, most recent first.

Each call goes through three stages, each in one place:

1. **Facts** (``_facts``): for every live session (and every recently dropped one) a few
   0-d device tensors (continues, restarted, the dual cache's current block and off-grid
   commit), stacked and read with one ``tolist``; and the weight signature, from tensor
   metadata (``session.weight_signature``).
2. **Decision** (``routing.decide``): a pure function of the sessions' states and the
   facts; every rule is written there, in order, with its reason.
3. **Execution**: a prefill (NEW, RESTART, REFRESH, UNCACHED) or a step (STEP,
   BLOCK_REFRESH, BLOCK_STEP), with the features (``dual_cache.DualCache``,
   ``revote.Revote``, ``block_diffusion.BlockReselect``, ``block_buffer.BlockBufferCache``)
   plugged in at their hooks (``session.Feature``). Graph inputs and
   outputs are found by name (``passes.base.append_outputs``), never by position.

Returned logits are (B, S, V) like the original model's: each row's response rows (and,
for Dream, the row before each response position, which holds its logits) carry the
model's logits, every other row zeros (the prompt is not recomputed). Inside
``response_logits_only()`` they are (B, R, V): position j holds the logits that predict
row b's j-th response token (already shifted for Dream), which needs every row to have
the same number of response positions. At a block step only the current block's response
rows carry logits; every other response row is zeros in both forms. Other outputs (e.g.
hidden states) cover the rows the graph computed: all rows at a prefill, the computed rows
at a step. ``reset()`` drops every session. Every transition is counted (``counts``) and
logged at DEBUG; every fallback (``routing.Fallback``) is counted and warned once.

Host reads (each one a synchronisation on CUDA): a STEP or BLOCK_STEP reads the device
once, in routing; the step graph itself reads nothing, so it can be replayed as a CUDA
graph. What the host needs about a layout is read once when the layout is made. The prefill
graph reads nothing under every policy but AdaKV and random; the runtime then reads every
layer's kept lengths at once, to pad each head of a layer to the layer's largest
(``session.padded_caches``). ``tests/test_host_reads.py`` counts them.

One runtime serves every batch size its dynamo graph admits (a graph traced with a symbolic
batch serves them all; Inductor artifacts are keyed by the batch size too).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from maskkv_compile.block_buffer import BlockBufferCache, call_kind
from maskkv_compile.block_diffusion import (
    BlockReselect,
    append_block,
    finished_columns,
    finished_rows,
)
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.dual_cache import DualCache
from maskkv_compile.inductor import SEQ, InductorGraph
from maskkv_compile.layout import Layout, NoMaskTokenError, block_layout, infer_layout
from maskkv_compile.logits_buffers import LogitsBuffers
from maskkv_compile.masks import read_model_masks
from maskkv_compile.passes.base import output_groups, split_outputs
from maskkv_compile.passes.graph_info import UnsupportedModelError, is_weight
from maskkv_compile.pipeline import MaskKVGraphs, build_graphs
from maskkv_compile.policies import format_budget_table
from maskkv_compile.revote import Revote
from maskkv_compile.revote import dynamic_dims as revote_dynamic_dims
from maskkv_compile.routing import (
    CallFacts,
    Fallback,
    Plan,
    Schedule,
    SessionFacts,
    SessionState,
    Transition,
    decide,
    new_prompt,
)
from maskkv_compile.session import Call, LayerCache, Session, padded_caches, weight_signature

__all__ = [
    "CacheFallbackWarning",
    "LayerCache",
    "MaskKVRuntime",
    "NoMaskTokenError",
    "Transition",
    "padding",
    "response_logits_only",
]

log = logging.getLogger("maskkv_compile.runtime")

_RESPONSE_ONLY = contextvars.ContextVar("maskkv_response_logits_only", default=False)
_KEY_VALID: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(
    "maskkv_key_valid", default=None
)
_KEY_END: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(
    "maskkv_key_end", default=None
)
_OWNER: contextvars.ContextVar[Optional[weakref.ref]] = contextvars.ContextVar(
    "maskkv_owner", default=None
)


class CacheFallbackWarning(UserWarning):
    """A call ran slower than the cached path (``routing.Fallback`` says why); warned once per
    reason and runtime, counted in ``cache_stats()["fallbacks"]`` every time."""


@contextlib.contextmanager
def response_logits_only():
    """Within this block MaskKV models return logits for the response rows only, (B, R, V)."""
    token = _RESPONSE_ONLY.set(True)
    try:
        yield
    finally:
        _RESPONSE_ONLY.reset(token)


@contextlib.contextmanager
def owned_by(cache) -> Iterator[None]:
    """The calls made in this block are a loop's that keeps its own cache object ``cache``
    (``kv_loop.py``): they go on with sessions of that object only."""
    token = _OWNER.set(None if cache is None else weakref.ref(cache))
    try:
        yield
    finally:
        _OWNER.reset(token)


@contextlib.contextmanager
def padding(key_valid: Optional[torch.Tensor], key_end: Optional[torch.Tensor] = None):
    """The (B, S) padding of the calls made in this block (False = padding), and the (S,) block
    ends of a block-causal call (``masks.read_mask``); set by the optimized model from the
    caller's attention mask, which is not traced into the graphs."""
    tokens = _KEY_VALID.set(key_valid), _KEY_END.set(key_end)
    try:
        yield
    finally:
        _KEY_VALID.reset(tokens[0])
        _KEY_END.reset(tokens[1])


@dataclass
class Counts:
    prefills: int = 0
    steps: int = 0
    transitions: Counter = field(default_factory=Counter)  # Transition values -> calls
    revotes: int = 0  # step calls that re-selected the hot cache (config.revote)
    reselects: int = 0  # block steps that re-selected over [kept prefix ; finished block]
    fallbacks: Counter = field(default_factory=Counter)  # Fallback names -> calls

    def add(self, other: "Counts") -> "Counts":
        return Counts(
            self.prefills + other.prefills,
            self.steps + other.steps,
            self.transitions + other.transitions,
            self.revotes + other.revotes,
            self.reselects + other.reselects,
            self.fallbacks + other.fallbacks,
        )


class MaskKVRuntime:
    """Callable with the captured graph's flat inputs; returns its flat outputs."""

    def __init__(self, graphs: MaskKVGraphs, config: MaskKVConfig, mask_token_id: int):
        self.graphs = graphs
        self.config = config
        self.mask_token_id = mask_token_id
        self.sessions: list[Session] = []
        self.dropped: list[
            Session
        ] = []  # sessions pushed out by max_sessions, without their caches
        self.counts = Counts()
        self.last_session: Optional[Session] = (
            None  # the session the last call ran on (None: uncached)
        )
        self._warned: set[Fallback] = set()
        self._model_masks: dict = {}  # (B, S, device) -> block ends of the model's own mask
        info = graphs.info
        placeholders = [n for n in graphs.canonical.graph.nodes if n.op == "placeholder"]
        names = [n.name for n in placeholders]
        self.tokens_pos = names.index(info.tokens)
        self.per_token_pos = [names.index(name) for name in info.per_token]
        self.seq_pos = [names.index(name) for name in info.seq_symbols]  # SymInts equal to S
        fixed = {self.tokens_pos, *self.per_token_pos}
        tensors = [
            i
            for i, n in enumerate(placeholders)
            if isinstance(n.meta.get("example_value", n.meta.get("val")), torch.Tensor)
            and i not in fixed
        ]
        self.weight_pos = [i for i in tensors if is_weight(names[i])]
        self.other_pos = [i for i in tensors if not is_weight(names[i])]
        self.routing = Schedule(prompt_refresh=config.prompt_refresh, revote=config.revote)
        # in hook order: Fast-dLLM v2's block cache first, so a re-selecting graph wins over its
        # step_kv (it returns the K/V too); re-selection before the dual cache, so the dual
        # cache merges the new selection
        self.block_buffer = BlockBufferCache()
        self.features = [self.block_buffer]
        if config.revote is not None:
            self.features.append(
                Revote(
                    config.logits_shift,
                    config.second_tier,
                    config.revote_voters,
                    mask_token_id,
                    config.budget,
                )
            )
        else:  # block diffusion re-selects over [kept prefix ; finished block] instead
            self.features.append(BlockReselect(config.budget))
        if config.block_length is not None:
            self.features.append(DualCache(config.block_length, config.logits_shift, mask_token_id))
        self.dual = next((f for f in self.features if isinstance(f, DualCache)), None)
        per_row = {
            name: (1,) for name in ("key_valid", "voter_valid", "prompt_valid", "resp_valid")
        }
        step_dynamic = {
            "resp_idx": (0,),
            "row_end": (0,),
            **per_row,
            **{f"kept_{kv}_{i}": (2,) for i in range(len(graphs.sites)) for kv in "kv"},
        }
        self._graphs = {
            "prefill": (
                self._compile(
                    graphs.prefill,
                    {
                        "resp_idx": (0,),
                        "voter_idx": (0,),
                        "prompt_idx": (0,),
                        "key_end": (0,),
                        "rows_key_end": (0,),
                        **per_row,
                    },
                ),
                graphs.prefill_inputs,
                output_groups(graphs.prefill),
            ),
            "step": (
                self._compile(graphs.step, step_dynamic),
                graphs.step_inputs,
                output_groups(graphs.step),
            ),
        }
        # the step graph that also returns each layer's K/V of the computed rows (extend); the
        # step graph itself when the dual cache already made it so
        self._graphs["step_kv"] = (
            self._graphs["step"]
            if graphs.step_kv is graphs.step
            else (
                self._compile(graphs.step_kv, step_dynamic),
                graphs.step_inputs,
                output_groups(graphs.step_kv),
            )
        )
        # the step graph that also re-selects: from the second tier ("revote", revote.py) or,
        # without one, from each head's [kept prefix ; finished block] ("reselect",
        # block_diffusion.py); compiled on its first run only
        per_head = config.revote is None
        dynamic = {**step_dynamic, **revote_dynamic_dims(len(graphs.sites), per_head)}
        self._graphs["reselect" if per_head else "revote"] = (
            self._compile(graphs.revote, dynamic),
            graphs.revote_inputs,
            output_groups(graphs.revote),
        )

    def compiled(self, graph: str):
        """The runnable of one graph ("prefill", "step", "revote"): an ``InductorGraph`` (its
        ``compiles`` counts Inductor compiles) or, with the eager backend, the GraphModule."""
        return self._graphs[graph][0]

    @classmethod
    def from_graph(cls, gm, config: MaskKVConfig, mask_token_id: int) -> "MaskKVRuntime":
        return cls(build_graphs(gm, config), config, mask_token_id)

    def _compile(self, gm, dynamic_extra: dict):
        if self.config.backend == "eager":
            return gm
        info = self.graphs.info
        dynamic = {
            info.tokens: (1,),
            **{name: (1,) for name in info.per_token},
            **{name: SEQ for name in info.seq_symbols},
            **dynamic_extra,
        }
        return InductorGraph(gm, dynamic, info.tokens)

    def reset(self) -> None:
        """Drop every session and start the counts afresh."""
        self.sessions.clear()
        self.dropped.clear()
        self.last_session = None
        self.counts = Counts()

    # -- 1. facts ---------------------------------------------------------------------------
    def _call(self, args) -> Call:
        ids = args[self.tokens_pos]
        key_valid = _KEY_VALID.get()
        if key_valid is None or key_valid.shape != ids.shape:
            key_valid = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        key_end = _KEY_END.get()
        if key_end is not None and key_end.shape != ids.shape[1:]:
            key_end = None
        if key_end is None and self.graphs.mask_fn is not None:
            key_end = self._model_mask(args, ids)
        return Call(
            args,
            ids,
            [args[i] for i in self.per_token_pos],
            [args[i] for i in self.other_pos],
            key_valid,
            weight_signature([args[i] for i in self.weight_pos]),
            ids == self.mask_token_id,
            key_end,
            _OWNER.get(),
        )

    def _model_mask(self, args, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """(S,) block ends of the mask the model builds from the length inside its forward
        (``graphs.mask_fn``, run on the call's inputs), read once per batch size and length."""
        key = (*ids.shape, ids.device)
        if key not in self._model_masks:
            end = read_model_masks(self.graphs.mask_fn(*args), *ids.shape)
            if end is None and self._blocks_beyond(args, ids):
                # a window of one block (a prompt shorter than the block): nothing to cache
                end = torch.full((ids.shape[1],), ids.shape[1], dtype=torch.long)
            if len(self._model_masks) >= 8:
                self._model_masks.pop(next(iter(self._model_masks)))
            self._model_masks[key] = None if end is None else end.to(ids.device)
        return self._model_masks[key]

    def _blocks_beyond(self, args, ids: torch.Tensor) -> bool:
        """Whether a mask the model builds that hides nothing at this length (S) is one block of
        a model that makes blocks: at twice the length and more (up to 512), it is block-causal
        with the first S positions in its first block. An all-open mask at every length is
        plain bidirectional attention (BERT-style code that builds a mask of ones). The mask
        depends on the length alone (``mask_proofs.length_only``), so the longer calls get
        zeros of the longer length for the per-token inputs (and the length for S's SymInts)."""
        batch, seq = ids.shape
        length = 2 * seq
        while length <= max(2 * seq, 512):
            longer = list(args)
            for i in (self.tokens_pos, *self.per_token_pos):
                arg = args[i]  # (B, S, ...) -> (B, length, ...)
                longer[i] = arg.new_zeros((arg.shape[0], length, *arg.shape[2:]))
            for i in self.seq_pos:  # the SymInts equal to S
                longer[i] = length
            try:
                end = read_model_masks(self.graphs.mask_fn(*longer), batch, length)
            except (UnsupportedModelError, ValueError):  # refused at a length this call
                return False  # does not have: no evidence of blocks
            if end is not None:
                return bool((end[:seq] >= seq).all())
            length *= 2
        return False

    def _facts(self, call: Call) -> tuple[list[Optional[SessionFacts]], Optional[Fallback]]:
        """Every live session's facts, and whether the call continues a dropped session, from
        one read of the device."""
        pending, keys = [], []  # 0-d tensors to read; per session the names of its facts
        for session in (*self.sessions, *self.dropped):
            if session.may_extend(call):  # another shape: a block window grown, or nothing
                keys.append(["extends", "agrees"])
                pending += [session.extends(call), session.agrees(call)]
                continue
            if not session.matches(call):
                keys.append(None)
                continue
            facts = {
                "continues": session.continues(call),
                "restarted": session.restarted(call),
                "agrees": session.agrees(call),
            }
            for feature in self.features if session in self.sessions else ():
                facts.update(feature.evidence(session, call))
            keys.append(list(facts))
            pending += facts.values()
        values = iter(torch.stack([v.long() for v in pending]).tolist() if pending else [])
        read = []
        for key in keys:
            read.append(None if key is None else dict(zip(key, (next(values) for _ in key))))
        live, dropped = read[: len(self.sessions)], read[len(self.sessions) :]
        facts = [
            None
            if f is None
            else SessionFacts(
                continues=bool(f.get("continues", 0)),
                restarted=bool(f.get("restarted", 0)),
                extends=bool(f.get("extends", 0)),
                agrees=bool(f.get("agrees", 1)),
                current_block=f["current_block"] if f.get("current_block", -1) >= 0 else None,
                off_grid=bool(f.get("off_grid", 0)),
            )
            for f in live
        ]
        came_back = any(f is not None and (f.get("continues") or f.get("extends")) for f in dropped)
        return facts, Fallback.SESSION_DROPPED if came_back else None

    def _state(self, session: Session) -> SessionState:
        dual = self.dual is not None and self.dual.active(session)
        return SessionState(
            session.steps_since_prefill,
            self.dual.cached_block(session) if dual else None,
            dual,
            session.weights,
            buffer_held=self.block_buffer.holds(session),
        )

    # -- 2. decision, 3. execution ------------------------------------------------------------
    def __call__(self, *args):
        with torch.no_grad():
            call = self._call(args)
            facts, dropped = self._facts(call)
            plan = decide(
                [self._state(s) for s in self.sessions],
                facts,
                CallFacts(call.weights, dropped, block_buffer=call_kind()),
                self.routing,
            )
            session, plan = self._session_for(plan, call)
            if log.isEnabledFor(logging.DEBUG):  # the lengths are host reads of a new layout
                log.debug(
                    "%s: %s (prompt %s, response %s)",
                    plan.transition.value,
                    tuple(call.ids.shape),
                    session.layout.prompt_lens,
                    session.layout.response_lens,
                )
            self.counts.transitions[plan.transition.value] += 1
            if plan.fallback is not None:
                self._fall_back(plan.fallback)
            if plan.transition.is_prefill:
                outputs = self._run_prefill(call, session)
            elif plan.transition is Transition.EXTEND:
                outputs = self._run_extend(call, session, plan)
            else:
                outputs = self._run_step(call, session, plan)
            session.ids, session.masked = call.ids.clone(), call.masked
        self.last_session = session if plan.transition is not Transition.UNCACHED else None
        return outputs

    def _session_for(self, plan: Plan, call: Call) -> tuple[Session, Plan]:
        """The session the plan runs on: a live one, or a new one (which may turn the plan
        UNCACHED)."""
        live = list(self.sessions)
        if plan.stale:
            # their prefill ran with other weights: never continued, never a CFG reference
            self.sessions = [s for i, s in enumerate(live) if i not in plan.stale]
        if plan.session is not None and plan.transition is not Transition.RESTART:
            session = live[plan.session]
            self.sessions.remove(session)
            self.sessions.insert(0, session)
            return session, plan
        # a new prompt, or a restart: a new session; a restarted one stays, for the generation
        # that left it (``routing.py``, rule 3)
        layout = self._new_layout(call)
        plan = new_prompt(
            plan,
            layout.has_prompt,
            block=layout.block_start is not None,
            block_not_last=layout.masks_outside_block,
            block_without_masks=layout.block_start is not None
            and not bool((call.masked & layout.response).any()),
        )
        session = Session(
            layout,
            call.ids,
            call.masked,
            [x.clone() for x in call.per_token],
            [x.clone() for x in call.others],
            call.weights,
            owner=call.owner,
        )
        for feature in self.features:
            fallback = feature.start(session)
            if fallback is not None and plan.transition is not Transition.UNCACHED:
                self._fall_back(fallback)
        if plan.transition is not Transition.UNCACHED:
            self.sessions.insert(0, session)
            for old in self.sessions[
                self.config.max_sessions :
            ]:  # remembered without caches, to say why
                self.dropped.insert(
                    0,
                    Session(
                        old.layout,
                        old.ids,
                        old.masked,
                        old.per_token,
                        old.others,
                        old.weights,
                        owner=old.owner,
                    ),
                )
            del self.sessions[self.config.max_sessions :]
            del self.dropped[self.config.max_sessions :]
        return session, plan

    def _new_layout(self, call: Call) -> Layout:
        """The layout of a new prompt; CFG's unconditional half sent in its own call is read as a
        masked copy of the previous call's session only (``layout.py``)."""

        def same(s: Session) -> bool:
            return (
                s.ids.shape == call.ids.shape
                and s.ids.device == call.ids.device
                and torch.equal(s.layout.key_valid, call.key_valid)
            )

        if call.key_end is not None:
            return block_layout(
                call.ids,
                call.key_valid,
                call.key_end,
                self.mask_token_id,
                policy=self.config.policy,
                window=self.config.window,
                shift=self.config.logits_shift,
            )
        previous = (
            self.last_session
            if self.last_session in self.sessions and same(self.last_session)
            else None
        )
        others = [(s.ids, s.layout) for s in self.sessions if s is not previous and same(s)]
        return infer_layout(
            call.ids,
            call.key_valid,
            self.mask_token_id,
            shift=self.config.logits_shift,
            policy=self.config.policy,
            window=self.config.window,
            previous=None if previous is None else (previous.ids, previous.layout),
            others=others,
        )

    def _fall_back(self, fallback: Fallback) -> None:
        self.counts.fallbacks[fallback.name.lower()] += 1
        if fallback not in self._warned:
            self._warned.add(fallback)
            warnings.warn(f"maskkv_compile: {fallback.value}", CacheFallbackWarning, stacklevel=2)

    def _run(self, graph: str, args: tuple, inputs: dict) -> tuple[tuple, dict]:
        """Run a graph; (the model's own outputs, output group -> per-layer tuples)."""
        fn, names, groups = self._graphs[graph]
        return split_outputs(fn(*args, *(inputs[name] for name in names)), groups)

    @staticmethod
    def _per_row_inputs(layout: Layout) -> dict:
        return {
            "resp_idx": layout.rows,
            "key_valid": layout.key_valid,
            "resp_valid": layout.resp_valid,
            "row_end": layout.row_end,
            "voter_idx": layout.voter_idx,
            "voter_valid": layout.voter_valid,
            "prompt_idx": layout.prompt_idx,
            "prompt_valid": layout.prompt_valid,
            "key_end": layout.key_end
            if layout.key_end is not None
            else layout.rows.new_zeros((0,)),  # (S,) or (0,): no blocks
        }

    def _run_prefill(self, call: Call, session: Session):
        layout = session.layout
        inputs = self._per_row_inputs(layout)
        if not layout.padded:  # (B, 0): no padding, a fact the ops then need not read
            inputs["key_valid"] = layout.key_valid[:, :0]
        # the computed rows' block ends (R,) or (0,): the prefill's last attention computes
        # those rows only (passes/prune_tail_rows.py)
        ends = inputs["key_end"]  # (S,) or (0,)
        inputs["rows_key_end"] = ends[layout.rows] if ends.numel() else ends
        base, named = self._run("prefill", call.args, inputs)
        session.layers = padded_caches(named["kept"])
        session.steps_since_prefill = 0
        session.weights = call.weights
        for feature in self.features:
            feature.prefill_outputs(session, named)
        self.counts.prefills += 1
        logits = base[self.graphs.info.logits_index]
        if not self.graphs.head_sliced:
            logits = logits.index_select(1, session.layout.rows)
        return self._with_logits(base, logits, session)

    def _run_extend(self, call: Call, session: Session, plan: Plan):
        """The window grew by one block (``block_diffusion.py``): the finished block's rows once
        with their final tokens, their K/V appended to every layer's kept prefix (or, with
        ``revote``, to the second tier, from which the new block's step re-selects), then the
        new block as a step."""
        old, seq = session.layout, session.ids.shape[1]
        args = list(call.args)
        for i in (self.tokens_pos, *self.per_token_pos):
            args[i] = args[i][:, :seq]  # the old window, with the finished block's final tokens
        for i in self.seq_pos:
            args[i] = seq
        inputs = self._per_row_inputs(old)
        for layer, cache in enumerate(session.layers):
            inputs.update(
                {
                    f"kept_k_{layer}": cache.kept_k,
                    f"kept_v_{layer}": cache.kept_v,
                    f"kept_len_{layer}": cache.kept_len,
                }
            )
        _, named = self._run("step_kv", tuple(args), inputs)
        session.layout = self._new_layout(call)
        _ = session.layout.has_prompt  # its host facts read here, not at the window's next step
        session.ids, session.masked = call.ids.clone(), call.masked
        session.per_token = [x.clone() for x in call.per_token]
        # the old computed rows that join the prefix: all of them, but for a shifted family the
        # last, which the new block computes again (``layout.block_layout``)
        finished, kv = finished_rows(old, session.layout, named["response_kv"])
        taken = False
        for feature in self.features:
            taken = feature.extend(session, finished, kv) or taken
        if not taken:
            columns, counts = finished_columns(finished.resp_valid)
            session.layers = [
                append_block(cache, k, v, columns, counts, finished.rows)
                for cache, (k, v) in zip(session.layers, kv)
            ]
        return self._run_step(call, session, plan)

    def _run_step(self, call: Call, session: Session, plan: Plan):
        view = None
        for feature in self.features:
            view = feature.step_view(session, plan) or view
        layout = session.layout if view is None else view.layout
        inputs = self._per_row_inputs(layout)
        kept = (
            [(c.kept_k, c.kept_v, c.kept_len) for c in session.layers]
            if view is None
            else view.kept
        )
        for layer, (k, v, length) in enumerate(kept):
            inputs.update({f"kept_k_{layer}": k, f"kept_v_{layer}": v, f"kept_len_{layer}": length})
        graph = "step"
        for feature in self.features:
            graph = feature.step_graph(session, plan, call, inputs) or graph
        base, named = self._run(graph, call.args, inputs)
        for feature in self.features:
            feature.step_outputs(session, plan, named)
        self.counts.revotes += graph == "revote"
        self.counts.reselects += graph == "reselect"
        session.steps_since_prefill += 1
        self.counts.steps += 1
        return self._with_logits(
            base, base[self.graphs.info.logits_index], session, None if view is None else view.block
        )

    def _with_logits(self, outputs, logits: torch.Tensor, session: Session, block=None):
        """The (B, C, V) logits of the computed rows, as the caller's contract wants them."""
        layout = block.layout if block is not None else session.layout
        if _RESPONSE_ONLY.get():
            if layout.read_idx is None:
                raise ValueError(
                    "response_logits_only() needs the same number of response positions in every "
                    f"row, got {layout.response_lens}; call without it to get (B, S, V) logits"
                )
            logits = _read_rows(logits, layout.read_plan)  # (B, R, V)
            if block is not None:  # (B, n, V) of the block -> (B, R, V), zeros outside it
                full = logits.new_zeros(
                    (logits.shape[0], session.layout.response_lens[0], logits.shape[-1])
                )
                full[:, block.start : block.stop] = logits
                logits = full
        else:
            if not layout.all_returned:  # rows computed for a batch mate are not this row's logits
                logits = logits.masked_fill(~layout.returned[..., None], 0)
            if session.logits is None:
                session.logits = LogitsBuffers(shared=self.config.reuse_logits)
            logits = session.logits.fill((*session.shape, logits.shape[-1]), layout.rows, logits)
        outputs = list(outputs)
        outputs[self.graphs.info.logits_index] = logits
        return tuple(outputs)

    # -- introspection ---------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """What the last prompt's cache holds, and what this runtime has run.

        prompt_len / response_len: the longest row's (``prompt_lens`` / ``response_lens``: each
        row's). Per layer, ``kept_per_kv_head`` is the first row's kept entries per KV head and
        ``kept_per_row`` every row's. bytes: held by the padded per-layer K/V tensors;
        valid_bytes: the kept entries alone (the difference is each layer's padding up to its
        largest row and head); uniform_bytes: a cache keeping min(budget, P_b) entries in every
        head of every row. prefills / steps / transitions: what this runtime has run so far;
        fallbacks: calls slower than the cached path, by reason (``routing.Fallback``); revotes:
        the step calls that re-selected (``revote``); reselects: the block-diffusion steps that
        re-selected over [kept prefix ; finished block] (``block_diffusion.BlockReselect``);
        second_tier: with ``revote``, the bytes of
        the full prompt K/V the session keeps outside the hot cache; block_cache: with
        ``block_length``, the dual cache of the current block; block_buffer: under Fast-dLLM
        v2's block cache, the block rows' K/V held for its buffer and the session's refreshes
        and small-block steps (``block_buffer.py``).
        """
        session = self.last_session
        stats = {
            "policy": self.config.policy,
            "config": self.config.describe(),
            "layer_allocation": self.config.layer_allocation,
            "prompt_len": 0,
            "response_len": 0,
            "layers": [],
            "bytes": 0,
            "valid_bytes": 0,
            "uniform_bytes": 0,
            **self.count_stats(self.counts),
            "block_cache": None,
            "second_tier": None,
        }
        for feature in self.features:
            stats.update(feature.stats(session))
        if session is None:
            return stats
        prompt_lens, response_lens = session.layout.prompt_lens, session.layout.response_lens
        layers = []
        for site, cache in zip(self.graphs.sites, session.layers):
            entry = (
                cache.kept_k.shape[-1] + cache.kept_v.shape[-1]
            ) * cache.kept_k.element_size()  # one (k, v) pair
            kept = cache.kept_len.tolist()
            layers.append(
                {
                    "layer": site.layer,
                    "module": site.module_path,
                    "kept_per_kv_head": kept[0],
                    "kept_per_row": kept,
                    "padded_to": int(cache.kept_k.shape[2]),
                    "bytes": cache.kept_k.nbytes + cache.kept_v.nbytes,
                    "valid_bytes": int(cache.kept_len.sum()) * entry,
                    "uniform_bytes": site.kv_heads
                    * sum(min(self.config.budget, p) for p in prompt_lens)
                    * entry,
                }
            )
        stats.update(
            {
                "prompt_len": max(prompt_lens),
                "response_len": max(response_lens),
                "prompt_lens": prompt_lens,
                "response_lens": response_lens,
                "layers": layers,
                **{
                    key: sum(layer[key] for layer in layers)
                    for key in ("bytes", "valid_bytes", "uniform_bytes")
                },
            }
        )
        return stats

    @staticmethod
    def count_stats(counts: Counts) -> dict:
        return {
            "prefills": counts.prefills,
            "steps": counts.steps,
            "transitions": dict(counts.transitions),
            "revotes": counts.revotes,
            "reselects": counts.reselects,
            "fallbacks": dict(counts.fallbacks),
        }

    def budget_table(self) -> str:
        """Layers x KV heads kept, for the first row of the last prompt."""
        session = self.last_session
        return (
            format_budget_table([cache.kept_len[0] for cache in session.layers])
            if session
            else "(no prompt yet)"
        )


def _read_rows(logits: torch.Tensor, plan: tuple[str, Optional[torch.Tensor]]) -> torch.Tensor:
    """(B, C, V) logits of the computed rows -> (B, R, V), by the layout's ``read_plan``: the
    common layouts are a view or one index_select instead of a gather over B x R x V elements."""
    kind, index = plan
    if kind == "all":
        return logits
    if kind == "select":
        return logits.index_select(1, index)
    return logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
