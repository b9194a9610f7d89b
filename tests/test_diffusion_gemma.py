"""DiffusionGemma under transformers' own ``generate``: exact at full budget, kept sets equal the
canvas queries' top-k under eviction, the user's cache object stays consistent, clear refusals."""

from __future__ import annotations

import io

import pytest
import torch
from maskkv_compile.passes import UnsupportedModelError

import maskkv_compile
from maskkv_compile.diffusion_gemma import DiffusionGemmaMaskKV
from maskkv_compile.tiny_models import tiny_diffusion_gemma


@pytest.fixture(scope="module")
def model():
    return tiny_diffusion_gemma(dtype=torch.float64)


def _generate(net, prompt, seed=0, **kwargs):
    torch.manual_seed(seed)  # generate draws the starting canvas from torch's RNG
    out = net.generate(prompt, max_denoising_steps=4, **kwargs)
    return out if torch.is_tensor(out) else out.sequences


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("new_tokens", [16, 32])
def test_full_budget_equals_the_plain_model(model, seed, new_tokens):
    """One and two canvases: with a budget of at least the cache length nothing is evicted and
    the tokens are the plain model's, while the decoder still ran through MaskKV's routing."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 120, (1, 30 + 7 * seed), generator=gen)
    want = _generate(model, prompt, seed, max_new_tokens=new_tokens)
    net = maskkv_compile.optimize(model, budget=4096)
    assert isinstance(net, DiffusionGemmaMaskKV)
    got = _generate(net, prompt, seed, max_new_tokens=new_tokens)
    assert torch.equal(got, want)
    stats = net.cache_stats()
    assert stats["decoder_calls"] >= new_tokens // 16 and stats["evictions"] == 0
    assert stats["encoder_calls"] == new_tokens // 16
    assert model.config._attn_implementation == "sdpa" and "forward" not in model.__dict__


def test_full_budget_padded_batch_equals_the_plain_model(model):
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 120, (2, 36), generator=gen)
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0
    prompt[1, :9] = 0
    want = _generate(model, prompt, attention_mask=mask, max_new_tokens=32)
    got = _generate(
        maskkv_compile.optimize(model, budget=4096), prompt, attention_mask=mask, max_new_tokens=32
    )
    assert torch.equal(got, want)


def _left_padded(seed, lengths=(40, 31), pad=0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 120, (len(lengths), max(lengths)), generator=gen)
    mask = torch.ones_like(prompt)
    for row, length in enumerate(lengths):
        mask[row, : max(lengths) - length] = 0
        prompt[row, : max(lengths) - length] = pad
    return prompt, mask


@pytest.mark.parametrize("seed", range(3))
def test_padded_eviction_keeps_each_rows_top_real_entries(model, seed):
    """A left-padded batch under eviction: each row keeps the top of its canvas votes among its
    real prompt entries (padding keys get no attention, so no votes), in position order."""
    prompt, mask = _left_padded(seed)
    budget = 6
    net = maskkv_compile.optimize(model, budget=budget)
    _generate(net, prompt, seed, attention_mask=mask, max_new_tokens=16)
    layer, votes = _reference_votes(prompt, seed, attention_mask=mask)
    real = mask.bool()[:, None, :].expand_as(votes)
    want = votes.masked_fill(~real, float("-inf")).topk(budget, -1).indices.sort(-1).values
    (kept,) = [entry for entry in net.cache_stats()["layers"] if entry["layer"] == layer]
    assert torch.equal(torch.tensor(kept["positions"]), want)
    assert bool(mask.gather(1, want[:, 0]).all())  # no padding slot kept


@pytest.mark.parametrize("seed", range(4))
def test_padded_eviction_over_canvases_stays_finite_and_masks_padding(model, seed):
    """Three canvases, one row shorter than the budget: that row keeps its real entries first
    and padding slots after them, which the rebuilt masks hide (finite logits, real tokens),
    and the next canvases vote over [kept ; new canvas] per row."""
    prompt, mask = _left_padded(seed, lengths=(44, 5))
    budget, canvas = 12, model.config.canvas_length
    net = maskkv_compile.optimize(model, budget=budget)
    logits = []

    def hook(module, args, output):
        logits.append(output)

    handle = model.lm_head.register_forward_hook(hook)
    try:
        torch.manual_seed(seed)
        out = net.generate(
            prompt, attention_mask=mask, max_new_tokens=3 * canvas, max_denoising_steps=3
        )
    finally:
        handle.remove()
    assert logits and all(bool(torch.isfinite(x).all()) for x in logits)
    stats = net.cache_stats()
    assert stats["votes"] == 3 and stats["evictions"] == 3
    (full,) = stats["layers"]
    positions = torch.tensor(full["positions"])  # (B, Hkv, budget)
    # row 1 had 5 real prompt tokens at canvas 1: 5 real + 7 padding slots; by canvas 3 its
    # kept slots are real generated or prompt positions again (2 canvases appended)
    assert positions.shape[-1] == budget
    real = (positions >= 44 - 5) | (positions >= 44)
    assert bool(real[1].all()) and bool((positions[0] >= 0).all())
    assert out.sequences.shape == (2, 44 + 3 * canvas)


def _eager_weights(module, query, key, value, attention_mask, **kwargs):
    """transformers' eager attention (it returns the softmax weights) on SDPA's bool masks:
    DiffusionGemma's own eager mask builder fails on a padded batch (it reads the dtype of the
    canvas ids), so the test builds SDPA's masks and adds them as a float bias here."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
            ~attention_mask, float("-inf")
        )
    groups = query.shape[1] // key.shape[1]
    scores = query @ repeat_kv(key, groups).transpose(-1, -2) * kwargs["scaling"]
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(-1).nan_to_num(0.0)  # a padding query that sees no key: zeros
    out = (weights @ repeat_kv(value, groups)).transpose(1, 2).contiguous()
    return out, weights


