"""``optimize(model, budget)``: the one-call public API, and the model it returns."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import warnings
from typing import Optional

import torch

from maskkv_compile import _torch_private
from maskkv_compile.backend import MaskKVBackend
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError, resolve
from maskkv_compile.dual_cache import generation_block_length
from maskkv_compile.kv_loop import KVLoop, protocol_of
from maskkv_compile.mask_rule import grid_ends, probe_block_length
from maskkv_compile.masks import MaskReader
from maskkv_compile.passes import UnsupportedModelError
from maskkv_compile.profile import model_fingerprint
from maskkv_compile.runtime import Counts, MaskKVRuntime, owned_by, padding
from maskkv_compile.shared_trace import active, shared_trace
from maskkv_compile.tensor_parallel import check_model as check_tensor_parallel
from maskkv_compile.tensor_parallel import mixed_dtensor_error
from maskkv_compile.token_modules import (
    find_token_modules,
    probe_token_modules,
    token_modules_installed,
)

# forward arguments a MaskKV model cannot honour: the graphs compute the response rows only
_REFUSED = {
    "labels": "MaskKV computes logits for the response rows only, so the model cannot compute its "
    "loss over the sequence; call the original model for training or evaluation losses, or compute "
    "the loss from the returned logits at the response positions",
    "past_key_values": "MaskKV keeps its own prompt cache, so the model cannot fill the caller's. "
    "Call it on the whole sequence each step (LLaDA, Dream), or for block diffusion on the window "
    "[prompt ; finished blocks ; current block] with its block-causal mask, as LLaDA2's generate "
    "and diffusers' LLaDA2Pipeline do. A loop that keeps its own cache and says which calls "
    "store runs as it is (kv_loop.py): SDAR's block_diffusion_generate (store_kv=) and "
    "Fast-dLLM v2's batch_sample (update_past_key_values=)",
}

# Every model class's forward is one code object (transformers wraps every model's forward in
# one decorator function), and dynamo counts each model, and each guard set of one (batch size,
# dtype, grad mode), as a recompile of it, for the life of the process: the entries of models
# that are gone still count, and its limits refuse any compile past them. One process that
# optimizes model after model (an evaluation harness, a server that reloads weights) must not
# run out, so MaskKV's compiles are not capped.
RECOMPILE_LIMIT = sys.maxsize


def _fresh_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a copy with the strides of a new tensor of its shape. Dynamo guards on
    strides: a loop that passes views of one buffer (LLaDA2's released ``generate``:
    ``x[:, :end]``, ``position_ids[:, :end]`` of a (1, T) buffer, strides (T, 1)) fails a guard
    at the window that fills the buffer, and the graph dynamo recompiles gets a new runtime
    without the sessions: the last block ran as a new prompt. Token-sized: the copy is cheap."""
    strides, size = [], 1
    for dim in reversed(tensor.shape):
        strides.append(size)
        size *= dim
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@functools.cache
def _logger_methods() -> frozenset:
    """Every ``logging.Logger`` method that logs, including ones a library adds to the class
    (transformers' ``warning_once``, which its deprecated config attributes call from inside a
    model's forward)."""
    names = ["debug", "info", "warning", "warn", "error", "exception", "critical", "log"]
    names += [name for name in vars(logging.Logger) if name.endswith("_once")]
    return frozenset(
        getattr(logging.Logger, name) for name in names if hasattr(logging.Logger, name)
    )


def _log_calls() -> set:
    """The logging functions dynamo may trace as no-ops: the config's own and the logger's. A log
    call cannot be part of a graph; without this, dynamo refuses the forward under
    ``fullgraph=True``. The message is not printed from a traced forward."""
    return set(_torch_private.dynamo_config.ignore_logging_functions) | _logger_methods()


