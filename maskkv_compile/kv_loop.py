"""Block loops that keep their own KV cache (SDAR's ``block_diffusion_generate``, Fast-dLLM v2's
``batch_sample``).

Such a loop sends the model only the new tokens and a cache object, with a flag saying whether
the call's K/V are to be stored (SDAR: ``store_kv``; Fast-dLLM v2: ``update_past_key_values``):

* a prefill, flag set, of the prompt's whole blocks at positions ``[0, P)``;
* per block, refinement calls, flag unset, of the block at ``[P, P + b)`` (all its rows see
  every stored key and the whole block);
* a commit, flag set, of the finished block, after which the cache holds ``P + b``.

Each call stands for the window [everything stored in this cache ; the call's tokens] with the
block-causal mask of blocks of ``b`` on the grid from 0 (what the loop's masks slice), which is
what MaskKV's block runtime routes (``routing.py``). :class:`KVLoop` keeps, per cache object of
the loop (weakly), the tokens stored so far, and turns each call into that window call. The two
loops differ in what they read of the prefill and in who makes the cache object
(:class:`Protocol`):

* SDAR reads nothing of its prefill: the prefill stores its tokens and computes nothing (zero
  logits, a stride-0 view, as a MaskKV model returns for every prompt row), and the first
  refinement call prefills the whole window, where the block's mask tokens vote;
* Fast-dLLM v2 reads its prefill's last row (the next block's first token, a token-shift
  model: row i predicts token i + 1), and passes no cache until the model returns one. Its
  prefill runs as the window [prompt ; one block of mask tokens]: the block's mask queries vote
  over the prompt there (its tokens are not known yet, so all of them vote), the prompt's last
  row is computed (the row before the block, which a shifted family reads), and the refinement
  calls that follow continue that window. The model returns a :class:`LoopCache` in
  ``past_key_values`` for the loop to pass back.

Either way, a refinement call or a commit runs the window and returns the logits of the call's
rows (a commit is a step on the finished block: its rows' real logits), and a commit then
appends its tokens to what the cache holds. The loop's cache object is never written: MaskKV
holds the K/V, and the object stays empty. Fast-dLLM v2's block cache (``use_block_cache``)
runs on the same windows: a refresh (the whole block, no buffer) also returns a
:class:`BlockBuffer` of the block's tokens, and a small-block call (its tokens, that buffer,
``replace_position``) writes its tokens into the buffer and runs on the whole block's window,
returning the small block's rows. The runtime computes only those rows, against the kept prefix
and the K/V of the block's other rows as of the refresh, as the released model does
(``block_buffer.py``); where it does not hold them, it computes the whole block. A block-cache
call before anything is stored (a prompt of one block or less, which the loop does not
prefill) has no prefix to cache or evict: it runs on the unoptimized model (``plain``).

Invariants, each checked with an error naming what was seen: the call's positions continue what
the cache holds (a cache is one generation); the block length is the first refinement call's
length, the prefill's mask (whole blocks) or ``block_size`` shows the same, and every later call
is one block of that grid; a call with the flag set holds no mask token; the call's mask, when
given, is what the window's block-causal mask gives its rows (all keys for a refinement call or
commit, a block-causal mask for a prefill), as bool or 1/0 (1 = attend).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from maskkv_compile.block_buffer import BufferCall, buffer_call
from maskkv_compile.mask_rule import grid_ends
from maskkv_compile.masks import grid_block_ends

STORE_FLAG = "store_kv"  # SDAR's flag: store this call's K/V in the cache
UPDATE_FLAG = "update_past_key_values"  # Fast-dLLM v2's
# Fast-dLLM v2's block cache (its small-block calls rewrite a per-block K/V buffer in place)
BLOCK_CACHE_KWARGS = ("use_block_cache", "block_past_key_values", "replace_position")
# the block length Fast-dLLM v2's model gives a call that passes no ``block_size`` (its
# refinement calls): their mask is block-causal on this grid
FAST_DLLM_DEFAULT_BLOCK = 32


@dataclass(frozen=True)
class Protocol:
    """How a loop that keeps its own cache calls the model (module docstring)."""

    flag: str  # the keyword that says "store this call's K/V"
    reads_prefill: bool  # the prefill's logits are read: it runs as [prompt ; a mask block]
    makes_cache: bool  # the model makes the cache object (the loop passes None until then)


SDAR = Protocol(STORE_FLAG, reads_prefill=False, makes_cache=False)
FAST_DLLM = Protocol(UPDATE_FLAG, reads_prefill=True, makes_cache=True)


def protocol_of(kwargs: dict) -> Optional[Protocol]:
    """The cached-loop protocol a call's keywords show, or None for an ordinary call."""
    if UPDATE_FLAG in kwargs:
        return FAST_DLLM
    if STORE_FLAG in kwargs and kwargs.get("past_key_values") is not None:
        return SDAR
    return None