def _reference_votes(prompt, seed, attention_mask=None, with_mass=False, **options):
    """The first decoder call's canvas votes over the prompt cache at the full-attention layer,
    from the attention weights of a plain softmax attention on a separate copy of the model
    (``options``: its config; ``with_mass``: also each query head's attention mass on the
    cache, (B, H))."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("test_eager_weights", _eager_weights)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_eager_weights", sdpa_mask)
    eager = tiny_diffusion_gemma(dtype=torch.float64, **options)
    eager.set_attn_implementation("test_eager_weights")
    kinds = eager.config.get_text_config().layer_types
    (layer,) = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    attention = eager.model.decoder.layers[layer].self_attn
    seen = []

    def hook(module, args, output):
        if not seen:
            weights = output[1]  # (B, H, C, P + C)
            canvas = weights.shape[2]
            groups = module.num_key_value_groups
            per_kv = weights[..., : weights.shape[-1] - canvas].sum(2)  # (B, H, P)
            seen.append(per_kv.unflatten(1, (-1, groups)).sum(2))  # (B, Hkv, P)
            seen.append(per_kv.sum(-1))  # (B, H): the canvas queries' mass on the cache

    handle = attention.register_forward_hook(hook)
    try:
        padding = {} if attention_mask is None else {"attention_mask": attention_mask}
        _generate(eager, prompt, seed, max_new_tokens=16, **padding)
    finally:
        handle.remove()
    return (layer, seen[0], seen[1]) if with_mass else (layer, seen[0])


@pytest.mark.parametrize("seed, recent", [(0, 0), (1, 0), (2, 0), (0, 2), (1, 6)])
def test_kept_sets_are_the_canvas_queries_top_k(model, seed, recent):
    """Each full layer keeps its top-budget cache entries by the canvas queries' votes; with
    ``recent``, the entries nearest the canvas first."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 120, (1, 40 + 5 * seed), generator=gen)
    budget = 6
    net = maskkv_compile.optimize(model, budget=budget, recent=recent)
    _generate(net, prompt, seed, max_new_tokens=16)
    layer, votes = _reference_votes(prompt, seed)
    if recent:
        votes[..., votes.shape[-1] - recent :] = float("inf")
    want = votes.topk(budget, -1).indices.sort(-1).values
    stats = net.cache_stats()
    (kept,) = [entry for entry in stats["layers"] if entry["layer"] == layer]
    assert torch.equal(torch.tensor(kept["positions"]), want)
    assert stats["votes"] == 1 and stats["evictions"] == 1


@pytest.mark.parametrize("seed", range(2))
def test_maskkv_splits_a_layers_budget_over_its_kv_heads_by_prompt_preference(seed):
    """Two KV heads in the full layer: MaskKV's head allocation (the canvas queries' attention
    mass on the cache, alpha 0.1) sets each head's budget, and each head keeps the top of its
    own votes; a layer's heads are padded to the largest budget with slots not held. The
    uniform policy keeps the budget in every head."""
    from maskkv_compile.budgets import maskkv_head_budgets_rows

    options = dict(num_global_key_value_heads=2)
    model = tiny_diffusion_gemma(dtype=torch.float64, **options)
    prompt = torch.randint(3, 120, (1, 64), generator=torch.Generator().manual_seed(seed))
    budget = 30
    layer, votes, mass = _reference_votes(prompt, seed, with_mass=True, **options)
    canvas = model.config.canvas_length
    want_budgets = maskkv_head_budgets_rows(
        mass, torch.tensor([canvas]), budget, torch.tensor([64]), 2
    )[0]  # (Hkv,)
    assert int(want_budgets.sum()) == 2 * budget
    assert want_budgets[0] != want_budgets[1]  # the heads do prefer the cache differently
    for policy, budgets in (("maskkv", want_budgets), ("mask_voting_uniform", None)):
        net = maskkv_compile.optimize(model, budget=budget, policy=policy)
        _generate(net, prompt, seed, max_new_tokens=16)
        (kept,) = [e for e in net.cache_stats()["layers"] if e["layer"] == layer]
        budgets = [budget, budget] if budgets is None else budgets.tolist()
        assert kept["kept_per_kv_head"] == budgets, policy
        positions = torch.tensor(kept["positions"])[0]  # (Hkv, widest), -1 where not held
        for head, count in enumerate(budgets):
            want = votes[0, head].topk(count).indices.sort().values
            assert positions[head, :count].tolist() == want.tolist(), (policy, head)
            assert bool((positions[head, count:] == -1).all())