class MaskKVModel(torch.nn.Module):
    """A model whose forward runs the MaskKV prefill/step graphs (see ``runtime``).

    ``model(input_ids, ...).logits`` keeps the original contract (positional arguments are
    the wrapped forward's, in its order); ``generate`` is LLaDA's loop. The wrapped model's
    weights are shared, not copied, and so are its attributes: ``config``, ``device``,
    ``dtype``, ``generation_config`` and every method are the wrapped model's, the methods
    bound to a view of it whose calls (``self(...)``, ``self.forward(...)``) go through
    MaskKV. So a loop that is a method of the model (Dream's ``diffusion_generate``) runs
    unmodified on the optimized model, and a method whose name ends in ``generate`` starts
    from an empty cache. The MaskKV options are ``maskkv_config``. Every ``optimize`` of one
    model shares its dynamo trace (``shared_trace.py``); runtimes and sessions are each its own.
    """

    def __init__(self, model: torch.nn.Module, config: MaskKVConfig, mask_token_id: int):
        super().__init__()
        self.wrapped = model
        self.maskkv_config = config
        self.mask_token_id = mask_token_id
        self.backend = MaskKVBackend(config, mask_token_id)
        self._token_modules = find_token_modules(model, config.token_modules)
        # one dynamo trace for every optimize() of this model (shared_trace.py)
        trace = shared_trace(model, tuple(sorted(config.token_modules)))
        self._compiled = torch.compile(model, backend=trace, fullgraph=True)
        self._token_handles: Optional[list[int]] = None  # registered at the first call
        parameters = inspect.signature(model.forward).parameters
        self._takes_use_cache = "use_cache" in parameters
        self._positional = [
            name
            for name, p in parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self._last_runtime = None
        self._warned_block = False
        self._two_d_block = "unprobed"  # what the model makes of a 2-D mask (``_block_rule``)
        self._masks = MaskReader()  # the caller's masks, read once per mask tensor
        self._kv_loop = KVLoop(
            mask_token_id, functools.partial(_logits_like, model), config.logits_shift
        )
        object.__setattr__(
            self, "_view", _routed_view(model, self)
        )  # not a submodule: it shares the model's state

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        value = getattr(
            self.__dict__["_view"], name
        )  # AttributeError names the wrapped model's class
        if callable(value) and name.endswith("generate"):
            return _fresh_generation(self, value)
        return value

    def forward(self, input_ids: torch.Tensor, *args, **kwargs):
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.is_floating_point()
        ):
            shape = (
                tuple(input_ids.shape)
                if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__
            )
            raise ValueError(f"input_ids must be (batch, seq) integer token ids, got {shape}")
        if input_ids.numel() == 0:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} holds no token: give every row at "
                "least one token (the prompt and its mask tokens)"
            )
        named = self._positional[1 : 1 + len(args)]
        if len(args) > len(named):
            raise TypeError(
                f"{type(self.wrapped).__name__}.forward takes {len(self._positional)} positional "
                f"arguments, got {1 + len(args)}"
            )
        kwargs.update(zip(named, args))
        kv_loop = protocol_of(kwargs)
        for name, why in _REFUSED.items():
            if kwargs.get(name) is not None and not (
                kv_loop is not None and name == "past_key_values"
            ):
                raise ValueError(f"{name}= is not supported by a MaskKV model: {why}")
        for name in ("output_hidden_states", "output_attentions"):
            if kwargs.get(name):
                raise ValueError(
                    f"{name}=True is not supported by a MaskKV model: its steps compute the "
                    "response rows only (a block's rows in block diffusion), so the other rows' "
                    "hidden states and attentions do not exist; call the original model for them"
                )
        keep = kwargs.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError(
                f"logits_to_keep={keep!r} is not supported by a MaskKV model: it "
                "returns the logits of the response rows (zeros elsewhere); use "
                "maskkv_compile.response_logits_only() to get only those, or "
                "leave logits_to_keep at 0"
            )
        if kv_loop is not None:  # a loop that keeps its own cache: its calls as windows
            return self._kv_loop(
                input_ids,
                kwargs,
                self._run_owned,
                kv_loop,
                plain=self.wrapped,
            )
        two_d = isinstance(kwargs.get("attention_mask"), torch.Tensor) and (
            kwargs["attention_mask"].dim() == 2
        )
        key_valid, key_end = self._masks(input_ids, kwargs)
        if two_d and key_end is None and self._block_rule() is not None:
            # the model makes blocks of a 2-D mask inside its forward (``mask_rule.py``)
            key_end = grid_ends(input_ids.shape[1], self._block_rule(), input_ids.device)
        return self._run(input_ids, kwargs, key_valid, key_end)

    def _run_owned(self, input_ids, kwargs: dict, key_end, cache):
        """A call of a loop that keeps its own cache object (``kv_loop.py``), as its window."""
        with owned_by(cache):
            return self._run(input_ids, kwargs, None, key_end)

    def _run(self, input_ids, kwargs: dict, key_valid, key_end):
        """The call through the traced model and the runtime, its masks already read: padding
        ``key_valid`` (B, S) or None, block ends ``key_end`` (S,) or None."""
        # per-token inputs (token_type_ids, position_ids) vary with S too
        per_token = [
            name
            for name, value in kwargs.items()
            if isinstance(value, torch.Tensor)
            and value.dim() >= 2
            and value.shape[:2] == input_ids.shape
        ]
        input_ids = _fresh_strides(input_ids)
        for name in per_token:
            kwargs[name] = _fresh_strides(kwargs[name])
        # S dynamic; the batch too, from the first trace (where it is not 1): a batch size that
        # made dynamo recompile would get a new runtime, and the sessions of the calls at the
        # first one would be lost to their next calls (interleaved generations of two sizes)
        for tensor in [input_ids] + [kwargs[name] for name in per_token]:
            _torch_private.mark_dynamic(tensor, 1)
            _torch_private.maybe_mark_dynamic(tensor, 0)
        if self._takes_use_cache:
            kwargs.setdefault(
                "use_cache", False
            )  # a returned KV cache would keep every layer's full K/V alive
        calls_before = {id(r): r.counts.prefills + r.counts.steps for r in self.backend.runtimes}
        if self._token_modules and self._token_handles is None:
            extra = {"use_cache": False} if self._takes_use_cache else {}
            self._token_handles = probe_token_modules(
                lambda: self.wrapped(input_ids=input_ids[:1, :2], **extra), self._token_modules
            )
        try:
            with (
                token_modules_installed(self._token_modules, self._token_handles or []),
                _torch_private.dynamo_config.patch(
                    recompile_limit=RECOMPILE_LIMIT,
                    accumulated_recompile_limit=RECOMPILE_LIMIT,
                    ignore_logging_functions=_log_calls(),
                ),
                padding(key_valid, key_end),
                active(self.backend),
            ):
                out = self._compiled(input_ids=input_ids, **kwargs)
        except _torch_private.BackendCompilerFailed as failure:
            raise failure.inner_exception from None  # our own error, raised inside the backend
        except (_torch_private.Unsupported, _torch_private.GuardOnDataDependentSymNode) as failure:
            # a graph break
            reason = str(failure).strip().splitlines()[0]
            raise UnsupportedModelError(
                f"dynamo cannot trace {type(self.wrapped).__name__}.forward as one graph "
                f"({reason}); MaskKV rewrites the whole forward, so it must be one graph. "
                "The full trace is chained below. If the break is inside a submodule that maps "
                "each token on its own (an MoE block that dispatches on the host), name its "
                "class in optimize(..., token_modules=(...)) to run it as one op; else a "
                "model-side fix (or a torch._dynamo.config setting) lets it through."
            ) from failure
        except (
            RuntimeError
        ) as failure:  # dynamo's trace of a sharded model that mixes DTensors and tensors
            mixed = mixed_dtensor_error(failure)
            if mixed is None:
                raise
            raise mixed from failure
        used = [
            r
            for r in self.backend.runtimes
            if r.counts.prefills + r.counts.steps != calls_before.get(id(r), 0)
        ]
        if len(used) != 1:
            raise RuntimeError(
                "the MaskKV runtime did not run for this call (dynamo fell "
                "back); please report this"
            )
        self._last_runtime = used[0]
        return out

    def _block_rule(self) -> Optional[int]:
        """The block length the wrapped model makes of a 2-D mask (None: padding), asked once."""
        if self._two_d_block == "unprobed":
            takes = "position_ids" in inspect.signature(self.wrapped.forward).parameters
            self._two_d_block = probe_block_length(self.wrapped, takes)
        return self._two_d_block

    @property
    def runtime(self) -> MaskKVRuntime:
        """The runtime of the last call (one per dynamo graph: a new batch size is a new graph)."""
        if self._last_runtime is None:
            raise RuntimeError("the model has not run yet")
        return self._last_runtime

    @property
    def runtimes(self) -> list[MaskKVRuntime]:
        """Every runtime built for this model, oldest first."""
        return list(self.backend.runtimes)

    def cache_stats(self) -> dict:
        """The last prompt's cache (kept tokens per layer and KV head, bytes held, lengths), and
        the counts (prefills, steps, transitions, fallbacks, revotes) summed over every runtime
        of the model (``runtime_counts`` has them per runtime). ``plain_calls``: calls a loop
        that keeps its own cache made before anything was stored, which ran on the unoptimized
        model (``kv_loop.KVLoop``: Fast-dLLM v2's block cache on a block without a prefix)."""
        if self._last_runtime is None:
            return {
                "prompt_len": 0,
                "layers": [],
                "bytes": 0,
                **MaskKVRuntime.count_stats(Counts()),
                "runtime_counts": [],
                "plain_calls": self._kv_loop.plain_calls,
            }
        stats = self.runtime.cache_stats()
        total = Counts()
        for runtime in self.backend.runtimes:
            total = total.add(runtime.counts)
        stats.update(MaskKVRuntime.count_stats(total))
        stats["runtime_counts"] = [
            MaskKVRuntime.count_stats(r.counts) for r in self.backend.runtimes
        ]
        stats["plain_calls"] = self._kv_loop.plain_calls
        return stats

    def explain_budgets(self) -> str:
        """The kept entries per layer (rows) and KV head (columns) of the last prompt, as a
        table."""
        return self.runtime.budget_table()

    def reset(self) -> None:
        """Forget every cached prompt (the next call is a prefill) and zero the counts."""
        for runtime in self.backend.runtimes:
            runtime.reset()
        self._kv_loop.reset()

    def generate(self, *args, **kwargs) -> torch.Tensor:
        """The wrapped model's own ``generate`` when its class defines one (LLaDA2's block loop,
        ``generate(inputs, temperature, block_length, steps, gen_length, ...)``), run unmodified
        through MaskKV like any of its ``*generate`` methods; otherwise LLaDA's loop
        (``maskkv_compile.generate``), where, with ``block_length`` in the config, the dual
        cache follows this call's ``block_length`` (the loop's own block grid)."""
        from maskkv_compile.generate import generate

        if _own_generate(self.wrapped):
            return _fresh_generation(self, self.__dict__["_view"].generate)(*args, **kwargs)
        if len(args) != 1:
            raise TypeError(
                f"generate(input_ids, **kwargs) takes the token ids alone as positional, got "
                f"{len(args)} positional arguments"
            )
        input_ids = args[0]
        self.reset()
        block = (
            kwargs.get("block_length", 128) if self.maskkv_config.block_length is not None else None
        )
        with generation_block_length(block):
            return generate(self, input_ids, mask_token_id=self.mask_token_id, **kwargs)


