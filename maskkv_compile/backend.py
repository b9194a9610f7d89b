"""The ``maskkv`` torch.compile backend.

    compiled = torch.compile(
        model, backend="maskkv", options={"budget": 256, "mask_token_id": 126336}
    )
    for step in range(steps):
        logits = compiled(x).logits          # an unmodified denoising loop
    maskkv_compile.runtimes(compiled)        # the MaskKV runtimes that ran (raises if none)

``backend="maskkv"`` works without importing maskkv_compile first: pyproject registers
``maskkv_backend`` under the ``torch_dynamo_backends`` entry point. Each graph dynamo hands
over becomes a :class:`~maskkv_compile.runtime.MaskKVRuntime` (one per batch size / guard
set), after two rewrites of the captured graph:

1. ``SpecializeScalarsPass``: under ``dynamic=True`` dynamo makes the model's Python floats
   (the attention scale) graph inputs; they become constants again, and every call checks
   that those inputs still hold the compiled values.
2. ``SymbolicLengthPass``, only when the sequence length was traced as a constant (the first
   call without ``dynamic=True`` / ``mark_dynamic``): the graph is made symbolic in it and
   verified at other lengths, so the runtime specialises to that length's dynamo graph; a
   second length makes dynamo recompile (dynamically, by its automatic-dynamic rule).

The mode: a ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune",
"max-autotune-no-cudagraphs", ...; the set is torch's ``list_mode_options()``) becomes
Inductor config patches for the prefill and step graphs (``compile_fx(config_patches=)``).
``torch.compile`` refuses ``mode=`` together with ``options=``, and this backend needs
options (``mask_token_id`` at least), so the mode goes among them:
``options={"mask_token_id": 126336, "mode": "max-autotune"}``; it is taken out before the
rest is validated as a ``MaskKVConfig`` (the mode is a compile setting, not a MaskKV one).
A bare ``mode=`` is an error saying this. With ``options={"backend": "eager"}`` nothing is
compiled, so a mode other than "default" is ignored with a warning. An unknown mode is an
error listing the valid ones.

The whole forward must be one graph: a graph break hands the backend pieces with no token
input, no attention or no logits, which is an error saying so (compile with
``fullgraph=True`` to see where dynamo breaks).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Mapping, Optional

import torch

from maskkv_compile import _torch_private
from maskkv_compile._torch_private import original_module
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError, resolve
from maskkv_compile.inductor import inductor_config_patches
from maskkv_compile.passes import PassManager, UnsupportedModelError, analyse
from maskkv_compile.passes.specialize_scalars import SpecializeScalarsPass
from maskkv_compile.passes.symbolic_length import SymbolicLengthPass
from maskkv_compile.pipeline import copy_graph_module
from maskkv_compile.runtime import MaskKVRuntime

# messages of the errors a graph break causes (the backend received only part of the forward)
_PARTIAL_GRAPH = (
    "needs the model to take (batch, seq) integer token ids",
    "no (batch, seq, vocab) logits",
    "no attention found",
)
_GRAPH_BREAK_HINT = (
    "\nIf the model's forward has a graph break, dynamo hands the backend each piece separately; "
    "MaskKV needs the whole forward in one graph. Compile with torch.compile(model, "
    "backend='maskkv', fullgraph=True, ...) to see where it breaks "
    "(torch._dynamo.explain(model)(input_ids) lists the breaks)."
)


def inductor_options(mode: Optional[str], backend: str) -> dict[str, Any]:
    """The Inductor config patches for ``torch.compile``'s ``mode`` (validated)."""
    modes = _torch_private.list_mode_options()
    if mode is None:
        return {}
    if not isinstance(mode, str) or mode not in modes:
        raise MaskKVConfigError(
            f"mode={mode!r} is not a torch.compile mode; valid modes: {', '.join(modes)}. The mode "
            "is passed to Inductor; MaskKV's own settings go in options={...}"
        )
    patches = dict(_torch_private.list_mode_options(mode))
    if backend == "eager" and patches:
        warnings.warn(
            f"mode={mode!r} is ignored: options={{'backend': 'eager'}} runs the rewritten "
            "graphs without Inductor",
            UserWarning,
            stacklevel=3,
        )
        return {}
    return patches


class ScalarGuard:
    """The runtime, behind a check that dynamo's float inputs still hold the values compiled in."""

    def __init__(self, runtime: MaskKVRuntime, specialized: Mapping[int, tuple[str, float]]):
        self.runtime = runtime
        self.specialized = dict(specialized)

    def __call__(self, *args):
        for position, (name, value) in self.specialized.items():
            now = float(args[position])
            if now != value and not (math.isnan(now) and math.isnan(value)):
                raise UnsupportedModelError(
                    f"the model attribute behind graph input {name} changed from {value!r} to "
                    f"{now!r} since the maskkv backend compiled it as a constant (dynamic=True "
                    "makes Python floats graph inputs; MaskKV's attention op takes its scale as a "
                    "constant). Call torch._dynamo.reset() and compile again"
                )
        return self.runtime(*args)