def test_ragged_heads_over_canvases_stay_finite_and_exact_at_full_budget():
    """Per-head budgets across three canvases (the encoder appends to ragged heads, the next
    canvas votes per head over its held slots), with a padded batch: every logit finite; and
    at full budget the two-KV-head model equals the plain one."""
    options = dict(num_global_key_value_heads=2)
    model = tiny_diffusion_gemma(dtype=torch.float64, **options)
    prompt, mask = _left_padded(3, lengths=(44, 20))
    logits = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: logits.append(out))
    net = maskkv_compile.optimize(model, budget=10)
    try:
        torch.manual_seed(0)
        net.generate(prompt, attention_mask=mask, max_new_tokens=48, max_denoising_steps=3)
    finally:
        handle.remove()
    stats = net.cache_stats()
    assert stats["votes"] == 3 and all(bool(torch.isfinite(x).all()) for x in logits)
    (full,) = stats["layers"]
    assert sum(full["kept_per_kv_head"]) == 2 * 10
    want = _generate(model, prompt, 1, attention_mask=mask, max_new_tokens=32)
    got = _generate(
        maskkv_compile.optimize(model, budget=4096),
        prompt,
        1,
        attention_mask=mask,
        max_new_tokens=32,
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [7, 16])
@pytest.mark.parametrize("padded", [False, True])
def test_a_long_prefill_goes_in_chunks_and_gives_the_same_tokens(model, chunk, padded, monkeypatch):
    """``prefill_chunk``: the encoder encodes a prompt longer than the chunk in ceil(P / chunk)
    calls onto the cache (chunks below and above the sliding window of 8; the attention inside a
    chunk in query chunks of 4 against each one's band of keys). Over two canvases the tokens
    are the plain model's at full budget, and under eviction those of one whole prefill, with
    the same kept positions; batch 1 and a left-padded batch of 2."""
    from maskkv_compile.diffusion_gemma import attention

    monkeypatch.setattr(attention, "QUERY_CHUNK", 4)
    banded = []
    ranges = attention.banded_key_ranges
    monkeypatch.setattr(
        attention,
        "banded_key_ranges",
        lambda mask, rows: banded.append(ranges(mask, rows)) or banded[-1],
    )
    prompt, mask = _left_padded(chunk, (45, 33) if padded else (45,))
    kwargs = dict(attention_mask=mask, max_new_tokens=32)
    want = _generate(model, prompt, 2, **kwargs)
    net = maskkv_compile.optimize(model, budget=4096, prefill_chunk=chunk)
    assert torch.equal(_generate(net, prompt, 2, **kwargs), want)
    assert net.cache_stats()["prefill_chunks"] == -(-45 // chunk)
    assert net.cache_stats()["encoder_calls"] == 2  # the prefill and the first canvas
    assert any(r is not None for r in banded)  # some chunk's attention went in bands
    whole = maskkv_compile.optimize(model, budget=6, prefill_chunk=0)
    chunked = maskkv_compile.optimize(model, budget=6, prefill_chunk=chunk)
    want = _generate(whole, prompt, 2, **kwargs)
    assert whole.cache_stats()["prefill_chunks"] == 0
    assert torch.equal(_generate(chunked, prompt, 2, **kwargs), want)
    assert chunked.cache_stats()["evictions"] == whole.cache_stats()["evictions"] > 0
    assert chunked.cache_stats()["layers"] == whole.cache_stats()["layers"]


@pytest.mark.parametrize("budget", [6, 4096])
def test_generates_encoder_calls_stop_once_the_cache_is_written(model, budget):
    """``generate`` reads its encoder calls for the cache alone: on the optimized model the last
    encoder layer writes its K/V and stops, so its MLP and the final norm never run, in chunks
    and whole, on a fresh cache and on an evicted one. Tokens equal the plain model's at full
    budget and, under eviction, a model whose encoder runs whole (a direct encoder call still
    returns its hidden states)."""
    encoder = model.model.encoder.language_model
    ran = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, module in (("mlp", encoder.layers[-1].mlp), ("norm", encoder.norm))
    ]
    try:
        prompt, mask = _left_padded(3, (45, 33))
        kwargs = dict(attention_mask=mask, max_new_tokens=48)
        want = _generate(model, prompt, 1, **kwargs)
        assert ran.count("mlp") == ran.count("norm") == 3  # the prompt and two canvases
        ran.clear()
        net = maskkv_compile.optimize(model, budget=budget, prefill_chunk=16)
        got = _generate(net, prompt, 1, **kwargs)
        assert ran == []
        stats = net.cache_stats()
        assert stats["cache_only_encoder_calls"] == stats["encoder_calls"] == 3  # + 2 canvases
        assert stats["prefill_chunks"] == 3
        assert stats["evictions"] == (3 if budget == 6 else 0)
        if budget == 4096:
            assert torch.equal(got, want)
        with net._routed():
            out = model.model.encoder(input_ids=prompt[:1, :20])
        assert out.last_hidden_state.shape == (1, 20, model.config.get_text_config().hidden_size)
        assert ran == ["mlp", "norm"]
    finally:
        for hook in hooks:
            hook.remove()


