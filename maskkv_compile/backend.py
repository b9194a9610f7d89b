"""The ``maskkv`` torch.compile backend.

``torch.compile(model, backend="maskkv", dynamic=True, options={"budget": 256, ...})``
works without importing maskkv_compile first: pyproject registers ``maskkv_backend`` under
the ``torch_dynamo_backends`` entry point. Each graph dynamo hands over becomes a
:class:`~maskkv_compile.runtime.MaskKVRuntime` (one per batch size / guard set).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from maskkv_compile.config import MaskKVConfig, MaskKVConfigError
from maskkv_compile.passes import UnsupportedModelError, analyse
from maskkv_compile.runtime import MaskKVRuntime


class MaskKVBackend:
    """A dynamo backend bound to one config; keeps the runtimes it built."""

    def __init__(self, config: MaskKVConfig, mask_token_id: Optional[int] = None):
        self.config = config
        self.mask_token_id = mask_token_id if mask_token_id is not None else config.mask_token_id
        self.runtimes: list[MaskKVRuntime] = []

    def __call__(self, gm, example_inputs):
        if self.mask_token_id is None:
            raise MaskKVConfigError(
                "mask_token_id is not set: pass options={'mask_token_id': <id>} (LLaDA: 126336), "
                "or use maskkv_compile.optimize(model), which reads it from model.config"
            )
        if isinstance(analyse(gm).seq_expr, int):
            raise UnsupportedModelError(
                "the sequence length was traced as a constant; MaskKV needs it symbolic. Compile with "
                "torch.compile(model, backend='maskkv', dynamic=True) or call "
                "torch._dynamo.mark_dynamic(input_ids, 1) before the first call"
            )
        runtime = MaskKVRuntime.from_graph(gm, self.config, self.mask_token_id)
        self.runtimes.append(runtime)
        return runtime


def maskkv_backend(gm, example_inputs, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None):
    """Entry point for ``backend="maskkv"``; torch passes options/mode only when set."""
    if mode is not None:
        raise MaskKVConfigError(f"the maskkv backend takes no mode= (got {mode!r}); pass options={{...}} instead")
    return MaskKVBackend(MaskKVConfig.from_options(options))(gm, example_inputs)
