"""The drop-in call's (B, S, V) logits come from per-session buffers that are reused only when
nothing outside the pool holds them (``maskkv_compile/logits_buffers.py``): a logits tensor a
caller keeps never changes, every returned tensor is zero outside the rows the call computed,
and a loop that drops its logits gets buffers back instead of fresh (B, S, V) allocations."""

import random

import numpy as np
import pytest
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


def _fill(pool, shape, rows, value=1.0):
    """pool.fill with logits of ``value`` at ``rows``."""
    return pool.fill(shape, rows, torch.full((shape[0], len(rows), shape[2]), value))


def _ptr(tensor):
    return tensor.untyped_storage().data_ptr()


def test_views_numpy_arrays_and_gradients_keep_a_buffer_from_reuse():
    pool, rows = LogitsBuffers(), torch.arange(2)
    with torch.no_grad():
        first = _fill(pool, (1, 4, 3), rows)
        view = first[:, 2:]  # a view keeps the storage
        del first
        second = _fill(pool, (1, 4, 3), rows)
        assert _ptr(second) != _ptr(view)
        array = second.numpy()  # a NumPy array over the buffer keeps it too
        del second, view
        third = _fill(pool, (1, 4, 3), rows)
        assert np.shares_memory(array, third.numpy()) is False
        del array, third
        again = _fill(pool, (1, 4, 3), rows)  # now both are free
        assert _ptr(again) in {_ptr(entry[0]) for entry in pool.entries}
    pool = LogitsBuffers()
    with torch.enable_grad():  # an autograd graph could have saved a buffer: never reused
        held = _fill(pool, (1, 4, 3), rows)
        assert _fill(pool, (1, 4, 3), rows) is not held
    assert not pool.entries


def test_a_reused_buffer_is_zero_outside_the_new_rows_and_serves_a_grown_window():
    pool = LogitsBuffers()
    with torch.no_grad():
        out = _fill(pool, (2, 5, 3), torch.tensor([3, 4]))
        ptr = _ptr(out)
        del out
        rows = torch.tensor([1, 2])  # another layout's rows: the old ones are cleared
        out = _fill(pool, (2, 5, 3), rows, 2.0)
        assert _ptr(out) == ptr and (out[:, rows] == 2).all()
        assert (out[:, [0, 3, 4]] == 0).all()
        del out
        grown = _fill(pool, (2, 6, 3), rows)  # a window one longer: the same memory, zeros
        assert _ptr(grown) == ptr and grown.is_contiguous()
        assert (grown[:, rows] == 1).all() and (grown[:, [0, 3, 4, 5]] == 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_random_windows_rows_and_edits_always_give_zeros_outside_the_rows(seed):
    """Random calls (windows that grow, shrink or stay, batch 1-2, other rows, a caller that
    edits its logits in place or keeps them): every returned tensor holds the call's logits at
    its rows and zeros elsewhere, a kept tensor never changes, and buffers do come back. A
    grown window clears only the rows last written (the buffer is zero elsewhere)."""
    rng = random.Random(seed)
    pool, kept, reused, seen = LogitsBuffers(), [], 0, set()
    batch, seq = rng.randint(1, 2), rng.randint(4, 9)
    with torch.no_grad():
        for call in range(40):
            if rng.random() < 0.3:
                seq = max(2, seq + rng.choice([-3, 1, 1, 2, 4]))  # mostly growing
            if rng.random() < 0.1:
                batch = rng.randint(1, 2)
            rows = torch.tensor(sorted(rng.sample(range(seq), rng.randint(1, min(3, seq)))))
            value = float(call + 1)
            out = _fill(pool, (batch, seq, 5), rows, value)
            reused += _ptr(out) in seen
            seen.add(_ptr(out))
            expected = torch.zeros(batch, seq, 5)
            expected[:, rows] = value
            assert torch.equal(out, expected), (seed, call)
            if rng.random() < 0.3:  # the caller edits every row in place
                out[..., 1] = -1.0
            if rng.random() < 0.2:
                kept.append((out, out.clone()))
            del out
            for held, copy in kept:
                assert torch.equal(held, copy)
    assert reused > 10


def test_a_buffer_the_caller_wrote_into_comes_back_zeroed():
    """A loop that edits the logits in place (``logits[..., mask_id] = -inf``, every row) then
    drops them: the buffer's next call is zero outside its computed rows again."""
    pool, rows = LogitsBuffers(), torch.tensor([2, 3])
    with torch.no_grad():
        out = _fill(pool, (1, 4, 3), rows)
        out[..., 1] = float("-inf")  # the caller's edit reaches the prompt rows too
        ptr = _ptr(out)
        del out
        again = _fill(pool, (1, 4, 3), rows)
        assert _ptr(again) == ptr
        assert (again[:, :2] == 0).all() and (again[:, rows] == 1).all()


def test_a_tensor_larger_than_the_cap_is_never_held(monkeypatch):
    """Idle pooled buffers live as long as the session: past MAX_POOLED_BYTES each call gets
    its own tensor, as without the pool."""
    from maskkv_compile import logits_buffers

    monkeypatch.setattr(logits_buffers, "MAX_POOLED_BYTES", 4 * 5 * 3)  # (1, 5, 3) float32
    pool, rows = LogitsBuffers(), torch.arange(2)
    with torch.no_grad():
        held = _fill(pool, (1, 5, 3), rows)  # held: its buffer cannot serve the next call
        assert len(pool.entries) == 1
        big = _fill(pool, (1, 6, 3), rows)
        assert (big[:, 2:] == 0).all() and len(pool.entries) == 1
        assert _ptr(pool.entries[0][0]) == _ptr(held)