def test_sliding_attention_in_bands_of_a_quarter_window_equals_the_whole_call():
    """A long sliding-window call goes in bands of a quarter of the window (128 queries for a
    window of 512, each against the 639 keys it may see), and equals SDPA over the whole
    (S, S + cached) mask (float64)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from maskkv_compile.diffusion_gemma import attention

    net = tiny_diffusion_gemma(sliding_window=512, dtype=torch.float64)
    module = net.model.encoder.language_model.layers[0].self_attn
    assert module.sliding_window == 512 and attention.query_chunk(module) == 128
    rows, cached, heads = 1024, 511, module.config.num_attention_heads
    kv_heads = heads // module.num_key_value_groups
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, rows, module.head_dim, generator=gen, dtype=torch.float64)
    key, value = (
        torch.randn(1, kv_heads, cached + rows, module.head_dim, generator=gen, dtype=torch.float64)
        for _ in range(2)
    )
    at = torch.arange(rows)[:, None] + cached  # (S, 1) absolute query positions
    keys = torch.arange(cached + rows)[None]  # (1, S + cached)
    mask = ((keys <= at) & (keys > at - 512))[None, None]  # (1, 1, S, S + cached)
    kwargs = dict(dropout=0.0, scaling=1.0, sliding_window=512, is_causal=True)
    seen = []
    ranges = attention.banded_key_ranges

    def spy(m, chunk):
        seen.append(ranges(m, chunk))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "banded_key_ranges", spy)
        got, _ = attention.maskkv_sdpa(module, query, key, value, mask, **kwargs)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    assert len(seen[0]) == rows // 128 and all(hi - lo == 639 for _, lo, hi in seen[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_the_users_cache_holds_kept_plus_each_new_canvas(model):
    """Across canvases the full layer's cache is the budget after every vote, the encoder
    appends each finished canvas to it, and every kept position is a real earlier one."""
    prompt = torch.randint(3, 120, (1, 50), generator=torch.Generator().manual_seed(1))
    budget, canvas = 8, model.config.canvas_length
    net = maskkv_compile.optimize(model, budget=budget)
    torch.manual_seed(0)
    out = net.generate(
        prompt, max_new_tokens=3 * canvas, max_denoising_steps=3, return_dict_in_generate=True
    )
    stats = net.cache_stats()
    assert stats["votes"] == 3 and stats["encoder_calls"] == 3
    (full,) = stats["layers"]
    positions = torch.tensor(full["positions"])
    assert positions.shape[-1] == budget
    assert bool((positions.diff(dim=-1) > 0).all()) and int(positions.max()) < 50 + 2 * canvas
    keys = out.cache.layers[full["layer"]].keys
    assert keys.shape[-2] == budget  # the last canvas voted and evicted; it was not encoded
    assert stats["seen"] == 50 + 2 * canvas


def _two_turns(net, model, padded):
    """Two ``generate`` calls on one cache, a chat's second turn: the first canvas (returned,
    never encoded) and a new message as the uncached ids. ``padded``: a batch of 2 whose second
    row's prompt is left-padded (True), or whose second row's message is (``"message"``: the
    padding then lies inside the encoder call on the held cache). Returns both outputs'
    sequences, the position ids every encoder and decoder call got, the cache's length after
    each turn, and the cache."""
    gen = torch.Generator().manual_seed(3)
    first = torch.randint(3, 120, (2 if padded else 1, 40), generator=gen)
    mask = torch.ones_like(first)
    if padded is True:
        first[1, :11], mask[1, :11] = 0, 0
    message = torch.randint(3, 120, (first.shape[0], 12), generator=gen)
    message_mask = torch.ones_like(message)
    if padded == "message":
        message[1, :7], message_mask[1, :7] = 0, 0
    positions = []

    def record(module, args, kwargs):
        where = kwargs.get("position_ids", kwargs.get("decoder_position_ids"))
        positions.append(where.clone())

    hooks = [
        m.register_forward_pre_hook(record, with_kwargs=True)
        for m in (model.model.encoder, model.model.decoder)
    ]
    try:
        torch.manual_seed(0)
        out = net.generate(
            first,
            attention_mask=mask,
            max_new_tokens=16,
            max_denoising_steps=3,
            return_dict_in_generate=True,
        )
        lengths = [out.cache.get_seq_length()]
        ids = torch.cat([out.sequences[:, 40:], message], 1)
        canvas = torch.ones_like(out.sequences[:, 40:])
        mask = torch.cat([mask, canvas, message_mask], 1)  # the canvas is real
        torch.manual_seed(1)
        again = net.generate(
            ids,
            cache=out.cache,
            attention_mask=mask,
            max_new_tokens=16,
            max_denoising_steps=3,
            return_dict_in_generate=True,
        )
        lengths.append(again.cache.get_seq_length())
    finally:
        for hook in hooks:
            hook.remove()
    return out.sequences, again.sequences, positions, lengths, again.cache


@pytest.mark.parametrize("padded", [False, True, "message"])
def test_a_second_turn_on_an_evicted_cache_gets_the_plain_models_positions(padded):
    """A chat's second turn passes the returned cache back to ``generate``, which counts the
    new tokens' positions from ``cache.get_seq_length()``. An evicted full layer still answers
    the tokens written (here the first layer is a full one, the layer transformers asks): every
    encoder and decoder call gets the plain model's positions, and at full budget the tokens
    are the plain model's over both turns, also when the new message is padded (the encoder's
    full layers before its last saw the message's padding: found by a randomized hunt)."""
    kinds = ["full_attention", "sliding_attention", "full_attention"]
    model = tiny_diffusion_gemma(dtype=torch.float64, layers=3, layer_types=kinds)
    first, second, positions, lengths, cache = _two_turns(model, model, padded)
    full = _two_turns(maskkv_compile.optimize(model, budget=4096), model, padded)
    assert torch.equal(full[0], first) and torch.equal(full[1], second)
    for got, want in zip(full[4].layers, cache.layers):  # every layer's K/V after two turns
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-12)
    net = maskkv_compile.optimize(model, budget=6)
    evicted = _two_turns(net, model, padded)
    assert net.cache_stats()["votes"] == 2 and net.cache_stats()["evictions"] == 2
    assert evicted[3] == lengths == [40, 40 + 16 + 12]
    assert len(evicted[2]) == len(positions)
    assert all(torch.equal(a, b) for a, b in zip(evicted[2], positions))
    assert bool(torch.isfinite(evicted[1].float()).all())
    for layer in net.cache_stats()["layers"]:
        kept = torch.tensor(layer["positions"])
        assert kept.shape[-1] <= 6 and int(kept.max()) < lengths[1]
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        evicted[4].crop(-4)
    saved = io.BytesIO()  # the user's cache saves and loads with its evicted layers
    torch.save(evicted[4], saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    assert loaded.get_seq_length() == lengths[1]
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(loaded.layers, evicted[4].layers))
    # the cache keeps MaskKV's record of its slots: a turn on it after a reset(), after another
    # chat on the same model, on a copy (a branched chat) or once saved and loaded, runs as a
    # turn on the cache itself (a reset or another chat refused it: found by a randomized hunt)
    import copy

    message = torch.randint(3, 120, (evicted[1].shape[0], 4))
    branch, saved = copy.deepcopy(evicted[4]), copy.deepcopy(loaded)
    net.reset()
    _generate(net, torch.randint(3, 120, (1, 30)), max_new_tokens=16)  # another chat between
    turns = [_generate(net, message, 5, cache=c, max_new_tokens=16) for c in (branch, saved)]
    assert torch.equal(turns[0], turns[1])
    assert torch.equal(_generate(net, message, 5, cache=evicted[4], max_new_tokens=16), turns[0])


