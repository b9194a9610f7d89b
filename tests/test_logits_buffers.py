"""The drop-in call's (B, S, V) logits come from per-session buffers that are reused only when
nothing outside the pool holds them (``maskkv_compile/logits_buffers.py``): a logits tensor a
caller keeps never changes, every returned tensor is zero outside the rows the call computed,
and a loop that drops its logits gets buffers back instead of fresh (B, S, V) allocations."""

import numpy as np
import torch
from helpers import build, prompt_and_masks

import maskkv_compile
from maskkv_compile.logits_buffers import LogitsBuffers


def _storages(outputs):
    return {out.untyped_storage().data_ptr() for out in outputs}


def _steps(optimized, x, n, keep=()):
    """n calls on x with one more position committed each time; returns each call's logits
    (kept ones by reference: ``keep`` says which calls' tensors the caller holds on to)."""
    mask_id = optimized.config.mask_token_id
    held, clones, ptrs = {}, [], []
    for i in range(n):
        out = optimized(x).logits
        ptrs.append(out.untyped_storage().data_ptr())
        clones.append(out.clone())
        if i in keep:
            held[i] = out
        masked = (x[0] == mask_id).nonzero().flatten()
        x = x.clone()
        x[0, masked[0]] = 7  # commit one position
        del out
    return held, clones, ptrs


def test_a_loop_that_drops_its_logits_alternates_two_buffers_and_kept_logits_never_change():
    model = build("llada", dtype=torch.float64)
    optimized = maskkv_compile.optimize(model, budget=64, backend="eager")
    _, x = prompt_and_masks(model, 12, 6)
    with torch.no_grad():
        held, clones, ptrs = _steps(optimized, x, 6, keep={1, 4})
    assert optimized.cache_stats()["transitions"] == {"new": 1, "step": 5}
    # calls 0, 2 share one buffer (the loop dropped call 0's), call 1 is held and never reused
    assert ptrs[1] not in ptrs[2:] and ptrs[4] not in ptrs[5:]
    assert len(set(ptrs)) < len(ptrs)  # buffers did come back
    for i, out in held.items():  # what the caller keeps is what the call returned
        assert torch.equal(out, clones[i])
    for out in clones:  # zeros at every row the call did not compute (the prompt)
        assert (out[:, :12] == 0).all() and (out[:, 12:].abs().sum(-1) > 0).all()


def test_views_numpy_arrays_and_gradients_keep_a_buffer_from_reuse():
    pool = LogitsBuffers()
    like, rows = torch.zeros(1), torch.arange(2)
    with torch.no_grad():
        first = pool.take((1, 4, 3), like, rows)
        first[:, rows] = 1.0
        view = first[:, 2:]  # a view keeps the storage
        del first
        second = pool.take((1, 4, 3), like, rows)
        assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
        array = second.numpy()  # a NumPy array over the buffer keeps it too
        del second, view
        third = pool.take((1, 4, 3), like, rows)
        assert np.shares_memory(array, third.numpy()) is False
        del array, third
        again = pool.take((1, 4, 3), like, rows)  # now both are free
        assert again.untyped_storage().data_ptr() in {
            e[0].untyped_storage().data_ptr() for e in pool.entries
        }
    pool = LogitsBuffers()
    with torch.enable_grad():  # an autograd graph could have saved a buffer: never reused
        held = pool.take((1, 4, 3), like, rows)
        assert pool.take((1, 4, 3), like, rows) is not held
    assert not pool.entries


def test_a_reused_buffer_is_zero_outside_the_new_rows_and_serves_a_grown_window():
    pool = LogitsBuffers()
    like = torch.zeros(1)
    with torch.no_grad():
        out = pool.take((2, 5, 3), like, torch.tensor([3, 4]))
        out[:, 3:] = 1.0
        ptr = out.untyped_storage().data_ptr()
        del out
        rows = torch.tensor([1, 2])  # another layout's rows: the old ones are cleared
        out = pool.take((2, 5, 3), like, rows)
        assert out.untyped_storage().data_ptr() == ptr and (out == 0).all()
        out[:, rows] = 2.0
        del out
        grown = pool.take((2, 6, 3), like, rows)  # a window one longer: the same memory, zeros
        assert grown.untyped_storage().data_ptr() == ptr and grown.is_contiguous()
        assert (grown == 0).all()


def test_a_tensor_larger_than_the_cap_is_never_held(monkeypatch):
    """Idle pooled buffers live as long as the session: past MAX_POOLED_BYTES each call gets
    its own tensor, as without the pool."""
    from maskkv_compile import logits_buffers

    monkeypatch.setattr(logits_buffers, "MAX_POOLED_BYTES", 4 * 5 * 3)  # (1, 5, 3) float32
    pool = LogitsBuffers()
    like, rows = torch.zeros(1), torch.arange(2)
    with torch.no_grad():
        held = pool.take((1, 5, 3), like, rows)  # held: its buffer cannot serve the next call
        assert len(pool.entries) == 1
        big = pool.take((1, 6, 3), like, rows)
        assert (big == 0).all() and len(pool.entries) == 1
        assert pool.entries[0][0].untyped_storage().data_ptr() == held.untyped_storage().data_ptr()
