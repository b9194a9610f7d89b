"""The MaskKV runtime: decides, call by call, between the prefill and the step graph.

How a call is routed (the drop-in contract). ``ids`` is the (B, S) token input:

1. A *session* is one prompt's cache: the response positions ``resp_idx`` (where ``ids``
   held the mask token when the session began), the prompt tokens at every other position,
   and each layer's kept K/V. Up to ``config.max_sessions`` are kept, most recent first.
2. A call belongs to a session when it has the same shape and device and the same tokens
   at all of the session's prompt positions (so masks can only be at response positions),
   and the same values there in every other per-token input (token_type_ids, ...).
   Among several, the one with the longest prompt wins.
3. No session: a new prompt. It must contain the mask token (else ``NoMaskTokenError``),
   at the same columns in every row of the batch; those columns become ``resp_idx``. The
   prefill graph runs; the oldest session is dropped if there are too many.
4. A session, and every response position still holds the mask token: this is a step-0
   input again (a new generation of the same prompt), so the prefill graph runs afresh.
5. A session, and this call is the ``prompt_refresh``-th since its prefill (every call
   with ``prompt_refresh=1``): the prefill graph runs again on the current tokens; the
   prompt K/V are recomputed and re-selected, the voters being the session's response
   positions (masked or already committed).
6. Otherwise the step graph runs: only the response rows are computed.

Returned logits are (B, S, V) like the original model's; the response rows hold the
model's logits and the prompt rows hold zeros (the prompt is not recomputed). Inside
``response_logits_only()`` the logits are (B, R, V), the response rows in position order.
Other outputs (e.g. a returned KV cache) cover the rows the graph computed: all rows
at a prefill, the response rows at a step. ``reset()`` drops every session.

Sessions live in the runtime of one dynamo graph. When dynamo recompiles (a new batch
size, changed guards), the new graph's runtime starts empty, so the next call is a prefill
of whatever it is given (``optimize`` marks the sequence dim the same way on every call,
so its own calls do not trigger this).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Optional

import torch

from maskkv_compile.policies import format_budget_table, voter_positions
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.inductor import SEQ, InductorGraph
from maskkv_compile.pipeline import MaskKVGraphs, build_graphs
from maskkv_compile.passes import PREFILL_OUTPUTS_PER_LAYER

_RESPONSE_ONLY = contextvars.ContextVar("maskkv_response_logits_only", default=False)


class NoMaskTokenError(ValueError):
    """A new prompt reached the model without any mask token to fill."""


@contextlib.contextmanager
def response_logits_only():
    """Within this block MaskKV models return logits for the response rows only, (B, R, V)."""
    token = _RESPONSE_ONLY.set(True)
    try:
        yield
    finally:
        _RESPONSE_ONLY.reset(token)


@dataclass
class LayerCache:
    kept_k: torch.Tensor  # (B, Hkv, Kmax, D)
    kept_v: torch.Tensor  # (B, Hkv, Kmax, Dv)
    kept_len: torch.Tensor  # (Hkv,)
    kept_pos: torch.Tensor  # (B, Hkv, Kmax), -1 in the padding
    prompt_mass: torch.Tensor  # (B, H)


@dataclass(eq=False)
class Session:
    shape: tuple[int, int]
    device: torch.device
    resp_idx: torch.Tensor  # (R,)
    prompt_idx: torch.Tensor  # (P,)
    prompt_tokens: torch.Tensor  # (B, P)
    prompt_inputs: list[torch.Tensor]  # other per-token inputs at the prompt positions
    layers: list[LayerCache] = field(default_factory=list)
    steps_since_prefill: int = 0

    def matches(self, ids: torch.Tensor, per_token: list[torch.Tensor]) -> bool:
        return (
            tuple(ids.shape) == self.shape
            and ids.device == self.device
            and bool((ids.index_select(1, self.prompt_idx) == self.prompt_tokens).all())
            and all(torch.equal(x.index_select(1, self.prompt_idx), y) for x, y in zip(per_token, self.prompt_inputs))
        )


@dataclass
class Counts:
    prefills: int = 0
    steps: int = 0


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
        self._prefill = self._compile(graphs.prefill, {"resp_idx": (0,), "voter_idx": (0,), "prompt_idx": (0,)})
        self._step = self._compile(
            graphs.step, {"resp_idx": (0,), **{f"kept_{kv}_{i}": (2,) for i in range(len(graphs.sites)) for kv in "kv"}}
        )

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
        self.sessions.clear()
        self.last_session = None

    # -- routing ---------------------------------------------------------------------------
    def _route(self, ids: torch.Tensor, per_token: list[torch.Tensor]) -> tuple[Session, bool]:
        """(session, run_prefill)."""
        matching = [s for s in self.sessions if s.matches(ids, per_token)]
        if matching:
            session = max(matching, key=lambda s: s.prompt_idx.numel())
            self.sessions.remove(session)
            self.sessions.insert(0, session)
            all_masked = bool((ids.index_select(1, session.resp_idx) == self.mask_token_id).all())
            refresh = self.config.prompt_refresh
            due = refresh is not None and session.steps_since_prefill + 1 >= refresh
            return session, all_masked or due
        session = self._new_session(ids, per_token)
        self.sessions.insert(0, session)
        del self.sessions[self.config.max_sessions :]
        return session, True

    def _new_session(self, ids: torch.Tensor, per_token: list[torch.Tensor]) -> Session:
        masked = ids == self.mask_token_id  # (B, S)
        if not bool(masked.any()):
            raise NoMaskTokenError(
                f"no mask token (id {self.mask_token_id}) in the input of shape {tuple(ids.shape)}: the first call "
                "for a prompt must hold the mask token at every position to generate. Check mask_token_id, or "
                "call the original model for a plain forward pass."
            )
        if not bool((masked == masked[:1]).all()):
            raise ValueError(
                "the rows of the batch have their mask tokens at different positions; MaskKV shares one response "
                "layout across a batch. Call the model once per layout (e.g. classifier-free guidance's "
                "unconditional rows separately)."
            )
        column = masked[0]
        return Session(
            shape=tuple(ids.shape),
            device=ids.device,
            resp_idx=column.nonzero().flatten(),
            prompt_idx=(~column).nonzero().flatten(),
            prompt_tokens=ids[:, ~column].clone(),
            prompt_inputs=[x[:, ~column].clone() for x in per_token],
        )

    # -- execution -------------------------------------------------------------------------
    def __call__(self, *args):
        ids = args[self.tokens_pos]
        per_token = [args[i] for i in self.per_token_pos]
        with torch.no_grad():
            session, prefill = self._route(ids, per_token)
            outputs = self._run_prefill(args, session) if prefill else self._run_step(args, session)
        self.last_session = session
        return outputs

    def _run_prefill(self, args, session: Session):
        cfg = self.config
        voter_idx = voter_positions(cfg.policy, session.prompt_idx, session.resp_idx, cfg.window, cfg.vote_shift)
        extra = {"resp_idx": session.resp_idx, "voter_idx": voter_idx.to(session.device), "prompt_idx": session.prompt_idx}
        outputs = self._prefill(*args, *(extra[name] for name in self.graphs.prefill_inputs))
        split = len(outputs) - PREFILL_OUTPUTS_PER_LAYER * len(self.graphs.sites)  # original outputs, then caches
        base, caches = outputs[:split], outputs[split:]
        session.layers = [
            LayerCache(*caches[i : i + PREFILL_OUTPUTS_PER_LAYER]) for i in range(0, len(caches), PREFILL_OUTPUTS_PER_LAYER)
        ]
        session.steps_since_prefill = 0
        self.counts.prefills += 1
        logits = base[self.graphs.info.logits_index]
        if not self.graphs.head_sliced:
            logits = logits.index_select(1, session.resp_idx)
        return self._with_logits(base, logits, session)

    def _run_step(self, args, session: Session):
        extra = {"resp_idx": session.resp_idx}
        for layer, cache in enumerate(session.layers):
            extra.update({f"kept_k_{layer}": cache.kept_k, f"kept_v_{layer}": cache.kept_v, f"kept_len_{layer}": cache.kept_len})
        outputs = self._step(*args, *(extra[name] for name in self.graphs.step_inputs))
        session.steps_since_prefill += 1
        self.counts.steps += 1
        return self._with_logits(outputs, outputs[self.graphs.info.logits_index], session)

    def _with_logits(self, outputs, logits: torch.Tensor, session: Session):
        """Put the (B, R, V) response logits back at their rows, unless response-only."""
        if not _RESPONSE_ONLY.get():
            batch, seq_len = session.shape
            full = logits.new_zeros((batch, seq_len, logits.shape[-1]))
            full[:, session.resp_idx] = logits
            logits = full
        outputs = list(outputs)
        outputs[self.graphs.info.logits_index] = logits
        return tuple(outputs)

    # -- introspection ---------------------------------------------------------------------
    def cache_stats(self) -> dict:
        """What the last prompt's cache holds.

        bytes: held by the padded per-layer K/V tensors; valid_bytes: the kept entries alone
        (sum of head budgets x entry size; the difference is each layer's padding up to its
        largest head); uniform_bytes: a cache keeping min(budget, P) entries in every head.
        """
        session = self.last_session
        if session is None:
            return {"prompt_len": 0, "response_len": 0, "layers": [], "bytes": 0, "valid_bytes": 0, "uniform_bytes": 0}
        prompt_len = int(session.prompt_idx.numel())
        layers = []
        for site, cache in zip(self.graphs.sites, session.layers):
            batch, _, _, dk = cache.kept_k.shape
            entry = batch * (dk + cache.kept_v.shape[-1]) * cache.kept_k.element_size()  # one (k, v) pair, all rows
            layers.append({
                "layer": site.layer,
                "module": site.module_path,
                "kept_per_kv_head": cache.kept_len.tolist(),
                "padded_to": int(cache.kept_k.shape[2]),
                "bytes": cache.kept_k.nbytes + cache.kept_v.nbytes,
                "valid_bytes": int(cache.kept_len.sum()) * entry,
                "uniform_bytes": site.kv_heads * min(self.config.budget, prompt_len) * entry,
            })
        return {
            "policy": self.config.policy,
            "prompt_len": prompt_len,
            "response_len": int(session.resp_idx.numel()),
            "layers": layers,
            **{key: sum(layer[key] for layer in layers) for key in ("bytes", "valid_bytes", "uniform_bytes")},
            "prefills": self.counts.prefills,
            "steps": self.counts.steps,
        }

    def budget_table(self) -> str:
        session = self.last_session
        return format_budget_table([cache.kept_len for cache in session.layers]) if session else "(no prompt yet)"
