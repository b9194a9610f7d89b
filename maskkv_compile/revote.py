"""Re-selection while decoding (``MaskKVConfig.revote``): the second tier and when to re-vote.

One-shot Mask-Voting chooses the kept prompt entries once, with the queries of step 0, which
know nothing of the tokens decoded later. With ``revote`` set:

* **Second tier.** The prefill graph also returns each layer's post-RoPE prompt K/V
  (``KeepPromptKVPass``: (B, Hkv, P, D) at ``layout.prompt_idx``). The session keeps them
  outside the hot cache: on the model's device (``second_tier="device"``), or in host memory
  (``"host"``: page-locked when the model is on CUDA; copied out once per prefill, and into
  the device at each re-vote, asynchronously on the current stream, the device copies dropped
  when the re-vote is done). On a CPU model both are ordinary memory.
  ``cache_stats()["second_tier"]`` reports their bytes and where they are, apart from the hot
  cache's, which stays at the budget. They live and die with the session (dropped with it, by
  ``reset()``, by a new prompt that pushes it out, and replaced at every prefill or prompt
  refresh).
* **Re-vote step.** A step call that is due (``due``) runs the *re-vote graph* instead of the
  step graph: the same computation, where before each layer's cached attention
  ``maskkv::revote_kv`` lets the step's own queries of the voting rows vote over that layer's
  whole prompt (softmax over [prompt ; response keys], as at the prefill), the policy ranks
  the votes (``maskkv::selection_scores``), and the top entries per (row, KV head) under the
  prefill's per-head budgets (``kept_len``) become the layer's hot cache; the layer then
  attends to them. Layer l votes with the queries that layers < l produced from their new
  selections: exactly what this step computes. Positions stay absolute; no prompt row is
  recomputed. Cost: one scoring of the voting rows against P keys per layer (and a top-k of
  P scores per KV head), against a prompt refresh's forward over every prompt row.
* **Voters.** At a re-vote every policy votes with the response rows (Dream: the row before
  each response position), the queries a step computes; prompt queries (SnapKV's window) are
  not recomputed. So a re-voting SnapKV is SnapKV's pooling and budgets with the response
  queries' votes; StreamingLLM's and random's selections ignore votes and do not change.
  ``revote_voters="masked"`` narrows the voters to the rows whose position is still the mask
  token in the call (``still_masked``), as at the prefill; a row with no mask left keeps every
  voter.
* **Schedule.** ``revote=k``: the k-th, 2k-th, ... step call after each prefill or prompt
  refresh. ``revote="block"``: every block refresh of the dual cache (``dual_cache.py``), whose
  merged cache is then built from the new selection. ``cache_stats()["revotes"]`` counts them.

With the whole prompt kept (budget >= prompt), a re-vote keeps every entry, in order: the
hot cache, and every output, are bit-equal to a plain step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from maskkv_compile.block_diffusion import block_voters, extend_budgets
from maskkv_compile.layout import Layout
from maskkv_compile.policies import voter_positions
from maskkv_compile.routing import Plan
from maskkv_compile.session import Call, Feature, Session


@dataclass
class SecondTier:
    """A session's full prompt K/V per layer, and the voting rows of its re-votes."""

    prompt_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, Hkv, P, D) each
    prompt_pos: torch.Tensor  # (P,) absolute positions of the prompt columns
    prompt_valid: torch.Tensor  # (B, P)
    voter_idx: torch.Tensor  # (Rv,) indices into layout.rows of the voting queries
    voter_valid: torch.Tensor  # (B, Rv)
    revotes: int = 0  # re-votes run from this tier

    @property
    def bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.prompt_kv)


