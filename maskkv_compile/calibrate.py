"""``calibrate(model, prompts)``: the offline layer-importance profile MaskKV allocates by.

For every calibration prompt (with ``gen_length`` masks appended, as at step 0 of a
generation; for a block-diffusion model, ``block_length=b``: masks to the end of the prompt's
last block, called block-causally, as a block loop's first window) it runs the model once
through a graph in which CaptureResidualPass exposes the residual stream before and after each
attention sub-layer, and measures
``I_l = 1 - mean_i cos(h_in[i], h_out[i])``. The same graph also holds CaptureVotesPass's
votes of the mask queries at every site, from which it measures each layer's attention-coverage
curve: the share of the mask queries' attention that each KV head's top-k prompt entries hold,
at ``k`` in :data:`COVERAGE_K` (``MaskKV(layers="coverage")`` allocates by it). The means over
prompts are the profile.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from maskkv_compile import _torch_private
from maskkv_compile.config import MaskKVConfig
from maskkv_compile.passes import FindAttentionPass, PassManager, UnsupportedModelError, analyse
from maskkv_compile.passes.base import extra_inputs
from maskkv_compile.passes.capture_residual import CaptureResidualPass
from maskkv_compile.passes.capture_votes import CaptureVotesPass
from maskkv_compile.passes.mask_padding import MaskPaddingPass
from maskkv_compile.pipeline import copy_graph_module
from maskkv_compile.profile import LayerProfile, attention_importance, model_fingerprint

# entry counts the coverage curves are measured at: every k up to 16, then 4 points per doubling
COVERAGE_K = tuple(sorted(set(range(17)) | {round(16 * 2 ** (i / 4)) for i in range(1, 29)}))


def coverage_curve(votes: torch.Tensor, n_voters: int) -> torch.Tensor:
    """(len(COVERAGE_K),) float64: the mean over rows and KV heads of the share of the voters'
    whole attention held by each head's top-k prompt entries. ``votes``: (B, Hkv, P), one
    site's mask votes, which sum each voter's softmax probabilities over the heads of a KV
    group, so a head's total is at most ``n_voters * group``."""
    sorted_votes = votes.double().sort(-1, descending=True).values  # (B, Hkv, P)
    cum = torch.cat([sorted_votes.new_zeros(*votes.shape[:2], 1), sorted_votes.cumsum(-1)], -1)
    at = torch.tensor(COVERAGE_K).clamp(max=votes.shape[-1])
    return cum[..., at].mean((0, 1)) / n_voters  # (K,)