class LoopCache:
    """The cache object a MaskKV model returns to a loop that lets the model make it (Fast-dLLM
    v2): a handle the loop passes back. MaskKV holds the K/V; ``get_seq_length()`` is the
    number of tokens the loop has stored, as a transformers ``Cache`` reports it."""

    def __init__(self):
        self.stored = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.stored


class BlockBuffer:
    """The ``block_past_key_values`` a MaskKV model returns at a refresh of Fast-dLLM v2's
    block cache (a refinement call with ``use_block_cache=True`` and no buffer): the block's
    tokens as the loop sent them, ``(B, b)``, from position ``start``. A small-block call writes
    its tokens into it at ``replace_position``, as the loop's buffer takes the call's K/V, and
    runs on the window of the whole block; the K/V of the block's rows live in the runtime's
    session, keyed by this object (``block_buffer.py``)."""

    def __init__(self, tokens: torch.Tensor, start: int):
        self.tokens, self.start = tokens, start

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens.shape[1]


def _whole_block(input_ids, buffered: dict, start: int, where: str):
    """A small-block call's block: its buffer's tokens with the call's written in at
    ``replace_position`` (in the buffer too); returns (block (B, b), replace_position)."""
    buffer, at = buffered["block_past_key_values"], buffered["replace_position"]
    if not isinstance(buffer, BlockBuffer):
        raise ValueError(
            f"{where}: block_past_key_values of type {type(buffer).__name__} was not made by this "
            "MaskKV model; pass the one it returned at the block's refresh (the call with "
            "use_block_cache=True and no block_past_key_values)"
        )
    batch, n = input_ids.shape
    at = 0 if at is None else int(at)
    if (
        buffer.start != start
        or buffer.tokens.shape[0] != batch
        or not 0 <= at <= buffer.tokens.shape[1] - n
    ):
        raise ValueError(
            f"{where}: block_past_key_values holds the block at {buffer.start} of "
            f"{tuple(buffer.tokens.shape)} tokens, and this call writes {n} tokens of {batch} "
            f"rows at replace_position={at}; a buffer serves the block of its refresh (the "
            "loop drops it at each new block)"
        )
    buffer.tokens[:, at : at + n] = input_ids
    return buffer.tokens, at  # the window copies it


@dataclass
class _Stored:
    tokens: torch.Tensor  # (B, P): the tokens the loop has stored in this cache, in order
    block: Optional[int] = None  # the block length: the first refinement call's (SDAR) or
    # the prefill's block_size (Fast-dLLM v2)
    prefill_block: Optional[int] = None  # the block length the prefill showed


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The loop's mask as bool 'may attend': bool as is, else 1/0 with 1 = attend (SDAR's float
    mask, which its model casts to bool)."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"{STORE_FLAG} loop: attention_mask {tuple(mask.shape)} holds values other than 0 and "
            "1; a loop that keeps its own cache passes a bool or 1/0 mask (1 = attend)"
        )
    return mask == 1