def voters(layout: Layout, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Rv,) indices into ``layout.rows`` of the rows that vote at a re-vote, (B, Rv) per row:
    each row's response positions (``shift`` rows earlier, Dream), padding excluded, the rule
    Mask-Voting uses at the prefill."""
    rows = layout.rows
    per_row = []
    for b in range(layout.response.shape[0]):
        prompt = layout.prompt[b].nonzero().flatten().cpu()
        response = layout.response[b].nonzero().flatten().cpu()
        v = voter_positions("mask_voting_uniform", prompt, response, 1, -shift).to(rows.device)
        per_row.append(v[layout.key_valid[b, v]])
    union = torch.unique(torch.cat(per_row))
    local = torch.searchsorted(rows, union)
    computed = rows[local.clamp(max=rows.numel() - 1)] == union
    if not bool(computed.all()):  # a voter the step does not compute
        raise RuntimeError(
            f"re-vote voters {union.tolist()} are not all computed rows {rows.tolist()}"
        )
    return local, torch.stack([torch.isin(union, v) for v in per_row])


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in host memory: itself if it is there, else a page-locked copy, written
    asynchronously on the current stream (a later copy back on that stream runs after it)."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def still_masked(
    tier: SecondTier, layout: Layout, ids: torch.Tensor, mask_token_id: int, shift: int
) -> torch.Tensor:
    """(B, Rv): whether the position each voter predicts (its row + ``shift``) is still the mask
    token in ``ids`` (B, S). Computed on the device; nothing is read."""
    positions = (layout.rows.index_select(0, tier.voter_idx) + shift).clamp(
        max=ids.shape[1] - 1
    )  # (Rv,)
    return ids.index_select(1, positions) == mask_token_id


def graph_inputs(tier: SecondTier, masked: Optional[torch.Tensor] = None) -> dict:
    """The re-vote graph's inputs beyond the step graph's: the tier on the device of the
    session's layout (a host tier is copied in here; the copies die with the call). With
    ``masked`` (B, Rv) only those voters vote, except in a row where none is left."""
    device = tier.prompt_pos.device
    voter_valid = tier.voter_valid
    if masked is not None:
        narrowed = voter_valid & masked
        voter_valid = torch.where(narrowed.any(1, keepdim=True), narrowed, voter_valid)
    extra = {"revoter_idx": tier.voter_idx, "revoter_valid": voter_valid}
    for layer, (k, v) in enumerate(tier.prompt_kv):
        extra[f"prompt_k_{layer}"] = k.to(device, non_blocking=True)
        extra[f"prompt_v_{layer}"] = v.to(device, non_blocking=True)
        extra[f"prompt_pos_{layer}"] = tier.prompt_pos
        extra[f"prompt_valid_{layer}"] = tier.prompt_valid
    return extra


def dynamic_dims(n_layers: int, per_head: bool) -> dict:
    """The dims of the re-vote graph's extra inputs that vary from prompt to prompt (Inductor):
    the second tier's (``per_head`` False) or block diffusion's per-head candidates'."""
    dims = {"revoter_idx": (0,), "revoter_valid": (1,)}
    for layer in range(n_layers):
        dims[f"prompt_k_{layer}"] = dims[f"prompt_v_{layer}"] = (2,)
        dims[f"prompt_pos_{layer}"] = (2,) if per_head else (0,)
        dims[f"prompt_valid_{layer}"] = (2,) if per_head else (1,)
    return dims


def stats(tier: Optional[SecondTier]) -> Optional[dict]:
    """``cache_stats()["second_tier"]``: None without ``revote``."""
    if tier is None:
        return None
    first = tier.prompt_kv[0][0] if tier.prompt_kv else tier.prompt_pos
    return {
        "bytes": tier.bytes,
        "layers": [k.nbytes + v.nbytes for k, v in tier.prompt_kv],
        "prompt_len": int(tier.prompt_pos.numel()),
        "revotes": tier.revotes,
        "device": str(first.device),
        "pinned": bool(first.is_pinned()) if first.device.type == "cpu" else False,
    }


@dataclass
class RevoteState:
    tier: Optional[SecondTier] = None  # replaced at every prefill


