"""maskkv_compile: MaskKV prompt-KV eviction for diffusion LLMs, as a torch.compile pass.

    model = maskkv_compile.optimize(model, budget=256)
    out = model.generate(prompt_ids, gen_length=128, steps=128, block_length=32)

    compiled = torch.compile(
        model, backend="maskkv", options={"budget": 256, "mask_token_id": 126336}
    )
    maskkv_compile.runtimes(compiled)   # the MaskKV runtimes that ran for it

This imports the core alone (API, config, runtime, pipeline, passes, kernels). The tools
load on first use: ``maskkv_compile.explain`` (graph diffs, SVG and HTML) and
``maskkv_compile.calibrate`` are looked up lazily; bench, evaluation and the CLI are never
imported by the core. docs/architecture.md draws the layers.
"""

import importlib
import sys
import types

from maskkv_compile.api import MaskKVModel, optimize
from maskkv_compile.backend import runtimes
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError, Revote
from maskkv_compile.passes import UnsupportedModelError
from maskkv_compile.policies import (
    AdaKV,
    AllVoting,
    MaskKV,
    MaskVotingUniform,
    Policy,
    PromptVoting,
    PyramidKV,
    Random,
    SnapKV,
    SqueezeAttention,
    StreamingLLM,
)
from maskkv_compile.profile import LayerProfile, ProfileMismatchError
from maskkv_compile.runtime import CacheFallbackWarning, NoMaskTokenError, response_logits_only

__all__ = [
    "CacheFallbackWarning",
    "LayerProfile",
    "MaskKVConfig",
    "MaskKVConfigError",
    "MaskKVModel",
    "NoMaskTokenError",
    "ProfileMismatchError",
    "UnsupportedModelError",
    "calibrate",
    "explain",
    "optimize",
    "response_logits_only",
    "runtimes",
    "Revote",
    "Policy",
    "MaskKV",
    "MaskVotingUniform",
    "SnapKV",
    "PromptVoting",
    "AllVoting",
    "StreamingLLM",
    "Random",
    "PyramidKV",
    "SqueezeAttention",
    "AdaKV",
]
__version__ = "0.1.0"

_LAZY = {
    "calibrate": "maskkv_compile.calibrate",
    "explain": "maskkv_compile.explain",
}  # public name -> its module


def __getattr__(name: str):
    """The tool entry points, imported on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``maskkv_compile.explain`` is the function even when the module of the same name was
    imported first (``from maskkv_compile.explain import Report``): the import system's
    ``setattr(package, "explain", <module>)`` is not let to hide it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