def _logits_like(model: torch.nn.Module) -> tuple[int, torch.dtype]:
    """(vocabulary size, dtype) of the model's logits: its output embeddings' rows, else its
    config's ``vocab_size``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and isinstance(
        getattr(head, "weight", None), torch.Tensor
    ):
        return head.weight.shape[0], head.weight.dtype
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return model.config.vocab_size, dtype


def _own_generate(model: torch.nn.Module) -> bool:
    """The model's class defines its own ``generate`` (a model-specific loop, as LLaDA2's), not
    the one transformers' ``GenerationMixin`` gives every model (an autoregressive loop, which
    a diffusion model never means)."""
    method = getattr(type(model), "generate", None)
    if method is None:
        return False
    module = getattr(method, "__module__", "") or ""
    return not module.startswith("transformers.")


def _routed_view(model: torch.nn.Module, optimized: MaskKVModel) -> torch.nn.Module:
    """An object of a subclass of ``model``'s class that shares ``model``'s state (its
    ``__dict__``) and whose calls go to ``optimized``: methods read from it see the model's
    attributes and call MaskKV when they call ``self``."""
    cls = type(model)

    def call(self, *args, **kwargs):
        return optimized(*args, **kwargs)

    routed = type(
        f"MaskKV{cls.__name__}", (cls,), {"__call__": call, "forward": call, "__module__": __name__}
    )
    view = object.__new__(routed)
    object.__setattr__(view, "__dict__", model.__dict__)
    return view


def _fresh_generation(optimized: MaskKVModel, method):
    """A generation method of the wrapped model (Dream's ``diffusion_generate``): it starts from
    an empty cache, and the dual cache is off for it (its block grid, if any, is unknown)."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        optimized.reset()  # a new generation starts from step 0, whatever the last one committed
        if optimized.maskkv_config.block_length is not None and not optimized._warned_block:
            optimized._warned_block = True
            warnings.warn(
                f"maskkv_compile: {method.__name__} is the wrapped model's own loop, whose "
                "blocks MaskKV does not know: it runs without the dual cache "
                f"(block_length={optimized.maskkv_config.block_length} applies to model(x) "
                "calls and model.generate)",
                UserWarning,
                stacklevel=2,
            )
        with generation_block_length(None):
            return method(*args, **kwargs)

    return run


def optimize(
    model: torch.nn.Module,
    budget: Optional[int] = None,
    *,
    mask_token_id: Optional[int] = None,
    backend: Optional[str] = None,
    prompt_refresh: Optional[int] = None,
    policy: Optional[str] = None,
    profile=None,
    family: Optional[str] = None,
    block_length: Optional[int] = None,
    revote=None,
    second_tier: Optional[str] = None,
    revote_voters: Optional[str] = None,
    recent: Optional[int] = None,
    prefill_chunk: Optional[int] = None,
    token_modules=None,
    max_sessions: Optional[int] = None,
    reuse_logits: Optional[bool] = None,
    min_keep: Optional[int] = None,
    vote_chunk: Optional[int] = None,
    config: Optional[MaskKVConfig] = None,
) -> MaskKVModel:
    """Rewrite ``model`` for MaskKV; nothing about the model itself changes.

    budget: prompt KV pairs kept per KV head per layer (default 256).
    mask_token_id: default ``model.config.mask_token_id``.
    backend: "inductor" (default) or "eager" (rewritten graphs run as plain FX code).
    prompt_refresh: recompute the prompt every this many steps (default: never).
    policy: "maskkv" (default) or a baseline name (see ``maskkv_compile.policies.POLICIES``).
    profile: a LayerProfile from ``calibrate`` (refused if measured on another model).
    family: "llada" or "dream" (where a token's logits live); default: "dream" when
        ``model.config.model_type`` is Dream's, else "llada".
    block_length: dual cache for semi-autoregressive loops: a step computes only the current
        block's rows (see ``maskkv_compile/dual_cache.py``); default: every response row.
    revote: re-select the kept entries while decoding with the step's own queries: an int k
        (every k steps) or "block" (every block refresh); see ``maskkv_compile/revote.py``.
    second_tier: where ``revote`` keeps every prompt K/V between re-votes: "device" (default)
        or "host" (page-locked host memory on CUDA, copied in at each re-vote).
    revote_voters: who votes at a re-vote: "response" (default: every response row) or
        "masked" (the rows still masked in the call).
    recent: prompt entries nearest the response (block diffusion: just before the current
        block) that every KV head keeps whatever the policy ranks, out of its budget
        (default 0: the policy alone chooses).
    prefill_chunk: tokens a causal prefill encodes at once (DiffusionGemma's encoder; default
        1024); 0 encodes the prompt in one call.
    token_modules: class names of token-wise submodules dynamo cannot trace (an MoE block that
        dispatches on the host), each run as one op (see ``maskkv_compile/token_modules.py``).
    max_sessions: prompts cached at once (default 2).
    reuse_logits: the drop-in (B, S, V) logits in one buffer per prompt, rewritten in place
        (default False).
    min_keep: fewest entries any KV head keeps (default 1).
    vote_chunk: voter rows per chunk in ``maskkv::mask_votes`` (default 64).
    config: a full :class:`MaskKVConfig`; the keyword arguments above override its fields.
    """
    overrides = {
        k: v
        for k, v in dict(
            budget=budget,
            mask_token_id=mask_token_id,
            backend=backend,
            prompt_refresh=prompt_refresh,
            policy=policy,
            profile=profile,
            family=family,
            block_length=block_length,
            revote=revote,
            second_tier=second_tier,
            revote_voters=revote_voters,
            recent=recent,
            prefill_chunk=prefill_chunk,
            token_modules=token_modules,
            max_sessions=max_sessions,
            reuse_logits=reuse_logits,
            min_keep=min_keep,
            vote_chunk=vote_chunk,
        ).items()
        if v is not None
    }
    if overrides.get("prefill_chunk") == 0:  # None means "not given" here
        overrides["prefill_chunk"] = None
    config = MaskKVConfig.from_options(overrides, base=config)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}")
    from maskkv_compile.diffusion_gemma import DiffusionGemmaMaskKV, is_diffusion_gemma

    if is_diffusion_gemma(model):  # encoder cache + canvas: its own routing (diffusion_gemma/)
        if config.token_modules:
            raise MaskKVConfigError(
                "token_modules does not apply to DiffusionGemma: MaskKV runs its modules as they "
                "are (no graph is traced); drop the option"
            )
        return DiffusionGemmaMaskKV(model, config)
    token = (
        config.mask_token_id
        if config.mask_token_id is not None
        else getattr(getattr(model, "config", None), "mask_token_id", None)
    )
    if token is None:
        raise MaskKVConfigError(
            "mask_token_id is not set and the model config has none: pass "
            "optimize(model, mask_token_id=...)"
        )
    if config.profile is not None:
        config.profile.check_compatible(
            model_fingerprint(getattr(model, "config", model), type(model).__name__)
        )
    if getattr(getattr(model, "config", None), "is_causal", False) is True:
        raise UnsupportedModelError(
            f"{type(model).__name__} is configured causal (config.is_causal=True); MaskKV is for "
            "bidirectional diffusion LLMs. Load it with is_causal=False if it really is one"
        )
    check_tensor_parallel(model)  # heads the mesh does not divide: refused before tracing
    config = resolve(config, model=model)  # the family, as backend="maskkv" detects it
    model.eval()
    return MaskKVModel(model, config, int(token))