class _CalibrationBackend:
    """Runs the model's graph with (h_in, h_out) and the mask votes of every layer as extra
    outputs, records the layer importances and coverage curves."""

    def __init__(self, block_length: Optional[int] = None):
        self.measurements: list[list[float]] = []
        self.coverage: list[torch.Tensor] = []  # one (layers, K) tensor per prompt
        self.block_length = block_length  # None: bidirectional calls
        self.prompt_len = 0  # set by calibrate() before each call, with the call's ids
        self.ids: Optional[torch.Tensor] = None

    def __call__(self, gm, example_inputs):
        analyse(gm)
        graph = copy_graph_module(gm)
        original = len(graph.graph.find_nodes(op="placeholder"))
        manager = PassManager(
            "calibration",
            [
                FindAttentionPass(),
                MaskPaddingPass(),
                CaptureResidualPass(),
                CaptureVotesPass(MaskKVConfig()),
            ],
        )
        manager(graph)
        find, _, residual, _ = (record.result for record in manager.records)
        problems = find.skipped + residual.skipped
        if problems or find.matches == 0 or residual.matches != find.matches:
            raise UnsupportedModelError(
                "calibration cannot find every attention sub-layer: "
                + "; ".join(problems or ("no attention found",))
            )
        sites = [node for node in graph.graph.nodes if "maskkv_votes" in node.meta]
        n_outputs = len(graph.graph.find_nodes(op="output")[0].args[0]) - 2 * find.matches
        votes = tuple(node.meta["maskkv_votes"][0] for node in sites)
        out = graph.graph.find_nodes(op="output")[0]
        out.args = (tuple(out.args[0]) + votes,)
        graph.recompile()
        added = extra_inputs(graph, original)

        def run(*args):
            seq = self.ids.shape[1]
            positions = torch.arange(seq, device=self.ids.device)
            block, prefix, key_end = self.block_length, self.prompt_len, positions[:0]
            if block is not None:  # the earlier blocks vote; each query sees its own block too
                prefix = self.prompt_len // block * block
                key_end = (positions // block + 1) * block
            extra = {
                "voter_idx": positions[self.prompt_len :],
                "prompt_idx": positions[:prefix],
                "key_end": key_end,
            }  # key_valid / voter_valid / prompt_valid: None (no padding)
            outputs = graph(*args, *(extra.get(name) for name in added))
            pairs = outputs[n_outputs : n_outputs + 2 * find.matches]
            self.measurements.append(
                [attention_importance(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
            )
            n_voters = seq - self.prompt_len
            self.coverage.append(
                torch.stack(
                    [coverage_curve(v, n_voters).cpu() for v in outputs[n_outputs + len(pairs) :]]
                )
            )
            return tuple(outputs[:n_outputs])

        return run


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    prompts: Iterable[torch.Tensor],
    *,
    gen_length: Optional[int] = None,
    mask_token_id: Optional[int] = None,
    block_length: Optional[int] = None,
    progress: bool = True,
) -> LayerProfile:
    """Measure the layer profile of ``model`` on ``prompts`` ((1, P) or (P,) token ids each),
    with ``gen_length`` masks appended (default 64). A block-diffusion model (``block_length``:
    its blocks, on the grid from position 0) is measured as its block loop's first window
    calls it: the prompt and masks to the end of the block that holds the first mask (so
    ``gen_length`` does not apply), block-causal attention, the block's masks voting over the
    earlier blocks. A DiffusionGemma model has no mask token:
    its first canvas is the voters, and its full-attention layers are the profile's
    (``maskkv_compile.diffusion_gemma.calibrate``; ``gen_length`` and ``mask_token_id`` do not
    apply)."""
    from maskkv_compile.diffusion_gemma import calibrate as calibrate_canvas
    from maskkv_compile.diffusion_gemma import is_diffusion_gemma

    if is_diffusion_gemma(model):
        if gen_length is not None or mask_token_id is not None:
            raise ValueError(
                "calibrate on DiffusionGemma: its voters are the model's own canvas "
                f"(config.canvas_length={model.config.canvas_length}) and it has no mask token; "
                "leave gen_length and mask_token_id unset"
            )
        return calibrate_canvas(model, list(prompts))
    if block_length is not None and (gen_length is not None or block_length < 1):
        raise ValueError(
            f"calibrate with block_length={block_length}: the window ends with the prompt's "
            "block (leave gen_length unset), and a block is at least one token"
        )
    gen_length = 64 if gen_length is None else gen_length
    token = (
        mask_token_id
        if mask_token_id is not None
        else getattr(getattr(model, "config", None), "mask_token_id", None)
    )
    if token is None:
        raise ValueError("calibrate needs mask_token_id (the model config has none)")
    prompts = [p if p.dim() == 2 else p[None] for p in prompts]
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    backend = _CalibrationBackend(block_length)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional

        def tqdm(items, **_):
            return items

    model.eval()
    for prompt in tqdm(prompts, desc="calibrating MaskKV layer profile", disable=not progress):
        p = prompt.shape[1]
        masks = gen_length if block_length is None else (p // block_length + 1) * block_length - p
        tail = torch.full((prompt.shape[0], masks), token, dtype=prompt.dtype, device=prompt.device)
        x = torch.cat([prompt, tail], 1)
        _torch_private.mark_dynamic(x, 1)
        backend.ids, backend.prompt_len = x, p
        compiled(input_ids=x, use_cache=False)
    fingerprint = model_fingerprint(getattr(model, "config", model), type(model).__name__)
    return LayerProfile.from_measurements(
        backend.measurements,
        fingerprint,
        coverage=backend.coverage,
        coverage_k=COVERAGE_K,
        **({"gen_length": gen_length} if block_length is None else {"block_length": block_length}),
    )
