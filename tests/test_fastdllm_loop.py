"""Issue 23: Fast-dLLM v2's released cached loop (``batch_sample``, without its block cache),
run unmodified on a MaskKV model (``kv_loop.py``'s ``FAST_DLLM`` protocol).

* exactness: at a budget above the window, the tokens equal the same loop on the plain model
  (with its real cache), in float64, over seeded cases (blocks 4-32, small blocks, prompts
  shorter than a block, of one block and not multiples of it, batch 1-3, prompts of one length
  and of several, right-padded with the mask token as the released harness does, thresholds),
  and the path that ran is the cached one (one ``new``, an ``extend`` for each later block);
* the prefill returns the plain model's last row and a cache handle the loop passes back;
* eviction: every refinement call's logits are finite and the cache stays within the budget;
* seeded sequences of generations with resets and weight changes mixed in leak nothing;
* Inductor gives eager's tokens under eviction;
* the block cache (``use_block_cache``): at full budget the tokens equal the plain model's
  loop with its block cache (whose small-block calls read stale K/V of the block's other rows,
  which can change tokens); refreshes are BLOCK_REFRESHes, and every small-block call on a
  cache is a BLOCK_STEP that computes only the small block's rows; a block before anything
  is stored runs on the plain model (``plain_calls``); a buffer the session no longer holds
  gets the whole block, counted;
* calls off the protocol (a foreign or outdated block buffer, blocks the model's mask would
  cut) are refused.
"""

import random
import threading

import pytest
import torch
from block_loops import block_causal_mask
from helpers import kept_positions, reset_or_perturb
from transformers import DynamicCache

import maskkv_compile
from maskkv_compile.fastdllm_standin import fastdllm_cached_generate, tiny_fastdllm
from maskkv_compile.kv_loop import LoopCache

MASK = 255


def _model(dtype=torch.float64):
    model = tiny_fastdllm(dtype=dtype)
    with torch.no_grad():
        model.get_output_embeddings().weight[MASK] = 0  # a trained dLLM never predicts the mask
    return model


def _optimize(model, budget):
    # Fast-dLLM v2 reads logits one row early: the shifted family (LLaDA's reads them in place)
    return maskkv_compile.optimize(
        model, budget=budget, backend="eager", family="dream", mask_token_id=MASK
    )