class KVLoop:
    """The state of every cache object a loop passes to one MaskKV model (see module doc)."""

    def __init__(
        self,
        mask_token_id: int,
        logits_like: Callable[[], tuple[int, torch.dtype]],
        logits_shift: int = 0,
    ):
        self.mask_token_id = mask_token_id
        self.logits_shift = logits_shift  # the family's: 1 computes the row before the block
        self.logits_like = logits_like  # () -> (vocabulary size, logits dtype) of the model
        self._stored: "weakref.WeakKeyDictionary[object, _Stored]" = weakref.WeakKeyDictionary()
        self.plain_calls = 0  # calls run on the unoptimized model (``__call__``'s ``plain``)

    def reset(self) -> None:
        self._stored.clear()
        self.plain_calls = 0

    def __call__(
        self,
        input_ids: torch.Tensor,
        kwargs: dict,
        run: Callable[[torch.Tensor, dict, torch.Tensor], object],
        protocol: Protocol = SDAR,
        plain: Optional[Callable[..., object]] = None,
    ):
        """The call, routed as its window: ``run(window_ids, kwargs, key_end, cache)`` runs the
        model on the window (block ends ``key_end``, no padding) as a call of the loop whose
        cache object is ``cache`` (its sessions are that object's alone) and returns its output.
        ``plain(input_ids, **kwargs)`` runs the unoptimized model: Fast-dLLM v2's block-cache
        calls on a block before anything is stored (a prompt of one block or less, which the
        loop does not prefill) go there, block cache and all: with no prefix, MaskKV has nothing
        to cache or evict, and the released model's buffer is what such a call reads."""
        if (
            plain is not None
            and protocol.makes_cache
            and kwargs.get("use_block_cache")
            and not kwargs.get(protocol.flag)
            and self._stored_tokens(kwargs.get("past_key_values")) == 0
        ):
            self.plain_calls += 1
            return plain(input_ids, **kwargs)
        if protocol.reads_prefill and not self.logits_shift:
            raise ValueError(
                f"{protocol.flag}= (Fast-dLLM v2's batch_sample) reads the next block's first "
                "token from the last row of its prefill and of each commit, a token-shift "
                "model's row; this MaskKV model computes logits in place (LLaDA's family), so "
                'that row would be zeros: optimize with family="dream"'
            )
        cache = kwargs.pop("past_key_values", None)
        store = bool(kwargs.pop(protocol.flag, False))
        kwargs.pop("use_cache", None)
        mask = kwargs.pop("attention_mask", None)
        positions = kwargs.pop("position_ids", None)
        block_size = kwargs.pop("block_size", None) if protocol.makes_cache else None
        buffered = {name: kwargs.pop(name, None) for name in BLOCK_CACHE_KWARGS}
        if not protocol.makes_cache and any(v not in (None, False) for v in buffered.values()):
            raise ValueError(
                f"{', '.join(BLOCK_CACHE_KWARGS)} are Fast-dLLM v2's block cache keywords, which "
                f"its loop sends with {UPDATE_FLAG}=; this call sends {STORE_FLAG}= (SDAR's loop)"
            )
        if cache is None and store:  # the model makes the loop's cache (Fast-dLLM v2)
            cache = LoopCache()
        batch, n = input_ids.shape
        known = False  # the cache object was seen before (this model stored into it)
        if cache is None:  # a read call before anything is stored: the call alone
            stored = _Stored(input_ids.new_empty((batch, 0)))
        else:
            try:
                known = cache in self._stored
                stored = self._stored.setdefault(cache, _Stored(input_ids.new_empty((batch, 0))))
            except TypeError:
                raise ValueError(
                    f"past_key_values of type {type(cache).__name__} cannot be tracked (no weak "
                    "reference): pass a transformers Cache object, one per generation"
                ) from None
        start = stored.tokens.shape[1]
        where = f"{protocol.flag}={store} call at positions [{start}, {start + n})"
        held = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if cache is not None and not known and held:  # another model's, or one before a reset
            del self._stored[cache]
            raise ValueError(
                f"{where}: past_key_values holds {held} tokens this MaskKV model did not store; "
                "a cache object is one generation on one model (pass the one this model "
                "returned, or a fresh one)"
            )
        if stored.tokens.shape[0] != batch:
            raise ValueError(
                f"{where}: batch {batch}, but this cache holds {stored.tokens.shape[0]} rows; "
                "pass a fresh cache object for a new generation"
            )
        use_buffer, lo, rows = bool(buffered["use_block_cache"]), 0, n
        if use_buffer and store:
            raise ValueError(
                f"{where}: use_block_cache=True on a call that stores its K/V; Fast-dLLM v2's "
                "block cache serves the refinement calls of one block (its commit passes none)"
            )
        marked = None  # what the call is to the block cache (block_buffer.py)
        if use_buffer and buffered["block_past_key_values"] is not None:  # a small-block call
            input_ids, lo = _whole_block(input_ids, buffered, start, where)
            marked = BufferCall(buffered["block_past_key_values"], lo, rows)
            n = input_ids.shape[1]
        elif use_buffer:  # a refresh: the buffer it returns
            marked = BufferCall(BlockBuffer(input_ids.clone(), start))
        if positions is not None:
            seen = positions.reshape(-1, positions.shape[-1])[0]  # (rows,) of the first row
            first = start + lo
            if positions.shape[-1] != rows or not bool(
                (positions == torch.arange(first, first + rows, device=positions.device)).all()
            ):
                raise ValueError(
                    f"{where}: position_ids {seen.tolist()} do not continue the {start} tokens "
                    "this cache holds; a cache object is one generation (pass a fresh one for a "
                    "new prompt)"
                )
        if store and bool((input_ids == self.mask_token_id).any()):
            raise ValueError(
                f"{where}: {protocol.flag}=True with the mask token {self.mask_token_id} among "
                "the tokens; a loop stores only prompt tokens and finished blocks"
            )
        window = torch.cat([stored.tokens.to(input_ids.device), input_ids], dim=1)  # (B, P + n)
        if store and stored.block is None:  # the prefill
            if protocol.reads_prefill:
                return self._prefill_window(input_ids, kwargs, run, stored, cache, block_size)
            if mask is not None:
                stored.prefill_block = _prefill_block(_allowed(mask), where)
            stored.tokens = window  # computed at the first step
            vocab, dtype = self.logits_like()
            zeros = torch.zeros((), dtype=dtype, device=input_ids.device)
            return _Output(zeros.expand(batch, n, vocab))  # (B, n, V), no memory
        if stored.block is None:
            stored.block = n
        block = stored.block
        prefill = stored.prefill_block  # the prefill's blocks (whole blocks: one is its length)
        if start % block or n != block or (prefill is not None and prefill != block):
            raise ValueError(
                f"{where}: the loop's blocks are {block} long on the grid from 0 (its prefill's "
                f"mask: {prefill}), but this call is {n} tokens from {start}; a refinement call "
                "or a commit is one whole block of the grid"
            )
        if mask is not None and not bool(_allowed(mask).all()):
            raise ValueError(
                f"{where}: the call's attention_mask {tuple(mask.shape)} hides some keys; the "
                "current block's rows see every stored key and the whole block"
            )
        if protocol.makes_cache:
            _check_block_size(block_size, block, where)
        ends = grid_ends(start + n, block, input_ids.device)
        positions = torch.arange(start + n, device=input_ids.device).expand(batch, -1)
        with buffer_call(marked):
            out = run(window, {**kwargs, "position_ids": positions}, ends, cache)
        if store:
            stored.tokens = window
        out = self._call_rows(out, start + lo, rows, where, cache, protocol, stored)
        if marked is not None:  # a refresh makes the buffer, a small-block call passes it back
            out["block_past_key_values"] = marked.buffer
        return out

    def _stored_tokens(self, cache) -> int:
        """How many tokens the loop's cache object holds: what this model stored in it, or for
        an object it has not seen (None: 0) what the object says."""
        try:
            stored = None if cache is None else self._stored.get(cache)
        except TypeError:  # no weak reference: refused where the call is routed
            return -1
        if stored is not None:
            return stored.tokens.shape[1]
        return cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0

    def _prefill_window(self, input_ids, kwargs, run, stored, cache, block_size):
        """Fast-dLLM v2's prefill: the window [prompt ; one block of mask tokens], whose mask
        queries vote; the prompt rows' logits are returned (its last row is computed: a shifted
        family reads the row before the block)."""
        batch, n = input_ids.shape
        block = FAST_DLLM_DEFAULT_BLOCK if block_size is None else int(block_size)
        where = f"{UPDATE_FLAG}=True prefill of positions [0, {n})"
        if block < 2 or n % block:
            raise ValueError(
                f"{where}: a prefill is the prompt's whole blocks, but block_size={block} does "
                f"not divide its {n} tokens"
            )
        stored.block = stored.prefill_block = block
        masks = input_ids.new_full((batch, block), self.mask_token_id)
        window = torch.cat([input_ids, masks], dim=1)  # (B, n + block)
        ends = grid_ends(n + block, block, input_ids.device)
        positions = torch.arange(n + block, device=input_ids.device).expand(batch, -1)
        out = run(window, {**kwargs, "position_ids": positions}, ends, cache)
        stored.tokens = input_ids
        return self._call_rows(out, 0, n, where, cache, FAST_DLLM, stored)

    @staticmethod
    def _call_rows(out, start, n, where, cache, protocol, stored):
        """The window's output with the logits of the call's rows [start, start + n) only, and
        the loop's cache object in ``past_key_values``."""
        if out["logits"].shape[1] < start + n:
            raise ValueError(
                f"{where}: the window's logits are {tuple(out['logits'].shape)}, not one row per "
                "position (response_logits_only() is not supported for a loop that keeps its "
                "own cache: it reads the call's rows)"
            )
        out["logits"] = out["logits"][:, start : start + n]  # (B, n, V): the call's rows
        if isinstance(cache, LoopCache):
            cache.stored = stored.tokens.shape[1]
        if protocol.makes_cache or "past_key_values" in out or hasattr(out, "past_key_values"):
            out["past_key_values"] = cache
        return out