class MaskKVBackend:
    """A dynamo backend bound to one config (and a torch.compile ``mode``); keeps the runtimes it
    built."""

    def __init__(
        self, config: MaskKVConfig, mask_token_id: Optional[int] = None, mode: Optional[str] = None
    ):
        self.config = config
        self.mask_token_id = mask_token_id if mask_token_id is not None else config.mask_token_id
        self.inductor_options = inductor_options(mode, config.backend)
        self.runtimes: list[MaskKVRuntime] = []
        # shared_trace.Captured -> what __call__ built from it (optimize's shared dynamo trace)
        self._from_captured: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def run_captured(self, captured, args):
        """Run a graph captured by the dynamo trace this backend shares with other configs of
        the same model (``shared_trace.py``), building its runtime on the first call."""
        built = self._from_captured.get(captured)
        if built is None:
            built = self(captured.gm, captured.example_inputs())
            self._from_captured[captured] = built
        return built(*args)

    def __call__(self, gm, example_inputs):
        if self.mask_token_id is None:
            raise MaskKVConfigError(
                "mask_token_id is not set: pass options={'mask_token_id': <id>} (LLaDA: 126336), "
                "or use maskkv_compile.optimize(model), which reads it from model.config"
            )
        gm = copy_graph_module(gm)  # dynamo's own graph stays as traced
        scalars = SpecializeScalarsPass(example_inputs)
        PassManager("captured", [scalars])(gm)
        try:
            if isinstance(analyse(gm).seq_expr, int):
                PassManager("captured", [SymbolicLengthPass()])(gm)
            with inductor_config_patches(self.inductor_options):
                runtime = MaskKVRuntime.from_graph(
                    gm, resolve(self.config, graph=gm), self.mask_token_id
                )
        except UnsupportedModelError as error:
            if any(part in str(error) for part in _PARTIAL_GRAPH):
                raise UnsupportedModelError(str(error) + _GRAPH_BREAK_HINT) from error
            raise
        self.runtimes.append(runtime)
        _record(runtime, gm, example_inputs)
        return ScalarGuard(runtime, scalars.specialized) if scalars.specialized else runtime


# runtime -> weak references to the tensors its graph reads (the model's parameters and buffers)
_BUILT: "weakref.WeakKeyDictionary[MaskKVRuntime, list]" = weakref.WeakKeyDictionary()


def _record(runtime: MaskKVRuntime, gm, example_inputs) -> None:
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    tensors += list(gm.parameters()) + list(gm.buffers())
    _BUILT[runtime] = [weakref.ref(t) for t in tensors]


def runtimes(compiled) -> list[MaskKVRuntime]:
    """The MaskKV runtimes built for this model, oldest first.

    ``compiled``: what ``torch.compile(model, backend="maskkv", ...)`` returned, the model, or
    what ``optimize`` returned. A runtime belongs to the model when its graph reads the model's
    parameters or buffers (so two ``torch.compile`` calls on one model share them, and
    ``optimize``'s runtimes of the model are listed too).
    ``sum(r.counts.prefills + r.counts.steps for r in runtimes(compiled))`` is the number of
    calls MaskKV ran; fewer than the calls made means dynamo ran some without the backend.
    Raises ``RuntimeError`` when there is none: the model has not been called yet, or dynamo
    never handed its graph to the maskkv backend.
    """
    module = original_module(compiled)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"runtimes() takes the compiled model (or the model), got {type(compiled).__name__}"
        )
    state = {id(t) for t in (*module.parameters(), *module.buffers())}
    found = [
        runtime
        for runtime, refs in list(_BUILT.items())
        if any(ref() is not None and id(ref()) in state for ref in refs)
    ]
    if not found:
        raise RuntimeError(
            f"no MaskKV runtime was built for this {type(module).__name__}: it has not been called "
            "since it was compiled, or dynamo did not hand its graph to the maskkv backend (it ran "
            "the model without it). A method of the model (Dream's diffusion_generate, ...) called "
            "on what torch.compile returned runs the original module, never the compiled one: "
            "compile the model in place instead, model.compile(backend='maskkv', options={...}), "
            "or use maskkv_compile.optimize(model)"
        )
    return found


def maskkv_backend(
    gm, example_inputs, options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None
):
    """Entry point for ``backend="maskkv"``; torch passes options/mode only when set (never
    both)."""
    if mode is not None:
        inductor_options(mode, "inductor")  # an unknown mode names the valid ones
        raise MaskKVConfigError(
            f"mode={mode!r} came without options: torch.compile takes mode= or options=, not both, "
            "and the maskkv backend needs options (mask_token_id at least). Put the mode among "
            f"them: options={{'mask_token_id': <id>, 'mode': {mode!r}, ...}}"
        )
    options = dict(options or {})
    option_mode = options.pop("mode", None)
    if options.get("token_modules"):
        raise MaskKVConfigError(
            "token_modules is an option of maskkv_compile.optimize: the backend gets the graph "
            "dynamo traced, and a module dynamo cannot trace has broken it by then. Use "
            "optimize(model, token_modules=...)"
        )
    backend = MaskKVBackend(MaskKVConfig.from_options(options), mode=option_mode)
    return backend(gm, example_inputs)
