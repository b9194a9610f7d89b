"""maskkv:: custom ops (installed as ``maskkv_compile.kernels``).

Importing this package registers the ops in the ``maskkv`` namespace. Every op has a
pure-torch implementation that doubles as the reference oracle in tests, and a fake
implementation so FX passes, ``opcheck`` and Inductor can trace it.

==========================  ===============================================================
op                          what it computes
==========================  ===============================================================
``maskkv::attention``       canonical bidirectional attention (every spelling lowers to it)
``maskkv::mask_votes``      per-KV-head votes of the mask queries on prompt keys, and the
                            per-query-head attention mass on the prompt (chunked)
``maskkv::select_kv``       top-k per KV head with per-head budgets, flat kept K/V of static size
``maskkv::cached_attention`` attention over [kept prompt K/V (padded) ; response K/V]
``maskkv::gather_heads``    tensor parallelism: every rank's heads of a statistic, in order
``maskkv::prompt_kv``       a layer's prompt K/V, kept as the second tier (``revote``)
``maskkv::revote_kv``       re-selection at a step: the step's queries vote over the second
                            tier, top-k under the same per-head budgets
==========================  ===============================================================

The policy ops ``maskkv::selection_scores`` and ``maskkv::head_budgets`` are policy code, not
kernels: they live in ``maskkv_compile/policy_ops.py``, registered when
``maskkv_compile.policies`` is imported. Nothing here imports a policy. Nor is
``maskkv::token_module`` (a submodule dynamo cannot trace, run eagerly as one op): it lives in
``maskkv_compile/token_modules.py``.
"""

# Absolute imports: this folder is the package maskkv_compile.kernels. Where the repository
# root is on sys.path (``python -m ...`` or ``python -c`` run from it) the folder is also
# importable as a top-level ``kernels``, and transformers imports that name to probe for
# Hugging Face's kernels package; the import then finds the ops in maskkv_compile.kernels,
# registered once, and no version, so transformers reads "not available"
# (tests/test_layering.py runs that probe).
from maskkv_compile.kernels import (  # noqa: F401  (registers ops)
    attention,
    cached_attention,
    mask_votes,
    revote,
    select_kv,
    tp_ops,
)
from maskkv_compile.kernels.attention import attention_reference
from maskkv_compile.kernels.cached_attention import cached_attention_reference
from maskkv_compile.kernels.mask_votes import mask_votes_reference
from maskkv_compile.kernels.select_kv import select_kv_reference

__all__ = [
    "attention_reference",
    "cached_attention_reference",
    "mask_votes_reference",
    "select_kv_reference",
]
