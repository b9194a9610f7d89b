"""Compile the rewritten graphs with Inductor, one artifact for every sequence length.

The prefill and step graphs are compiled directly with ``compile_fx`` on fake inputs
whose sequence-like dims (the token length S, the response length R, the prompt length P,
each layer's kept length K) are symbolic, so one compile serves every prompt. Compiled
code checks no guards, so the runtime keeps the guards' worth itself:
  * sizes 0 and 1 are specialized by the shape environment, so an input with such a size
    gets its own compile (the key records which dynamic sizes are 0/1);
  * every guard the compile produced (``s0 >= 2``, and relations such as ``Eq(s3, s7)`` or
    ``Ne(s2, 16*s5)`` that a graph's views and broadcasts ask for) is kept with the artifact,
    as an expression over the input dims its symbols stand for, and evaluated on the sizes of
    a call before the artifact serves it: once per new size class, remembered after. A guard
    over a symbol no input dim carries makes the artifact serve exactly its own sizes. The
    shape environment does no duck sizing: two dims (or strides) equal at the compile by
    coincidence (a window of 128 and a head dim of 128) get symbols of their own, never one;
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
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from maskkv_compile import _torch_private
from maskkv_compile._torch_private import (
    FakeTensorMode,
    TracingContext,
    is_traceable_wrapper_subclass,
    tracing,
)

log = logging.getLogger("maskkv_compile.inductor")

SEQ = "seq"  # marks a SymInt input that equals the token length
_MEMO = 4096  # call keys remembered per graph

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


@dataclass
class _Artifact:
    """A compiled graph and the guards its compile produced, each an expression over symbols
    that stand for inputs' sizes and strides (``symbols``: symbol -> (argument index, "size" or
    "stride", dim)); ``exact``: the call key it alone serves, when some guard's symbol is
    neither."""

    fn: Callable
    guards: list
    symbols: dict
    exact: Optional[tuple] = None  # InductorGraph._key: (sizes, strides)

    def admits(self, args, key: tuple) -> bool:
        if self.exact is not None:
            return key == self.exact
        import sympy  # at first use: importing it takes a third of a second

        values = {
            symbol: sympy.Integer(int(args[i].shape[d] if kind == "size" else args[i].stride(d)))
            for symbol, (i, kind, d) in self.symbols.items()
        }
        try:
            return all(bool(guard.xreplace(values)) for guard in self.guards)
        except TypeError:  # a guard that does not evaluate to a truth value on these sizes
            return False


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
        self._tokens_pos = self.names.index(tokens)
        self.artifacts: dict[tuple, list[_Artifact]] = {}  # by the 0/1 pattern of the sizes
        # call key (``_key``) -> the artifact that admitted it; forgotten past _MEMO keys (a
        # forgotten key's guards are evaluated again)
        self.compiled: dict[tuple, Callable] = {}
        self.compiles = 0

    def _key(self, args) -> tuple[tuple[int, ...], tuple]:
        """The call's sizes (the batch, compiled static, and every dynamic dim) and the strides
        of the inputs with dynamic dims (a guard may hold of a stride: whether a slice is
        contiguous)."""
        sizes, strides = [int(args[self._tokens_pos].shape[0])], []
        for name, arg in zip(self.names, args):
            dims = self.dynamic.get(name)
            if isinstance(dims, (list, tuple)):
                sizes += [int(arg.shape[d]) for d in dims]
                strides.append(arg.stride())
        return tuple(sizes), tuple(strides)

    def __call__(self, *args):
        key = self._key(args)
        fn = self.compiled.get(key)
        if fn is None:
            sizes = key[0]
            small = (
                sizes[0],
                *(s if s < 2 else None for s in sizes[1:]),
            )  # the batch is always part of the key
            mine = self.artifacts.setdefault(small, [])
            artifact = next((a for a in mine if a.admits(args, key)), None)
            if artifact is None:
                artifact = self._compile(args, key)
                mine.append(artifact)
            if len(self.compiled) >= _MEMO:
                self.compiled.clear()
            fn = self.compiled[key] = artifact.fn
        return fn(*args)

    def _compile(self, args, key: tuple) -> _Artifact:
        # no symbol shared by equal values of unrelated dims
        env = _torch_private.ShapeEnv(duck_shape=False)
        mode = FakeTensorMode(shape_env=env)
        DYNAMIC, STATIC = _torch_private.DimDynamic.DYNAMIC, _torch_private.DimDynamic.STATIC
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
                kinds = [DYNAMIC if d in dims else STATIC for d in range(arg.dim())]
                context = _torch_private.StatelessSymbolicContext(dynamic_sizes=kinds)
                fakes[i] = mode.from_tensor(arg, symbolic_context=context)
        seq = fakes[by_name[self.tokens]].shape[1]
        for i, (name, arg) in enumerate(zip(self.names, args)):
            if fakes[i] is None:
                fakes[i] = seq if self.dynamic.get(name) == SEQ else arg
        import sympy

        symbols = {}  # symbol -> (argument index, "size" or "stride", dim) it stands for
        for i, fake in enumerate(fakes):
            if isinstance(fake, torch.Tensor) and not is_traceable_wrapper_subclass(fake):
                for kind, values in (("size", fake.shape), ("stride", fake.stride())):
                    for d, value in enumerate(values):
                        if isinstance(value, torch.SymInt) and isinstance(
                            value.node.expr, sympy.Symbol
                        ):
                            symbols.setdefault(value.node.expr, (i, kind, d))
        with tracing(TracingContext(mode)):
            fn = _torch_private.compile_fx(
                self.gm, fakes, config_patches=self.config_patches or None
            )
        self.compiles += 1
        guards = [guard.expr for guard in env.guards]
        unknown = set().union(*(g.free_symbols for g in guards)) - set(symbols) if guards else ()
        log.info(
            "compiled graph with Inductor (%s): %d guards%s",
            key[0],
            len(guards),
            ", serving these sizes only" if unknown else "",
        )
        return _Artifact(fn, guards, symbols, exact=key if unknown else None)
