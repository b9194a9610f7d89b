"""The step path reads the device once per call: the GPU-readiness contract of runtime.py.

On CUDA every read of a tensor's value on the host (``bool(t)``, ``int(t)``, ``.item()``,
``.tolist()``, ``torch.equal``, ``nonzero``, ``unique``) is a synchronisation that stalls the
launch queue; a step graph run under CUDA graphs must have none. On this CPU machine a read
costs nothing, so the tests count them instead: at the Python level (the Tensor methods that
read) and at the dispatcher (the aten ops that must read to know their output size).

Contract: a step call (``step``, ``block_step``, a ``revote`` step) reads the device exactly
once, in routing (every live session's evidence in one ``tolist``); the step graph and the
re-vote graph read nothing. Under the maskkv policy the prefill graph reads nothing either
(head budgets on the device, flat kept caches of a static size); a prefill call reads what
making its layout reads and every layer's kept lengths in one ``tolist``. A block refresh may
read (its layout), once per block.
"""

import contextlib
from collections import Counter

import pytest
import torch
from helpers import build, kept_positions, prompt_and_masks
from maskkv_compile.kernels import mask_votes
from torch.utils._python_dispatch import TorchDispatchMode

import maskkv_compile
from maskkv_compile import runtime as runtime_module
from maskkv_compile.generate import generate
from maskkv_compile.runtime import MaskKVRuntime

READING_OPS = {
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.equal.default",
    "aten.is_nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
    "aten.unique_dim.default",
}
READING_METHODS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


class _DispatchReads(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in READING_OPS:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_reads():
    """Counter of host reads in the block (Python-level Tensor reads + reading aten ops)."""
    counts = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READING_METHODS}

    def counting(name, original):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(name, original))
        with _DispatchReads(counts):
            yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture
def recorded(monkeypatch):
    """Per runtime call: (transition, reads of the whole call, reads inside the graph)."""
    calls = []
    call = MaskKVRuntime.__call__

    def graph_reads(self):  # wrap the compiled graphs of this runtime once
        if getattr(self, "_counted", False):
            return
        self._counted = True
        for name, (graph, inputs, groups) in self._graphs.items():  # prefill, step, revote

            def counted(*args, _graph=graph):
                with count_reads() as inside:
                    out = _graph(*args)
                calls[-1]["graph"] = inside
                return out

            self._graphs[name] = (counted, inputs, groups)

    def recording_call(self, *args):
        graph_reads(self)
        before = Counter(self.counts.transitions)
        calls.append({})
        with count_reads() as reads:
            out = call(self, *args)
        (transition,) = (self.counts.transitions - before).keys()
        calls[-1].update(transition=transition, reads=reads)
        return out

    monkeypatch.setattr(MaskKVRuntime, "__call__", recording_call)
    return calls


def _check(calls, step_kinds):
    steps = [c for c in calls if c["transition"] in step_kinds]
    assert steps, [c["transition"] for c in calls]
    for c in steps:
        assert sum(c["graph"].values()) == 0, (
            c["transition"],
            c["graph"],
        )  # the step graph reads nothing
        assert c["reads"] == Counter({"tolist": 1}), (
            c["transition"],
            c["reads"],
        )  # routing's one read


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_step_reads_the_device_once(recorded, family):
    model = build(family)
    prompt, _ = prompt_and_masks(model, 40, 12)
    opt = maskkv_compile.optimize(model, budget=8, backend="eager")
    opt.generate(prompt, gen_length=12, steps=12, block_length=12)
    assert opt.cache_stats()["transitions"] == {"new": 1, "step": 11}
    _check(recorded, {"step"})


def test_a_block_step_reads_the_device_once(recorded):
    model = build("llada")
    prompt, _ = prompt_and_masks(model, 40, 16)
    opt = maskkv_compile.optimize(model, budget=8, backend="eager", block_length=4)
    generate(
        opt,
        prompt,
        mask_token_id=model.config.mask_token_id,
        gen_length=16,
        steps=16,
        block_length=4,
    )
    assert opt.cache_stats()["transitions"] == {"new": 1, "block_refresh": 4, "block_step": 11}
    _check(recorded, {"block_step"})
    refreshes = [c for c in recorded if c["transition"] == "block_refresh"]
    assert all(
        sum(c["graph"].values()) == 0 for c in refreshes
    )  # the step graph, over every response row