@pytest.mark.parametrize(
    "how, length",
    [("static", 62), ("hybrid", 62), ("default length", 286), ("max_length", 62), ("cache", 64)],
)
def test_a_static_cache_runs_the_plain_model_at_full_budget_and_is_refused_under_eviction(
    model, how, length
):
    """Every way ``generate`` gets a static cache: transformers' static implementations (their
    deprecated names too), the length from its default ``max_new_tokens`` or from
    ``max_length``, or a ``StaticCache`` passed in. With a budget of at least the cache's
    length the plain model runs; under it, a refusal that names the length. Found by a
    randomized hunt: a cache passed in crashed, the deprecated names and the default length
    were misread."""
    from transformers import StaticCache

    prompt = torch.randint(3, 120, (1, 30), generator=torch.Generator().manual_seed(0))

    def kwargs():  # a fresh cache for every call
        given = {"disable_compile": True, "max_new_tokens": 32}
        if how == "cache":
            config = model.config.get_text_config(decoder=True)
            return {**given, "cache": StaticCache(config=config, max_cache_len=64)}
        if how == "default length":
            del given["max_new_tokens"]
        if how == "max_length":
            given = {"disable_compile": True, "max_length": 62}
        return {**given, "cache_implementation": "hybrid" if how == "hybrid" else "static"}

    want = _generate(model, prompt, **kwargs())
    assert torch.equal(
        _generate(maskkv_compile.optimize(model, budget=4096), prompt, **kwargs()), want
    )
    with pytest.raises(UnsupportedModelError, match=rf"StaticCache.*cache length \({length};"):
        _generate(maskkv_compile.optimize(model, budget=6), prompt, **kwargs())