def _check_block_size(given, block: int, where: str) -> None:
    """Fast-dLLM v2's model makes each call's mask from its ``block_size`` keyword (a commit
    passes the loop's; a refinement call passes none, and gets blocks of 32): the window's
    mask is the one it makes only when that grid puts the call's rows in one block."""
    grid = FAST_DLLM_DEFAULT_BLOCK if given is None else int(given)
    if grid % block:
        raise ValueError(
            f"{where}: the loop's blocks are {block} long, but the model makes this call's mask "
            f"on blocks of {grid} (block_size={given}; a refinement call passes none, and gets "
            f"{FAST_DLLM_DEFAULT_BLOCK}), which would hide part of the block from its rows; use "
            f"a block length that divides {FAST_DLLM_DEFAULT_BLOCK}"
        )


def _prefill_block(allowed: torch.Tensor, where: str) -> int:
    """The block length of the prefill's mask, which must be block-causal on a grid from 0 (each
    query sees its own block and every earlier one); the whole length for one block."""
    seq = allowed.shape[-1]
    if bool(allowed.all()):
        return seq
    end = grid_block_ends(allowed.reshape(-1, 1, seq, seq))  # (S,) or None
    if end is None:
        raise ValueError(
            f"{where}: the prefill's attention_mask {tuple(allowed.shape)} is not block-causal "
            "on a grid from position 0 (each query sees its own block, of 2 or more tokens, and "
            "every earlier one)"
        )
    return int(end[0])


class _Output(dict):
    """The prefill's output: ``.logits`` (zeros: no prompt row is computed), as a mapping and
    by attribute, like transformers' ``ModelOutput``."""

    def __init__(self, logits):
        super().__init__(logits=logits)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
