"""Compile the rewritten graphs with Inductor, one artifact for every sequence length.

The prefill and step graphs are compiled directly with ``compile_fx`` on fake inputs
whose sequence-like dims (the token length S, the response length R, the prompt length P,
each layer's kept length K) are symbolic, so one compile serves every prompt. Compiled
code checks no guards, so the runtime keeps the guards' worth itself:
  * sizes 0 and 1 are specialized by the shape environment, so an input with such a size
    gets its own compile (the key records which dynamic sizes are 0/1);
  * if the compile produced any other guard, the artifact is only reused for exactly the
    same sizes;
  * the batch size is compiled static and always part of the key (a runtime serves every
    batch size its dynamo graph admits: under ``dynamic=True`` one graph serves them all).
(Dynamo's own ``torch.compile`` cannot be used here: the rewritten graphs run inside the
outer compiled region, where it leaves a copied dynamo graph uncompiled.)

Inductor options (what ``torch.compile(mode=...)`` turns into, e.g. ``max_autotune``) reach
``compile_fx`` as ``config_patches``: pass them to ``InductorGraph``, or build the graphs
inside ``with inductor_config_patches({...}):`` (how the backend hands them through the
runtime, which builds its InductorGraphs while it is constructed).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Callable, Mapping, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from maskkv_compile._torch_private import (
    DimDynamic,
    FakeTensorMode,
    ShapeEnv,
    StatelessSymbolicContext,
    TracingContext,
    compile_fx,
    is_traceable_wrapper_subclass,
    tracing,
)

log = logging.getLogger("maskkv_compile.inductor")

SEQ = "seq"  # marks a SymInt input that equals the token length

_CONFIG_PATCHES: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "maskkv_inductor_config_patches", default=None
)


@contextlib.contextmanager
def inductor_config_patches(patches: Mapping[str, object]):
    """InductorGraphs created inside this block compile with these Inductor config patches."""
    token = _CONFIG_PATCHES.set(dict(patches))
    try:
        yield
    finally:
        _CONFIG_PATCHES.reset(token)


def _only_size_bounds(guards) -> bool:
    """True when every guard is a bound like ``s >= 2`` / ``s != 1`` (what 0/1 specialization
    adds)."""
    for guard in guards:
        expr = guard.expr
        if not isinstance(expr, (sympy.Ge, sympy.Gt, sympy.Le, sympy.Lt, sympy.Ne)):
            return False
        if not any(isinstance(side, sympy.Integer) and abs(int(side)) <= 2 for side in expr.args):
            return False
    return True


class InductorGraph:
    """A rewritten graph compiled lazily with Inductor on its first call of each size class.

    dynamic: placeholder name -> the dims that vary from call to call (``SEQ`` for a SymInt
    input equal to the tokens' dim 1); ``tokens`` names the token placeholder;
    ``config_patches``: Inductor config for ``compile_fx`` (default: the enclosing
    ``inductor_config_patches`` block's, else none).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        dynamic: Mapping[str, Sequence[int] | str],
        tokens: str,
        config_patches: Optional[Mapping[str, object]] = None,
    ):
        self.gm = gm
        self.config_patches = dict(
            (_CONFIG_PATCHES.get() or {}) if config_patches is None else config_patches
        )
        self.names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.dynamic = dynamic
        self.tokens = tokens
        self.compiled: dict[tuple, Callable] = {}
        self.compiles = 0

    def _sizes(self, args) -> tuple[int, ...]:
        """The call's size class: the batch (compiled static) and every dynamic dim."""
        sizes = [int(args[self.names.index(self.tokens)].shape[0])]
        for name, arg in zip(self.names, args):
            dims = self.dynamic.get(name)
            if isinstance(dims, (list, tuple)):
                sizes += [int(arg.shape[d]) for d in dims]
        return tuple(sizes)

    def __call__(self, *args):
        sizes = self._sizes(args)
        small = (
            sizes[0],
            *(s if s < 2 else None for s in sizes[1:]),
        )  # the batch is always part of the key
        fn = self.compiled.get(small) or self.compiled.get(sizes)
        if fn is None:
            fn, generic = self._compile(args)
            self.compiled[small if generic else sizes] = fn
        return fn(*args)

    def _compile(self, args) -> tuple[Callable, bool]:
        env = ShapeEnv()
        mode = FakeTensorMode(shape_env=env)
        fakes: list = [None] * len(args)
        by_name = dict(zip(self.names, range(len(args))))
        for i, (name, arg) in enumerate(zip(self.names, args)):
            if is_traceable_wrapper_subclass(
                arg
            ):  # a DTensor parameter (tensor parallelism): static sizes
                fakes[i] = mode.from_tensor(arg, static_shapes=True)
            elif isinstance(arg, torch.Tensor):
                dims = self.dynamic.get(name, ())
                dims = dims if isinstance(dims, (list, tuple)) else ()
                context = StatelessSymbolicContext(
                    dynamic_sizes=[
                        DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC
                        for d in range(arg.dim())
                    ]
                )
                fakes[i] = mode.from_tensor(arg, symbolic_context=context)
        seq = fakes[by_name[self.tokens]].shape[1]
        for i, (name, arg) in enumerate(zip(self.names, args)):
            if fakes[i] is None:
                fakes[i] = seq if self.dynamic.get(name) == SEQ else arg
        with tracing(TracingContext(mode)):
            fn = compile_fx(self.gm, fakes, config_patches=self.config_patches or None)
        self.compiles += 1
        generic = _only_size_bounds(env.guards)
        log.info(
            "compiled %s graph with Inductor (%s)",
            "generic" if generic else "size-specialized",
            self._sizes(args),
        )
        return fn, generic