def test_refusals(model):
    prompt = torch.randint(3, 120, (2, 30))
    with pytest.raises(UnsupportedModelError, match="StaticCache"):
        _generate(
            maskkv_compile.optimize(model, budget=4),
            prompt[:1],
            max_new_tokens=16,
            cache_implementation="static",
        )
    with pytest.raises(UnsupportedModelError, match="mask-voting policies only"):
        maskkv_compile.optimize(model, budget=4, policy="snapkv")
    with pytest.raises(UnsupportedModelError, match="does not take revote"):
        maskkv_compile.optimize(model, budget=4, revote=2)
    for option in ({"mask_token_id": 5}, {"family": "dream"}):  # no [MASK] token, no shift
        with pytest.raises(UnsupportedModelError, match=f"does not take {next(iter(option))}"):
            maskkv_compile.optimize(model, budget=4, **option)
    net = maskkv_compile.optimize(model, budget=4)  # the model's attributes, as transformers reads
    assert (net.config, net.generation_config) == (model.config, model.generation_config)
    assert (net.device, net.dtype) == (model.device, model.dtype)
    assert net.maskkv_config.budget == 4
    # a cache layer of another kind keeps more than keys and values: no silent gather
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class OwnLayer(DynamicLayer):
        pass

    cache = DynamicCache(config=model.config)
    cache.layers[-1] = OwnLayer()
    with pytest.raises(UnsupportedModelError, match=r"plain DynamicCache layers only.*OwnLayer"):
        _generate(maskkv_compile.optimize(model, budget=4), prompt[:1], cache=cache)


def _three_full_layers():
    kinds = ["sliding_attention"] + ["full_attention"] * 3
    return tiny_diffusion_gemma(dtype=torch.float64, layers=4, layer_types=kinds)