def test_a_small_block_step_of_fast_dllms_block_cache_reads_the_device_once(recorded):
    """Fast-dLLM v2's block cache: a small-block call (``block_step``) computes its rows
    against the block's K/V of the refresh with no read beyond routing's, and so does every
    other step of its loop (the step after an extend reads nothing of the new window)."""
    from maskkv_compile.fastdllm_standin import fastdllm_cached_generate, tiny_fastdllm

    model = tiny_fastdllm()
    opt = maskkv_compile.optimize(model, budget=8, backend="eager", family="dream")
    mask = model.config.mask_token_id
    prompt = torch.randint(1, mask, (1, 37), generator=torch.Generator().manual_seed(0))
    loop = dict(block_size=8, max_new_tokens=24, small_block_size=4, mask_id=mask)
    fastdllm_cached_generate(opt, prompt, use_block_cache=True, threshold=0.3, **loop)
    assert opt.cache_stats()["transitions"]["block_step"] > 1
    _check(recorded, {"block_step", "block_refresh", "step"})


def test_a_revote_step_reads_the_device_once(recorded):
    """A re-vote (revote=1: every step) runs the re-vote graph, which reads nothing either: the
    votes, the top-k threshold and the gathers keep every size static."""
    model = build("llada")
    prompt, _ = prompt_and_masks(model, 40, 12)
    opt = maskkv_compile.optimize(model, budget=8, backend="eager", revote=1)
    opt.generate(prompt, gen_length=12, steps=12, block_length=12)
    stats = opt.cache_stats()
    assert stats["transitions"] == {"new": 1, "step": 11} and stats["revotes"] == 11
    _check(recorded, {"step"})


@pytest.mark.parametrize("policy", ["maskkv", "snapkv", "streaming"])
@pytest.mark.parametrize("padded", [False, True], ids=["one row", "padded batch"])
def test_a_prefill_graph_reads_nothing(recorded, monkeypatch, padded, policy):
    """The prefill graph reads nothing where a read is a synchronisation, and the prefill call
    reads its kept lengths once. On the CPU the votes may read an all-True voter or column mask
    to skip it (``free_to_read``, where a read is free); made to answer as on a GPU, the same
    call must give the same logits and kept sets and read nothing inside the graph. (Every
    policy but AdaKV and random: those read once per layer.)"""
    model = build("llada")
    _, x = prompt_and_masks(model, 30, 8, batch=2 if padded else 1)
    kwargs = {}
    if padded:
        valid = torch.ones(x.shape, dtype=torch.bool)
        valid[1, :9] = False  # row 1: a shorter prompt, left-padded
        x[1, :9] = 0
        kwargs = {"attention_mask": valid.long()}
    opt = maskkv_compile.optimize(
        model, budget=24 if padded else 8, backend="eager", policy=policy
    )  # padded: row 1 kept whole
    padding_reads, pad = [], runtime_module.padded_caches

    def counted_padding(flat):
        with count_reads() as reads:
            out = pad(flat)
        padding_reads.append(reads)
        return out

    monkeypatch.setattr(runtime_module, "padded_caches", counted_padding)
    runs = []
    for free in (True, False):
        monkeypatch.setattr(mask_votes, "free_to_read", lambda t, free=free: free)
        opt.reset()
        with torch.no_grad():
            logits = opt(x, **kwargs).logits
        kept = [kept_positions(cache) for cache in opt.runtime.last_session.layers]
        runs.append((logits, kept, recorded[-1]))
    (logits, kept, on_cpu), (logits_gpu_like, kept_gpu_like, gpu_like) = runs
    assert on_cpu["transition"] == gpu_like["transition"] == "new"
    assert torch.equal(logits, logits_gpu_like) and kept == kept_gpu_like
    assert [len(row[0]) for row in kept[0]] == (
        [24, 21] if padded else [8]
    )  # evicted (and a row kept whole)
    assert sum(gpu_like["graph"].values()) == 0, gpu_like["graph"]
    assert set(on_cpu["graph"]) <= {"__bool__"}  # the CPU path may read its masks, nothing else
    assert padding_reads == [Counter({"tolist": 1})] * 2  # every layer's kept lengths, at once
    on_cpu_graph = on_cpu["graph"]
    assert set(on_cpu_graph) <= {"__bool__"}, on_cpu_graph  # only the free mask checks, on the CPU


def test_the_counter_sees_reads(recorded):
    """The counter is not blind: a read inside a graph call shows up."""
    with count_reads() as reads:
        x = torch.arange(4)
        bool(x.any()), x.tolist(), x.nonzero(), torch.equal(x, x)
    assert reads["__bool__"] == 1 and reads["tolist"] == 1
    assert reads["aten.nonzero.default"] == 1 and reads["aten.equal.default"] == 1