class Revote(Feature):
    """Re-selection as a runtime feature (``config.revote``): the prefill keeps the second tier
    (graph outputs "prompt_kv"); a step whose plan says ``revote`` runs the "revote" graph, whose
    outputs "reselected" replace every layer's kept entries."""

    name = "revote"

    def __init__(self, shift: int, where: str, voters_rule: str, mask_token_id: int, budget: int):
        self.shift = shift
        self.budget = budget
        self.where = where
        self.voters_rule = voters_rule
        self.mask_token_id = mask_token_id

    def start(self, session: Session) -> None:
        session.state[self.name] = RevoteState()
        return None

    def _voters(self, session: Session) -> tuple[torch.Tensor, torch.Tensor]:
        if session.layout.block_start is None:
            return voters(session.layout, self.shift)
        return block_voters(session.layout, session.masked)

    def prefill_outputs(self, session: Session, named: dict) -> None:
        pairs = named["prompt_kv"]
        if self.where == "host":
            pairs = [(to_host(k), to_host(v)) for k, v in pairs]
        idx, valid = self._voters(session)
        layout = session.layout
        session.state[self.name].tier = SecondTier(
            pairs, layout.prompt_idx, layout.prompt_valid, idx, valid
        )

    def extend(self, session: Session, finished: Layout, response_kv: list) -> bool:
        """Block diffusion: the finished block joins the second tier (the whole prefix), and the
        new block's step re-selects from it (``Plan.revote`` is set at every EXTEND). A head
        whose budget held its whole prefix holds the finished block too; every other head keeps
        its budget."""
        tier = session.state[self.name].tier
        if tier is None:
            return False
        rows = finished.rows  # (C,)
        grow = finished.resp_valid.sum(1)  # (B,) real rows of the finished block
        whole = tier.prompt_valid.sum(1)  # (B,) the prefix each row had
        pairs = []
        for (k, v), (fk, fv) in zip(tier.prompt_kv, response_kv):
            fk, fv = fk.to(k.device), fv.to(v.device)
            pairs.append((torch.cat([k, fk.to(k.dtype)], 2), torch.cat([v, fv.to(v.dtype)], 2)))
        tier.prompt_kv = pairs
        tier.prompt_pos = torch.cat([tier.prompt_pos, rows])
        tier.prompt_valid = torch.cat([tier.prompt_valid, finished.resp_valid], 1)
        tier.voter_idx, tier.voter_valid = self._voters(session)
        layers = []
        for cache in session.layers:
            budget = extend_budgets(cache.kept_len, whole, grow, self.budget)
            # read for their padded length only (the re-vote writes the entries): as wide as
            # the largest budget, so a bounded cache stays as wide as it was
            extra = max(int(budget.max()) - cache.kept_k.shape[2], 0)
            layers.append(
                dataclasses.replace(
                    cache,
                    kept_k=torch.nn.functional.pad(cache.kept_k, (0, 0, 0, extra)),
                    kept_v=torch.nn.functional.pad(cache.kept_v, (0, 0, 0, extra)),
                    kept_len=budget,
                )
            )
        session.layers = layers
        return True

    def step_graph(self, session: Session, plan: Plan, call: Call, inputs: dict) -> Optional[str]:
        tier = session.state[self.name].tier
        if not plan.revote or tier is None:
            return None
        masked = None
        if self.voters_rule == "masked":
            masked = still_masked(tier, session.layout, call.ids, self.mask_token_id, self.shift)
        inputs.update(graph_inputs(tier, masked))
        return "revote"

    def step_outputs(self, session: Session, plan: Plan, named: dict) -> None:
        if "reselected" not in named:
            return
        for layer, (k, v, length, pos) in enumerate(named["reselected"]):
            session.layers[layer] = dataclasses.replace(
                session.layers[layer], kept_k=k, kept_v=v, kept_len=length, kept_pos=pos
            )
        session.state[self.name].tier.revotes += 1

    def stats(self, session: Optional[Session]) -> dict:
        return {"second_tier": None if session is None else stats(session.state[self.name].tier)}