def test_calibrate_measures_each_full_layers_attention_sub_layer_on_the_first_canvas():
    """``calibrate`` on DiffusionGemma: one importance per full layer, 1 - cos(h_in, h_in + the
    layer's normed attention output) over the first decoder call's canvas rows, measured here
    from the attention module's own output; a layer whose attention writes nothing scores 0;
    the caller's RNG is untouched."""
    from maskkv_compile.profile import attention_importance

    model = _three_full_layers()
    prompts = [
        torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    layers = model.model.decoder.layers
    seen: dict[int, list] = {}

    def layer_input(i):
        return lambda module, args, kwargs: seen.setdefault(i, []).append(
            [args[0] if args else kwargs["hidden_states"]]
        )

    def attention(i):
        def hook(module, args, output):
            seen[i][-1].append(layers[i].post_attention_layernorm(output[0]))

        return hook

    full = (1, 2, 3)
    hooks = [layers[i].register_forward_pre_hook(layer_input(i), with_kwargs=True) for i in full]
    hooks += [layers[i].self_attn.register_forward_hook(attention(i)) for i in full]
    want = []
    for prompt in prompts:
        seen.clear()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.generate(prompt, max_new_tokens=16, max_denoising_steps=1)
        want.append([attention_importance(h, h + a) for h, a in (seen[i][0] for i in full)])
    for hook in hooks:
        hook.remove()
    state = torch.random.get_rng_state()
    profile = maskkv_compile.calibrate(model, prompts)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert profile.fingerprint["full_layers"] == [1, 2, 3] and profile.n_layers == 3
    assert profile.importance == pytest.approx(torch.tensor(want).mean(0).tolist(), abs=1e-12)
    assert min(profile.importance) > 0
    with torch.no_grad():
        layers[2].self_attn.o_proj.weight.zero_()
    muted = maskkv_compile.calibrate(model, prompts[:1])
    assert muted.importance[1] == pytest.approx(0.0, abs=1e-12) and muted.importance[0] > 0


def test_a_layer_profile_splits_the_budget_over_the_full_layers():
    """``MaskKV(profile=calibrate(...))``: each full layer keeps MaskKV's boundary-aware share
    of ``budget x full layers``, not the same budget everywhere, across canvases (the encoder
    and the next vote read layers of different lengths); profiles of another model, and
    mask-model arguments, are refused."""
    from maskkv_compile.budgets import layer_slot_totals, maskkv_layer_budgets
    from maskkv_compile.policies import MaskKV
    from maskkv_compile.profile import ProfileMismatchError
    from maskkv_compile.tiny_models import tiny_llada

    model = _three_full_layers()
    prompt = torch.randint(3, 120, (1, 96), generator=torch.Generator().manual_seed(3))
    profile = maskkv_compile.calibrate(model, [prompt])
    budget = 40
    # one KV head per full layer: integral slots per layer, exact in total
    want = layer_slot_totals(maskkv_layer_budgets(profile.importance, budget), 1)
    net = maskkv_compile.optimize(model, budget=budget, policy=MaskKV(profile=profile))
    _generate(net, prompt, 0, max_new_tokens=32)  # the second canvas's encoder and vote too
    stats = net.cache_stats()
    assert stats["votes"] == 2 and stats["seen"] == 96 + 16
    assert "boundary-aware" in stats["layer_allocation"]
    assert list(stats["layer_budgets"].values()) == want
    kept = {e["layer"]: e["kept_per_kv_head"] for e in stats["layers"]}
    assert [kept[layer] for layer in (1, 2, 3)] == [[b] for b in want]
    assert len(set(want)) > 1 and sum(want) == 3 * budget  # not uniform, the same total
    uniform = maskkv_compile.optimize(model, budget=budget)
    assert set(uniform.budgets.values()) == {budget}

    with pytest.raises(ProfileMismatchError):
        maskkv_compile.optimize(tiny_diffusion_gemma(), budget=4, policy=MaskKV(profile=profile))
    llada = tiny_llada(layers=3, hidden=32, vocab=128, seed=0)
    llada_profile = maskkv_compile.calibrate(llada, [prompt], gen_length=4, mask_token_id=127)
    with pytest.raises(ProfileMismatchError):
        maskkv_compile.optimize(model, budget=4, policy=MaskKV(profile=llada_profile))
    with pytest.raises(ProfileMismatchError):
        maskkv_compile.optimize(llada, budget=4, mask_token_id=127, policy=MaskKV(profile=profile))
    with pytest.raises(ValueError, match="leave gen_length and mask_token_id unset"):
        maskkv_compile.calibrate(model, [prompt], gen_length=16)


@pytest.mark.parametrize("seed", range(4))
def test_random_call_sequences_leak_nothing(seed):
    """Calls of one optimized model with other prompts, batch sizes, padding and weight changes
    mixed in: each gives what the same call gives on a freshly optimized model (budget 6), and
    on the plain model (full budget): no state carries from one generation to the next. Seed 2
    has two KV heads in the full layer (budgets split per head); seed 3 three full layers and a
    layer profile (budgets split per layer). The models under test encode prompts longer than
    16 tokens in chunks, the references in one call."""
    import random

    from maskkv_compile.policies import MaskKV

    heads = {"num_global_key_value_heads": 2} if seed == 2 else {}  # per-head budgets too
    if seed == 3:
        heads = {"layers": 4, "layer_types": ["sliding_attention"] + ["full_attention"] * 3}
    model = tiny_diffusion_gemma(dtype=torch.float64, seed=seed, **heads)
    policy = "maskkv"
    if seed == 3:
        calibration = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(9))
        policy = MaskKV(profile=maskkv_compile.calibrate(model, [calibration]))
    budget = 10 if seed == 3 else 6  # at 10 the profile's split is not uniform (11 / 9 / 10)
    small, full = (  # their prefills go in chunks of 16; the references' in one call
        maskkv_compile.optimize(model, budget=b, policy=policy, prefill_chunk=16)
        for b in (budget, 4096)
    )
    assert seed != 3 or len(set(small.budgets.values())) == 3
    rng = random.Random(seed)
    for call in range(6):
        if rng.random() < 0.3:  # the weights change between calls
            with torch.no_grad():
                model.model.decoder.layers[-1].self_attn.q_proj.weight.mul_(1.1)
        batch = rng.choice([1, 2])
        lengths = [rng.randint(20, 50) for _ in range(batch)]
        prompt, mask = _left_padded(seed * 10 + call, tuple(lengths))
        kwargs = dict(max_new_tokens=rng.choice([16, 32]))
        if batch == 2:
            kwargs["attention_mask"] = mask
        fresh = maskkv_compile.optimize(model, budget=budget, policy=policy, prefill_chunk=0)
        want_small = _generate(fresh, prompt, call, **kwargs)
        assert torch.equal(_generate(small, prompt, call, **kwargs), want_small)
        assert torch.equal(
            _generate(full, prompt, call, **kwargs), _generate(model, prompt, call, **kwargs)
        )
    assert small.cache_stats()["prefill_chunks"] > 6 and full.cache_stats()["prefill_chunks"] > 6
    for net in (small, full, fresh):  # every encoder call under generate stopped at the cache
        stats = net.cache_stats()
        assert stats["cache_only_encoder_calls"] == stats["encoder_calls"] > 0
    assert fresh.cache_stats()["prefill_chunks"] == 0


def test_a_call_that_raises_in_the_encoder_leaves_no_state_behind():
    """An encoder call on a cache the model holds sets its full layers' slots for the call. A
    call that raised inside the encoder (a user's mismatched image tokens, a Ctrl-C in a long
    prefill) left them set for the process: every later generate of any optimized model then
    refused its cache ("the cache changed outside MaskKV"). Found by a randomized hunt."""
    kinds = ["full_attention", "sliding_attention", "full_attention"]
    model = tiny_diffusion_gemma(dtype=torch.float64, layers=3, layer_types=kinds)
    net = maskkv_compile.optimize(model, budget=4096)
    prompt, mask = _left_padded(0, (30, 24))  # padding: the encoder's full layers get slots
    torch.manual_seed(0)
    out = net.generate(prompt, attention_mask=mask, max_new_tokens=16, return_dict_in_generate=True)
    mask = torch.cat([mask, torch.ones(2, 36, dtype=mask.dtype)], 1)

    def interrupt(module, args):
        raise KeyboardInterrupt

    hook = model.model.encoder.language_model.layers[0].register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            net.generate(
                out.sequences[:, -20:], cache=out.cache, attention_mask=mask, max_new_tokens=16
            )
    finally:
        hook.remove()
    other = torch.randint(3, 120, (1, 21), generator=torch.Generator().manual_seed(1))
    want = _generate(model, other, 2, max_new_tokens=32)
    for runner in (net, maskkv_compile.optimize(model, budget=4096)):
        assert torch.equal(_generate(runner, other, 2, max_new_tokens=32), want)