def _prompt(batch, length, seed):
    ids = torch.randint(1, MASK, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.expand(batch, -1).clone()  # prompts of one length, as batch_sample's batches


def _prefilled(optimized, seed):
    """A 32-token prompt prefilled on the reset model in blocks of 8: (the loop's cache, the
    keywords of a refinement call on it)."""
    optimized.reset()
    prompt = _prompt(1, 32, seed=seed)
    cache = optimized(
        input_ids=prompt, use_cache=True, update_past_key_values=True, block_size=8
    ).past_key_values
    return cache, dict(use_cache=True, past_key_values=cache, update_past_key_values=False)


class _Calls:
    """The loop's calls, logged: (stores, cache given) of each."""

    def __init__(self, target):
        self.target, self.log = target, []
        self.small_block_calls = self.refreshes = self.before_any_store = 0

    def __call__(self, **kwargs):
        stores, cached = (
            bool(kwargs.get("update_past_key_values")),
            kwargs.get("past_key_values") is not None,
        )
        self.log.append((stores, cached))
        if kwargs.get("use_block_cache"):
            small = kwargs.get("block_past_key_values") is not None
            self.before_any_store += not cached
            self.small_block_calls += small and cached
            self.refreshes += not small and cached
        return self.target(**kwargs)

    def cached_read_runs(self) -> int:
        """Runs of consecutive refinement calls on a cache: one per block decoded on it."""
        runs, before = 0, None
        for stores, cached in self.log:
            if not stores and cached and before != (False, True):
                runs += 1
            before = (stores, cached)
        return runs


@pytest.fixture(scope="module")
def pair():
    model = _model()
    return model, _optimize(model, 10**6)


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("seed", range(16))
def test_full_budget_gives_the_plain_loops_tokens_on_the_cached_path(pair, seed):
    model, optimized = pair
    rng = random.Random(seed)
    block = rng.choice([4, 8, 16, 32])
    small = rng.choice([s for s in (2, 4, 8, block) if block % s == 0])
    length = rng.choice([rng.randint(2, block), block, 2 * block, rng.randint(block + 1, 60)])
    prompt = _prompt(rng.choice([1, 2, 3]), length, seed)
    kwargs = dict(
        block_size=block,
        max_new_tokens=rng.randint(1, 3) * block,
        small_block_size=small,
        mask_id=MASK,
        threshold=rng.choice([0.95, 0.02]),
    )
    if len(prompt) > 1 and rng.random() < 0.6:  # prompts of other lengths, right-padded
        lengths = torch.tensor([rng.randint(max(length - block, 1), length) for _ in prompt])
        lengths[0] = length
        prompt[torch.arange(length)[None, :] >= lengths[:, None]] = MASK
        kwargs["lengths"] = lengths
    kwargs["use_block_cache"] = rng.random() < 0.5
    reference = fastdllm_cached_generate(model, prompt, **kwargs)
    optimized.reset()
    calls = _Calls(optimized)
    got = fastdllm_cached_generate(model, prompt, call=calls, **kwargs)
    assert torch.equal(got, reference), kwargs
    stats = optimized.cache_stats()
    transitions = stats["transitions"]
    assert stats["fallbacks"] == {}
    assert transitions.get("new", 0) == 1, transitions  # the prefill, or the first commit
    # the first block read on a cache continues the prefill's window; every later one extends
    assert transitions.get("extend", 0) == max(calls.cached_read_runs() - 1, 0), (
        transitions,
        kwargs,
    )
    # every small-block call on a cache computed the small block alone; every refresh kept
    # the block's K/V (the first call of each later block, a refresh, is its extend)
    assert transitions.get("block_step", 0) == calls.small_block_calls, (transitions, kwargs)
    if kwargs["use_block_cache"]:
        refreshes = transitions.get("block_refresh", 0) + transitions.get("extend", 0)
        assert refreshes == calls.refreshes, (transitions, kwargs)
    assert stats["plain_calls"] == calls.before_any_store
    assert stats["prompt_len"] > 0


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("lengths", [(45, 37, 41), (48, 40, 44)], ids=["tails", "on the grid"])
def test_a_batch_of_prompts_of_other_lengths_right_padded_with_the_mask(pair, lengths):
    """The released harness's batches: the shortest prompt's whole blocks are prefilled, the
    longer prompts' tails share the next blocks with the shorter ones' first masks; with the
    shortest on the grid (40), the prefill's last row is the next token of that row alone."""
    model, optimized = pair
    lengths = torch.tensor(lengths)
    prompt = _prompt(3, int(lengths.max()), seed=9)
    prompt[torch.arange(prompt.shape[1])[None, :] >= lengths[:, None]] = MASK
    kwargs = dict(
        block_size=8, max_new_tokens=16, small_block_size=4, mask_id=MASK, lengths=lengths
    )
    reference = fastdllm_cached_generate(model, prompt, **kwargs)
    optimized.reset()
    calls = _Calls(optimized)
    assert torch.equal(fastdllm_cached_generate(model, prompt, call=calls, **kwargs), reference)
    stats = optimized.cache_stats()
    assert stats["transitions"]["new"] == 1 and stats["fallbacks"] == {}
    assert stats["transitions"]["extend"] == calls.cached_read_runs() - 1 >= 2
    for row, n in enumerate(lengths.tolist()):
        assert torch.equal(reference[row, :n], prompt[row, :n])  # every prompt kept


def test_the_prefill_returns_the_last_row_and_a_cache_the_loop_passes_back(pair):
    model, optimized = pair
    optimized.reset()
    prompt = _prompt(1, 16, seed=1)
    out = optimized(input_ids=prompt, use_cache=True, update_past_key_values=True, block_size=8)
    cache = out.past_key_values
    assert isinstance(cache, LoopCache) and cache.get_seq_length() == 16
    plain = model(input_ids=prompt, use_cache=True, update_past_key_values=True, block_size=8)
    torch.testing.assert_close(out.logits[:, -1], plain.logits[:, -1])  # the next block's first
    assert not out.logits[:, :-1].any()  # prompt rows are not computed (the drop-in contract)
    assert dict(optimized.cache_stats()["transitions"]) == {"new": 1}
    block = torch.full((1, 8), MASK)
    block[0, 0] = int(plain.logits[0, -1].argmax())
    logits = optimized(
        input_ids=block, use_cache=True, past_key_values=cache, update_past_key_values=False
    ).logits
    theirs = model(
        input_ids=block,
        use_cache=True,
        past_key_values=plain.past_key_values,
        update_past_key_values=False,
    ).logits
    assert dict(optimized.cache_stats()["transitions"]) == {"new": 1, "step": 1}
    torch.testing.assert_close(logits[:, :-1], theirs[:, :-1])  # the rows the loop reads


def test_under_eviction_the_prefill_keeps_what_the_window_loops_first_call_keeps():
    """The prefill runs as the window [prompt ; a block of masks]: its kept sets are those of a
    MaskKV model called on that window with its block-causal mask (whose kept sets are the
    reference top-k of the block's votes: ``test_block_diffusion.py``)."""
    model = _model()
    prompt = _prompt(1, 24, seed=7)
    cached, window = _optimize(model, 5), _optimize(model, 5)
    cached(input_ids=prompt, use_cache=True, update_past_key_values=True, block_size=8)
    ids = torch.cat([prompt, torch.full((1, 8), MASK)], dim=1)  # (1, 32)
    window(ids, attention_mask=block_causal_mask(32, 8, kind="bool"))
    ours, theirs = cached.runtime.last_session.layers, window.runtime.last_session.layers
    assert [kept_positions(c) for c in ours] == [kept_positions(c) for c in theirs]
    assert all(max(map(len, kept_positions(c)[0])) == 5 for c in ours)  # evicted to the budget


@pytest.mark.parametrize("block_cache", [False, True], ids=["whole block", "block cache"])
def test_under_eviction_every_step_has_real_logits_and_the_cache_stays_bounded(block_cache):
    model = _model(torch.float32)
    optimized = _optimize(model, 6)
    seen = []

    def call(**kwargs):
        out = optimized(**kwargs)
        if not kwargs["update_past_key_values"]:
            rows = out.logits[:, :-1]  # the rows the loop reads (shifted)
            seen.append(bool(torch.isfinite(rows).all() and rows.abs().sum(-1).gt(0).all()))
        return out

    prompt = _prompt(1, 37, seed=2)
    kwargs = dict(block_size=8, max_new_tokens=24, small_block_size=4, mask_id=MASK)
    kwargs["use_block_cache"] = block_cache
    out = fastdllm_cached_generate(model, prompt, call=call, **kwargs)
    assert out.shape[1] >= 37 + 24 - 8 and not (out == MASK).any()
    assert seen and all(seen)
    stats = optimized.cache_stats()
    assert stats["transitions"]["extend"] >= 2 and stats["fallbacks"] == {}
    for layer in stats["layers"]:
        assert max(layer["kept_per_kv_head"]) <= 6


def test_inductor_matches_eager_on_the_cached_loop_under_eviction():
    """The loop's calls (a prefill window, block-cache refreshes and small-block steps, commits
    that extend) under Inductor give eager's tokens, on the cached path, for two prompts of
    other lengths; the windows growing block by block, and the second prompt, compile nothing
    new (each graph's guards admit the new sizes)."""
    model = _model(torch.float32)
    prompts = [_prompt(1, 37, seed=5), _prompt(1, 53, seed=6)]
    kwargs = dict(block_size=8, max_new_tokens=24, small_block_size=4, mask_id=MASK)
    runs = {}
    for backend in ("eager", "inductor"):
        optimized = maskkv_compile.optimize(
            model, budget=6, backend=backend, family="dream", mask_token_id=MASK
        )
        for i, prompt in enumerate(prompts):
            out = fastdllm_cached_generate(optimized, prompt, use_block_cache=True, **kwargs)
            runs[backend, i] = out
        stats = optimized.cache_stats()
        transitions = stats["transitions"]
        assert transitions["new"] == 2 and transitions["extend"] >= 4, stats
        assert transitions["block_refresh"] >= 1 and transitions["block_step"] >= 1, stats
        assert stats["fallbacks"] == {}
    for i in range(len(prompts)):
        assert torch.equal(runs["inductor", i], runs["eager", i])
    runtime = optimized.runtime
    # one compile a graph, but for the small-block steps' own size class (row_end of size 0)
    compiles = {g: runtime.compiled(g).compiles for g in ("prefill", "step", "step_kv", "reselect")}
    assert compiles == {"prefill": 1, "step": 1, "step_kv": 2, "reselect": 1}, compiles


def test_the_stand_ins_block_cache_reuses_the_refreshs_buffer():
    """The reference the block-cache tests stand on: a small-block call right after a refresh
    of the same tokens gives the refresh's rows; after the block's other tokens change, it
    still sees the refresh's K/V of them (the released approximation), a whole call does not."""
    model = _model()
    block = _prompt(1, 8, seed=11)
    read = dict(use_cache=True, update_past_key_values=False, use_block_cache=True)
    refresh = model(input_ids=block, **read)
    small = model(
        input_ids=block[:, 4:],
        block_past_key_values=refresh.block_past_key_values,
        replace_position=4,
        **read,
    )
    torch.testing.assert_close(small.logits, refresh.logits[:, 4:])
    changed = block.clone()
    changed[:, :4] = MASK
    stale = model(
        input_ids=changed[:, 4:],
        block_past_key_values=refresh.block_past_key_values,
        replace_position=4,
        **read,
    )
    fresh = model(input_ids=changed, use_cache=True, update_past_key_values=False)
    torch.testing.assert_close(stale.logits, small.logits)
    assert not torch.allclose(fresh.logits[:, 4:], small.logits)


def test_the_block_cache_reads_the_stale_kv_the_plain_model_reads(pair):
    """Fast-dLLM v2 with ``use_block_cache=True``: a small-block call computes the small block's
    rows against the K/V of the block's other rows as of the last refresh, as the released
    model does. Here that changes tokens against the loop without the block cache, and MaskKV
    gives the block-cache loop's."""
    model, optimized = pair
    prompt = _prompt(2, 70, seed=13)
    kwargs = dict(block_size=32, max_new_tokens=64, small_block_size=8, mask_id=MASK)
    kwargs["threshold"] = 0.02
    reference = fastdllm_cached_generate(model, prompt, use_block_cache=True, **kwargs)
    whole = fastdllm_cached_generate(model, prompt, **kwargs)
    assert not torch.equal(whole, reference)  # the stale K/V changed tokens
    optimized.reset()
    calls = _Calls(optimized)
    got = fastdllm_cached_generate(model, prompt, call=calls, use_block_cache=True, **kwargs)
    assert torch.equal(got, reference)
    stats = optimized.cache_stats()
    assert calls.small_block_calls > 0 and stats["fallbacks"] == {}
    # the prefill; the second block's first call extends (a refresh); the commits are steps
    commits = sum(stores for stores, _ in calls.log) - 1
    assert dict(stats["transitions"]) == {
        "new": 1,
        "block_refresh": calls.refreshes - 1,
        "block_step": calls.small_block_calls,
        "step": commits,
        "extend": 1,
    }
    buffer = stats["block_buffer"]
    assert buffer["small_steps"] == calls.small_block_calls and buffer["rows"] == 33  # +shift


def test_a_buffer_the_session_no_longer_holds_gets_the_whole_block(pair):
    """A small-block call with an older buffer of the block (a later refresh made another):
    the session holds the later one's K/V, so the whole block is computed (counted), and the
    rows are the whole block's."""
    model, optimized = pair
    _, read = _prefilled(optimized, seed=16)
    block = torch.full((1, 8), MASK)
    block[0, 0] = 7
    older = optimized(input_ids=block, use_block_cache=True, **read).block_past_key_values
    block[0, 4] = 9
    optimized(input_ids=block, use_block_cache=True, **read)
    with pytest.warns(maskkv_compile.CacheFallbackWarning, match="does not hold its buffer"):
        small = optimized(
            input_ids=block[:, 4:],
            use_block_cache=True,
            block_past_key_values=older,
            replace_position=4,
            **read,
        )
    whole = optimized(input_ids=older.tokens, **read)  # the older buffer's tokens, updated
    torch.testing.assert_close(small.logits, whole.logits[:, 4:])
    stats = optimized.cache_stats()
    assert stats["fallbacks"] == {"block_buffer_lost": 1}
    assert dict(stats["transitions"]) == {"new": 1, "block_refresh": 2, "step": 2}


def _taking_turns(optimized, model, runs) -> tuple[list, dict]:
    """Each (prompt, keywords) of ``runs`` as its own generation on ``optimized``, the loops
    calling it in turns, one call each (threads); their tokens, and what the calls were."""
    turn = threading.Condition()
    state = {"next": 0, "done": [False, False], "small": 0, "order": []}
    outputs = [None, None]

    def loop(me):
        def call(**kw):
            with turn:
                turn.wait_for(lambda: state["next"] == me or state["done"][1 - me])
                state["small"] += kw.get("block_past_key_values") is not None
                state["order"].append(me)
                out = optimized(**kw)
                state["next"] = 1 - me
                turn.notify_all()
            return out

        try:
            prompt, kwargs = runs[me]
            outputs[me] = fastdllm_cached_generate(model, prompt, call=call, **kwargs)
        finally:
            with turn:
                state["done"][me] = True
                turn.notify_all()

    threads = [threading.Thread(target=loop, args=(me,)) for me in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outputs, state


def test_two_loops_taking_turns_on_one_model_each_get_the_plain_models_tokens(pair):
    """Two block-cache generations (other prompts and batch sizes) call one MaskKV model in
    turns, one call each: each session holds its own buffer's K/V, so every small-block call is
    still a block step, and each loop gets the plain model's tokens."""
    model, optimized = pair
    prompts = [_prompt(1, 40, seed=21), _prompt(2, 52, seed=22)]
    kwargs = dict(block_size=8, max_new_tokens=24, small_block_size=4, mask_id=MASK)
    kwargs.update(use_block_cache=True, threshold=0.3)
    references = [fastdllm_cached_generate(model, p, **kwargs) for p in prompts]
    optimized.reset()
    outputs, state = _taking_turns(optimized, model, [(p, kwargs) for p in prompts])
    for got, reference in zip(outputs, references):
        assert got is not None and torch.equal(got, reference)
    stats = optimized.cache_stats()
    assert stats["fallbacks"] == {}
    assert stats["transitions"]["new"] == 2 and stats["transitions"]["block_step"] == state["small"]
    assert state["small"] > 0 and state["order"][:20] == [0, 1] * 10  # they took turns


@pytest.mark.parametrize("budget", [10**6, 3], ids=["full budget, block cache", "evicting"])
def test_two_loops_of_one_prompt_taking_turns_keep_their_own_sessions(budget):
    """Two generations of one prompt (other small blocks and thresholds), each with its own
    cache object, calling one MaskKV model in turns. Routing matched sessions by the window's
    tokens, so the two shared one: with the block cache, one loop's refresh dropped the other's
    buffer (its small-block calls then read fresh K/V where the plain model reads stale ones),
    and under eviction one loop's prefill re-selected the other's prefix. A loop's calls now go
    on with its own cache object's sessions only: each gets what it gets alone. Found by a
    randomized hunt."""
    model = _model()
    if budget > 3:
        prompt, block, smalls, thresholds, new = (
            _prompt(2, 18, seed=10),
            16,
            (16, 4),
            (0.95, 0.3),
            (32, 16),
        )
    else:
        prompt, block, smalls, thresholds, new = (
            _prompt(1, 35, seed=5),
            8,
            (8, 4),
            (0.3, 0.3),
            (16, 16),
        )
    runs = [
        (
            prompt,
            dict(
                block_size=block,
                small_block_size=small,
                threshold=threshold,
                max_new_tokens=tokens,
                mask_id=MASK,
                use_block_cache=budget > 3,
            ),
        )
        for small, threshold, tokens in zip(smalls, thresholds, new)
    ]
    optimized = _optimize(model, budget)
    outputs, state = _taking_turns(optimized, model, runs)
    for got, (_, kwargs) in zip(outputs, runs):
        alone = fastdllm_cached_generate(model, prompt, call=_optimize(model, budget), **kwargs)
        assert got is not None and torch.equal(got, alone)
    assert optimized.cache_stats()["fallbacks"] == {} and state["order"][:6] == [0, 1] * 3


def test_block_cache_calls_off_the_protocol_are_refused(pair):
    model, optimized = pair
    cache, read = _prefilled(optimized, seed=13)
    block = torch.full((1, 8), MASK)
    refresh = optimized(input_ids=block, use_block_cache=True, **read)
    buffer = refresh.block_past_key_values
    assert buffer.get_seq_length() == 8
    theirs = model(input_ids=block, use_block_cache=True, use_cache=True).block_past_key_values
    with pytest.raises(ValueError, match="DynamicCache was not made by this MaskKV model"):
        optimized(
            input_ids=block[:, :4], use_block_cache=True, block_past_key_values=theirs, **read
        )
    with pytest.raises(ValueError, match="replace_position=6"):
        optimized(
            input_ids=block[:, :4],
            use_block_cache=True,
            block_past_key_values=buffer,
            replace_position=6,
            **read,
        )
    with pytest.raises(ValueError, match="use_block_cache=True on a call that stores"):
        optimized(
            input_ids=_prompt(1, 8, seed=14),
            use_cache=True,
            past_key_values=cache,
            update_past_key_values=True,
            use_block_cache=True,
        )
    finished = _prompt(1, 8, seed=15)
    optimized(
        input_ids=finished, use_cache=True, past_key_values=cache, update_past_key_values=True
    )
    with pytest.raises(ValueError, match="holds the block at 32"):  # the buffer of a block done
        optimized(
            input_ids=block[:, :4],
            use_block_cache=True,
            block_past_key_values=buffer,
            replace_position=0,
            **read,
        )
    with pytest.raises(ValueError, match="block cache keywords.*sends store_kv="):  # SDAR's
        optimized(
            input_ids=block,
            past_key_values=DynamicCache(),
            store_kv=False,
            use_block_cache=True,
        )


def test_a_row_that_stops_ends_the_loop_as_on_the_plain_model(pair):
    model, optimized = pair
    optimized.reset()
    prompt = _prompt(1, 20, seed=3)
    kwargs = dict(block_size=8, max_new_tokens=32, small_block_size=8, mask_id=MASK)
    free = fastdllm_cached_generate(model, prompt, **kwargs)
    stop = int(free[0, 26])  # a token the loop commits in its second block
    reference = fastdllm_cached_generate(model, prompt, stop_token=stop, **kwargs)
    assert reference.shape[1] < free.shape[1]
    assert torch.equal(
        fastdllm_cached_generate(optimized, prompt, stop_token=stop, **kwargs), reference
    )


@pytest.mark.parametrize("seed", range(2))
def test_random_sequences_of_generations_leak_nothing(seed):
    """One optimized model drives a seeded sequence of cached-loop generations (prompts, blocks,
    batch sizes), resets and in-place weight changes; every generation equals the plain
    model's with the weights of the moment."""
    rng = random.Random(seed)
    model = _model()
    optimized = _optimize(model, 10**6)
    for _ in range(10):
        action = rng.choice(["generate", "generate", "generate", "reset", "weights"])
        if reset_or_perturb(action, rng, model, optimized):
            continue
        block = rng.choice([4, 8])
        prompt = _prompt(rng.choice([1, 2]), rng.randint(2, 3 * block + 1), rng.randrange(100))
        kwargs = dict(block_size=block, max_new_tokens=2 * block, mask_id=MASK)
        kwargs["small_block_size"] = rng.choice([block // 2, block])
        kwargs["use_block_cache"] = rng.random() < 0.5
        got = fastdllm_cached_generate(optimized, prompt, **kwargs)
        assert torch.equal(got, fastdllm_cached_generate(model, prompt, **kwargs)), kwargs


def test_calls_off_the_protocol_are_refused_with_what_was_seen(pair):
    model, optimized = pair
    optimized.reset()
    prompt = _prompt(1, 16, seed=4)
    in_place = maskkv_compile.optimize(model, budget=10**6, backend="eager", mask_token_id=MASK)
    with pytest.raises(ValueError, match='would be zeros: optimize with family="dream"'):
        in_place(input_ids=prompt, use_cache=True, update_past_key_values=True, block_size=8)
    with pytest.raises(ValueError, match="block_size=8 does not divide its 12 tokens"):
        optimized(
            input_ids=prompt[:, :12], use_cache=True, update_past_key_values=True, block_size=8
        )
    # blocks of 64: the model's refinement calls make their mask on blocks of 32
    long = _prompt(1, 64, seed=5)
    cache = optimized(
        input_ids=long, use_cache=True, update_past_key_values=True, block_size=64
    ).past_key_values
    with pytest.raises(ValueError, match="on blocks of 32.*divides 32"):
        optimized(
            input_ids=torch.full((1, 64), MASK),
            use_cache=True,
            past_key_values=cache,
            update_past_key_values=False,
        )
    # the plain model's cache, holding a prefill MaskKV never saw
    theirs = model(input_ids=long, use_cache=True, update_past_key_values=True, block_size=32)
    with pytest.raises(ValueError, match="holds 64 tokens this MaskKV model did not store"):
        optimized(
            input_ids=torch.full((1, 32), MASK),
            use_cache=True,
            past_key_values=theirs.past_key_values,
            update_past_key_values=False,
        )
    with pytest.raises(ValueError, match="mask token"):
        optimized(
            input_ids=torch.full((1, 8), MASK),
            use_cache=True,
            update_past_key_values=True,
            block_size=8,
        )
