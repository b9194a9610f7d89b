"""Token-wise submodules that dynamo cannot trace, run as one ``maskkv::token_module`` op each.

Some modeling files dispatch their mixture of experts on the host: LLaDA2.0's released
``moe_infer`` loops over ``tokens_per_expert.cpu().numpy()`` and skips empty experts with an
``if``. Dynamo breaks the graph there, and MaskKV rewrites the whole forward as one graph.
``optimize(model, token_modules=("LLaDA2MoeSparseMoeBlock",))`` names such submodules by
class. While the optimized model runs, each instance's forward is the op, which calls the
original forward eagerly; the traced graph holds one node per instance, whose outputs are
shaped by the rows of its input. The step graph then runs the module on the computed rows
only, as it does every other row-wise op.

Invariants, checked once per optimized model before its first trace, on a probe of the model
with the first two tokens of its first call (``probe_token_modules``):
- each named module is reached, takes one tensor (B, S, H) and returns a tensor or a (nested)
  tuple or list of tensors, each shaped (B, S, ...);
- it is token-wise: each row's output equals its output on that row alone, to float rounding
  (an MoE without capacity limits is; anything that mixes tokens is refused);
- the wrapped model is unchanged outside the optimized model's calls: the forwards are swapped
  in around each call and back after it (``token_modules_installed``).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from maskkv_compile._torch_private import pytree


@dataclass(frozen=True)
class _Entry:
    forward: weakref.WeakMethod  # the module's own forward (the registry keeps no module alive)
    leaves: tuple  # per output tensor: (shape after the input's (B, S), dtype)
    op_forward: Callable  # what the module's forward is while installed: the op, outputs re-nested


_ENTRIES: dict[int, _Entry] = {}
_HANDLES = itertools.count()


@torch.library.custom_op("maskkv::token_module", mutates_args=())
def token_module(x: torch.Tensor, handle: int) -> list[torch.Tensor]:
    """Run the registered module ``handle`` on ``x`` (B, S, H): its output tensors, flat."""
    forward = _ENTRIES[handle].forward()
    if forward is None:
        raise RuntimeError(f"maskkv::token_module {handle}: its module no longer exists")
    with torch.no_grad():
        leaves = pytree.tree_leaves(forward(x))
    # an op's outputs own their storage: copy a view (of x or of an intermediate)
    return [leaf if leaf._base is None and leaf is not x else leaf.clone() for leaf in leaves]


@token_module.register_fake
def _(x: torch.Tensor, handle: int) -> list[torch.Tensor]:
    rows = x.shape[:-1]  # (B, S)
    return [x.new_empty((*rows, *rest), dtype=dtype) for rest, dtype in _ENTRIES[handle].leaves]


def find_token_modules(model: torch.nn.Module, classes: Sequence[str]) -> list[torch.nn.Module]:
    """The submodules of ``model`` whose class is named in ``classes``; every name must match."""
    found = [m for m in model.modules() if type(m).__name__ in classes]
    missing = sorted(set(classes) - {type(m).__name__ for m in found})
    if missing:
        seen = sorted({type(m).__name__ for m in model.modules()})
        raise ValueError(
            f"token_modules names {missing}, which no submodule of {type(model).__name__} is; "
            f"its module classes: {seen}"
        )
    return found


def probe_token_modules(run: Callable[[], Any], modules: list[torch.nn.Module]) -> list[int]:
    """Register each module as a ``maskkv::token_module``: run the model once (``run``), read
    what each module takes and returns, and check the invariants above. Returns the handles,
    one per module."""
    seen: dict[int, tuple] = {}

    def record(module, args, kwargs, output):
        seen.setdefault(id(module), (args, kwargs, output))

    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    handles = []
    for module in modules:
        name = type(module).__name__
        if id(module) not in seen:
            raise ValueError(f"token_modules: the probe call never reached a {name}")
        args, kwargs, output = seen[id(module)]
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() < 3:
            raise ValueError(
                f"token_modules: {name} must take one (batch, seq, hidden) tensor; it was called "
                f"with {len(args)} positional and {sorted(kwargs)} keyword arguments"
            )
        x = args[0]
        leaves, spec = pytree.tree_flatten(output)
        rows = tuple(x.shape[:-1])
        if not leaves or any(
            not isinstance(leaf, torch.Tensor) or tuple(leaf.shape[: len(rows)]) != rows
            for leaf in leaves
        ):
            shapes = [tuple(leaf.shape) if torch.is_tensor(leaf) else leaf for leaf in leaves]
            raise ValueError(
                f"token_modules: {name} must return tensors shaped (batch, seq, ...) like its "
                f"input {tuple(x.shape)}; it returned {shapes}"
            )
        _check_token_wise(name, module, x, leaves)
        handle = next(_HANDLES)
        _ENTRIES[handle] = _Entry(
            weakref.WeakMethod(module.forward),
            tuple((tuple(v.shape[len(rows) :]), v.dtype) for v in leaves),
            _op_forward(handle, spec),
        )
        handles.append(handle)
    return handles


def _check_token_wise(name: str, module, x: torch.Tensor, leaves: list) -> None:
    seq = x.dim() - 2  # x: (..., S, H); every output: (..., S, ...)
    with torch.no_grad():
        for row in range(x.shape[seq]):
            alone = pytree.tree_leaves(module(x.narrow(seq, row, 1)))
            for together, single in zip(leaves, alone):
                got = together.narrow(seq, row, 1)
                close = (
                    torch.allclose(got, single, rtol=1e-4, atol=1e-5)
                    if got.is_floating_point()
                    else torch.equal(got, single)
                )
                if not close:
                    raise ValueError(
                        f"token_modules: {name} is not token-wise: row {row} of its output "
                        "differs when the row is run alone. Only modules that map each token on "
                        "its own can run on the rows a step computes"
                    )


def _op_forward(handle: int, spec: Any) -> Callable:
    def forward(hidden_states):
        return pytree.tree_unflatten(torch.ops.maskkv.token_module(hidden_states, handle), spec)

    return forward


@contextlib.contextmanager
def token_modules_installed(modules: list[torch.nn.Module], handles: list[int]):
    """Each module's forward is its ``maskkv::token_module`` op for the duration."""
    for module, handle in zip(modules, handles):
        module.forward = _ENTRIES[handle].op_forward
    try:
        yield
    finally:
        for module in modules:
            del module.forward
