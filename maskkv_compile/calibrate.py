"""``calibrate(model, prompts)``: the offline layer-importance profile MaskKV allocates by.

For every calibration prompt (with ``gen_length`` masks appended, as at step 0 of a
generation) it runs the model once through a graph in which CaptureResidualPass exposes the
residual stream before and after each attention sub-layer, and measures
``I_l = 1 - mean_i cos(h_in[i], h_out[i])``. The mean over prompts is the profile.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from maskkv_compile._torch_private import mark_dynamic
from maskkv_compile.passes import FindAttentionPass, PassManager, UnsupportedModelError, analyse
from maskkv_compile.passes.capture_residual import CaptureResidualPass
from maskkv_compile.pipeline import copy_graph_module
from maskkv_compile.profile import LayerProfile, attention_importance, model_fingerprint


class _CalibrationBackend:
    """Runs the model's graph with (h_in, h_out) of every layer as extra outputs, records them."""

    def __init__(self):
        self.measurements: list[list[float]] = []

    def __call__(self, gm, example_inputs):
        analyse(gm)
        graph = copy_graph_module(gm)
        manager = PassManager("calibration", [FindAttentionPass(), CaptureResidualPass()])
        manager(graph)
        find, residual = (record.result for record in manager.records)
        problems = find.skipped + residual.skipped
        if problems or find.matches == 0 or residual.matches != find.matches:
            raise UnsupportedModelError(
                "calibration cannot find every attention sub-layer: "
                + "; ".join(problems or ("no attention found",))
            )
        n_outputs = len(graph.graph.find_nodes(op="output")[0].args[0]) - 2 * find.matches

        def run(*args):
            outputs = graph(*args)
            pairs = outputs[n_outputs:]
            self.measurements.append(
                [attention_importance(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
            )
            return tuple(outputs[:n_outputs])

        return run


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    prompts: Iterable[torch.Tensor],
    *,
    gen_length: int = 64,
    mask_token_id: Optional[int] = None,
    progress: bool = True,
) -> LayerProfile:
    """Measure the layer profile of ``model`` on ``prompts`` ((1, P) or (P,) token ids each)."""
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
    backend = _CalibrationBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional

        def tqdm(items, **_):
            return items

    model.eval()
    for prompt in tqdm(prompts, desc="calibrating MaskKV layer profile", disable=not progress):
        x = torch.cat(
            [
                prompt,
                torch.full(
                    (prompt.shape[0], gen_length), token, dtype=prompt.dtype, device=prompt.device
                ),
            ],
            1,
        )
        mark_dynamic(x, 1)
        compiled(input_ids=x, use_cache=False)
    fingerprint = model_fingerprint(getattr(model, "config", model), type(model).__name__)
    return LayerProfile.from_measurements(backend.measurements, fingerprint, gen_length=gen_length)
