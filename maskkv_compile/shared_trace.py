"""One dynamo trace per model, shared by every ``optimize`` of it.

Tracing a model with dynamo takes seconds (about 12 s for AntiBERTy's 8 layers on a 2-core
CPU) and depends on the model and the call's guards, never on MaskKV's options. A sweep that
optimizes one model at several budgets or policies (``maskkv-compile eval``, the benchmarks)
paid it for every configuration. So every ``MaskKVModel`` of one model compiles it with the
same dynamo backend, a :class:`SharedTrace`:

* dynamo calls it once per graph (per guard set: batch size, dtype, a recompile); it keeps a
  pristine copy of the captured graph (:class:`Captured`) and returns a dispatcher;
* the dispatcher runs the captured graph through the ``MaskKVBackend`` of the ``MaskKVModel``
  making the call (:func:`active`), which builds its runtime from that graph on its first call
  (``MaskKVBackend.run_captured``).

Invariants: options, runtimes, sessions and counts stay each ``MaskKVModel``'s own; only the
trace is shared. A ``Captured`` holds no tensor of the model or the call alive (weak references,
except 0-d float inputs, which ``SpecializeScalarsPass`` reads by value), so a model converted to
another dtype frees its old weights. The share lives as long as the model (a weak key).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Any, Callable

import torch

from maskkv_compile.pipeline import copy_graph_module

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("maskkv_active_backend", default=None)
_SHARES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, SharedTrace]]" = (
    weakref.WeakKeyDictionary()
)


class Captured:
    """One graph dynamo captured, as it was handed over (later rewrites work on copies)."""

    def __init__(self, gm, example_inputs):
        self.gm = copy_graph_module(gm)
        self._inputs = [_weak(x) for x in example_inputs]

    def example_inputs(self) -> list:
        """The example inputs; a tensor that is gone reads as None."""
        return [x() if isinstance(x, weakref.ref) else x for x in self._inputs]


def _weak(value):
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 0 and value.is_floating_point() and not isinstance(value, torch.nn.Parameter):
        return value.detach().clone()  # a Python float dynamo made an input: read by value
    return weakref.ref(value)


class SharedTrace:
    """The dynamo backend every ``MaskKVModel`` of one model compiles it with."""

    def __call__(self, gm, example_inputs) -> Callable:
        captured = Captured(gm, example_inputs)

        def dispatch(*args):
            backend = _ACTIVE.get()
            if backend is None:
                raise RuntimeError(
                    "a MaskKV graph ran outside a MaskKVModel call; call the model optimize() "
                    "returned"
                )
            return backend.run_captured(captured, args)

        return dispatch


def shared_trace(model: torch.nn.Module, key: tuple = ()) -> SharedTrace:
    """The backend shared by the ``MaskKVModel``s of ``model`` (and of ``key``: options that
    change what is traced, such as ``token_modules``)."""
    shares = _SHARES.setdefault(model, {})
    return shares.setdefault(key, SharedTrace())


@contextlib.contextmanager
def active(backend):
    """Within this block, shared graphs run through ``backend`` (a ``MaskKVBackend``)."""
    token = _ACTIVE.set(backend)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