def test_the_models_one_shot_call_runs_as_the_plain_models():
    """The model's own forward with input_ids and decoder_input_ids (encoder then decoder in
    one call) crashed through the optimized model, on an empty cache and on one the plain
    encoder filled. Its decoder's view of the cache exists only once its encoder has run, so
    it neither votes nor evicts: the plain model's logits, at any budget; on a cache MaskKV
    evicted from, a refusal that says to encode first. Found by a randomized hunt."""
    from transformers import DynamicCache

    model = tiny_diffusion_gemma(dtype=torch.float64)
    config = model.config.get_text_config(decoder=True)
    gen = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 100, (1, 30), generator=gen), torch.randint(3, 100, (1, 16))

    def call(net, cache, ids, start):
        n = ids.shape[1]
        return net(
            input_ids=ids,
            cache=cache,
            position_ids=torch.arange(start, start + n)[None],
            decoder_input_ids=canvas,
            decoder_position_ids=torch.arange(start + n, start + n + 16)[None],
        ).logits

    net = maskkv_compile.optimize(model, budget=6)
    with torch.no_grad():
        want = call(model, DynamicCache(config=config), prompt, 0)
        assert torch.equal(call(net, DynamicCache(config=config), prompt, 0), want)
        caches = [DynamicCache(config=config) for _ in range(2)]
        for cache in caches:  # a cache of 30 tokens, then 5 more and a canvas in one call
            call(model, cache, prompt, 0)
        assert torch.equal(
            call(net, caches[1], prompt[:, :5], 46), call(model, caches[0], prompt[:, :5], 46)
        )
        torch.manual_seed(0)
        out = net.generate(prompt, max_new_tokens=16, return_dict_in_generate=True)
        with pytest.raises(UnsupportedModelError, match="encode them first"):
            call(net, out.cache, prompt[:, :5], 46)
    assert net.cache_stats()["votes"] == 1  # generate's; the one-shot calls never vote


@pytest.mark.parametrize("four_d", [False, True])
def test_a_hand_written_padded_loop_reads_its_padding_and_attends_to_the_held_slots(four_d):
    """``generate``'s steps by hand on a left-padded batch: the encoder fills the cache, then
    decoder calls through the optimized model with a 2-D mask or the dict of 4-D masks
    ``generate`` builds once per canvas (for the unevicted cache). A direct call read no
    padding (padding slots were kept as real tokens), and after the eviction a 4-D mask built
    before it reached the attention (a shape error). Now: the plain model's logits at full
    budget; under eviction finite logits and only real tokens kept. Found by a randomized
    hunt."""
    from transformers import DynamicCache

    model = tiny_diffusion_gemma(dtype=torch.float64)
    ids, mask = _left_padded(0, (30, 9))  # row 1: 21 padding tokens
    batch, length = ids.shape
    where = torch.arange(length)[None]

    def loop(net):
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        encoder = model.model.encoder
        masks = encoder.create_masks_for_generate(
            config=model.config,
            inputs_embeds=torch.empty(batch, length, 0, dtype=torch.float64),
            attention_mask=mask.bool(),
            cache=None,
            position_ids=where,
        )
        encoder(input_ids=ids, attention_mask=masks, cache=cache, position_ids=where)
        keys = torch.nn.functional.pad(mask.bool(), (0, 16), value=True)  # (B, P + canvas)
        canvas = torch.randint(3, 100, (batch, 16), generator=torch.Generator().manual_seed(1))
        if four_d:
            keys = model.model.decoder.create_diffusion_decoder_attention_mask(
                config=model.config,
                inputs_embeds=canvas.unsqueeze(-1),
                cache=cache,
                decoder_attention_mask=keys,
            )
        logits = []
        for _ in range(3):
            out = net(
                cache=cache,
                decoder_input_ids=canvas,
                decoder_attention_mask=keys,
                decoder_position_ids=torch.arange(length, length + 16)[None],
            )
            logits.append(out.logits)
            canvas = out.logits.argmax(-1)
        return logits

    with torch.no_grad():
        want = loop(model)
        full = loop(maskkv_compile.optimize(model, budget=4096))
        assert all(torch.equal(a, b) for a, b in zip(full, want))
        net = maskkv_compile.optimize(model, budget=6)
        evicted = loop(net)
    assert all(bool(torch.isfinite(x).all()) for x in evicted)
    assert net.cache_stats()["votes"] == 1 and net.cache_stats()["evictions"] == 1
    kept = torch.tensor(net.cache_stats()["layers"][0]["positions"][1])  # row 1, (Hkv, K)
    assert bool((kept[kept >= 0] >= 21).all())  # real tokens only
