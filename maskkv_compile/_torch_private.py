"""Every private torch API maskkv_compile touches, imported in this one place.

When torch moves, this is the file to fix.
"""

from __future__ import annotations

import importlib

from torch._guards import TracingContext, tracing  # noqa: F401  (a fresh context per Inductor compile)
from torch._logging import trace_structured  # noqa: F401  (tlparse artifacts)
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
from torch.utils import _pytree as pytree  # noqa: F401  (token_modules' outputs, flat and back)
from torch.utils._python_dispatch import is_traceable_wrapper_subclass  # noqa: F401  (DTensor parameters)


def structured_trace_on() -> bool:
    """Whether torch's structured trace (``TORCH_TRACE``, read by tlparse) writes what
    ``trace_structured`` is given, so that a payload is worth formatting.

    torch always installs a lazy handler on the trace logger; without a trace directory it
    removes itself at the first record. Other handlers there (a test harness's log capture) are
    not a trace."""
    from torch._logging import _internal

    handler = _internal.LOG_TRACE_HANDLER
    return (
        handler is not None
        and handler in _internal.trace_log.handlers
        and (handler.root_dir is not None or handler.stream is not None)
    )


def example_value(node):
    """The fake value dynamo recorded for an FX node (None for nodes we inserted)."""
    return node.meta.get("example_value", node.meta.get("val"))


def sym_expr(value):
    """The sympy expression behind a SymInt, or the int itself."""
    import torch

    return value.node.expr if isinstance(value, torch.SymInt) else value


def sym_hint(value) -> int:
    """A concrete size for a possibly symbolic one (the value dynamo saw while tracing)."""
    import torch

    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return (
            int(hint) if hint is not None else int(value.node.shape_env.size_hint(value.node.expr))
        )
    return int(value)


# Dynamo, Inductor and the symbolic shapes (sympy) take seconds to import, and most uses of the
# package (the eager path, the CLI's help, an explain of a cached graph) need none of them:
# these names are imported at their first use, ``_torch_private.compile_fx`` and the like
# (PEP 562). Read them as attributes of this module inside functions, never with
# ``from ... import`` at the top of a module, which would import them right there.
_SHAPES = "torch.fx.experimental.symbolic_shapes"
_LAZY = {  # name -> (module, attribute; None: the module itself)
    "BackendCompilerFailed": ("torch._dynamo.exc", "BackendCompilerFailed"),  # our own errors
    "Unsupported": ("torch._dynamo.exc", "Unsupported"),  # a graph break under fullgraph=True
    "lazy_format_graph_code": ("torch._dynamo.utils", "lazy_format_graph_code"),  # graph dumps
    "dynamo_config": ("torch._dynamo.config", None),  # recompile limits
    "mark_dynamic": ("torch._dynamo", "mark_dynamic"),
    "maybe_mark_dynamic": ("torch._dynamo", "maybe_mark_dynamic"),  # dynamic unless it is 1
    "list_mode_options": ("torch._inductor", "list_mode_options"),  # torch.compile's modes
    "compile_fx": ("torch._inductor.compile_fx", "compile_fx"),
    "DimDynamic": (_SHAPES, "DimDynamic"),
    # dynamo's trace branched on a tensor's value
    "GuardOnDataDependentSymNode": (_SHAPES, "GuardOnDataDependentSymNode"),
    "ShapeEnv": (_SHAPES, "ShapeEnv"),
    "StatelessSymbolicContext": (_SHAPES, "StatelessSymbolicContext"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # imported once
    return value


def original_module(compiled):
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), else ``compiled``
    itself."""
    return getattr(compiled, "_orig_mod", compiled)


def triton_route_internals():
    """What the CUDA Triton route of ``kernels/`` needs (imported lazily: CUDA + triton only):
    AOTAutograd's op -> kernels map, FunctionalTensorMode, and export's switch that keeps
    triton ops opaque."""
    from torch._library.triton import get_triton_kernels_for_op, triton_ops_to_kernels
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return (
        get_triton_kernels_for_op,
        triton_ops_to_kernels,
        FunctionalTensorMode,
        custom_triton_ops_decomposition_disabled,
    )


def resolve_process_group(group_name: str):
    """The ProcessGroup a functional collective names by string."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def storage_use_count(tensor) -> int:
    """How many tensors (views, exports) hold ``tensor``'s storage, not counting the Python
    storage object made to ask."""
    import torch

    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1


def sdpa_with_logsumexp_cpu(q, k, v, attn_mask, scale):
    """SDPA on CPU that also returns each query row's log-sum-exp of its scores (aten's
    flash kernel for CPU): what merging attention over two key segments needs. ``attn_mask``
    additive, in q's dtype, or None. A row whose keys are all masked gets zeros and a
    log-sum-exp of 0 (not -inf): the caller must know which rows see no key."""
    import torch

    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale
    )
