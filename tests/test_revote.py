"""Re-selection while decoding (``revote``, ``maskkv_compile/revote.py``).

``RevoteReference`` runs the original model (eager torch, transformers' attention registry)
with an attention function that follows the documented rule: at the prefill, full attention,
recording each layer's post-RoPE prompt K/V; at a re-vote step, the queries of the voting rows
(the response rows; Dream: the row before each) score [recorded prompt K ; current response
K], softmax over all of them, votes summed over voters and the KV head's query heads at the
prompt columns, the policy's scores, top-``budget`` per (row, KV head) with the budgets the
optimized model's prefill chose, then every query attends to [kept prompt K/V ; response K/V].
Layer l's queries come from layers < l that already attended to their new selection.
"""

import copy
import gc
import weakref

import pytest
import torch
from helpers import build, kept_positions, prompt_and_masks
from maskkv_compile.kernels import revote as revote_kernels
from maskkv_compile.kernels import select_kv_reference
from torch.library import opcheck
from transformers import AttentionInterface

import maskkv_compile
from maskkv_compile.config import MaskKVConfig, MaskKVConfigError
from maskkv_compile.policies import POLICIES, get_policy

_NAME = "maskkv_test_revote_reference"


class RevoteReference:
    def __init__(self, model, policy: str, shift: int, masked_only: bool = False, **options):
        self.model = copy.deepcopy(model)
        self.config = MaskKVConfig(policy=policy, **options)
        self.shift = shift
        self.masked_only, self.mask, self.x = masked_only, model.config.mask_token_id, None
        self.prompt_kv = {}
        self.kept = {}  # layer -> [row][kv head] kept positions
        self.budgets = None  # layer -> (B, Hkv) budgets
        self.mode, self.prompt, self.response = "prefill", None, None
        AttentionInterface.register(_NAME, self._attention)
        self.model.set_attn_implementation(_NAME)

    def _attention(
        self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
    ):
        assert attention_mask is None
        layer = module.layer_idx
        batch, heads = query.shape[:2]
        kv_heads = key.shape[1]
        group = heads // kv_heads
        if self.mode == "prefill":
            self.prompt_kv[layer] = (key[:, :, self.prompt], value[:, :, self.prompt])
            weights = torch.softmax(
                query @ key.repeat_interleave(group, 1).transpose(-2, -1) * scaling, -1
            )
            return (weights @ value.repeat_interleave(group, 1)).transpose(1, 2).contiguous(), None
        prompt_k, prompt_v = self.prompt_kv[layer]
        num_prompt = len(self.prompt)
        voters = [max(p - self.shift, 0) for p in self.response]
        if (
            self.masked_only
        ):  # revote_voters="masked": the positions still masked vote (all, if none is)
            assert batch == 1
            voters = [
                max(p - self.shift, 0) for p in self.response if self.x[0, p] == self.mask
            ] or voters
        keys = torch.cat([prompt_k, key[:, :, self.response]], dim=2).repeat_interleave(
            group, 1
        )  # (B, H, P + R, D)
        probs = torch.softmax(
            query[:, :, voters] @ keys.transpose(-2, -1) * scaling, -1
        )  # (B, H, Rv, P + R)
        votes = (
            probs[..., :num_prompt].sum(2).view(batch, kv_heads, group, num_prompt).sum(2)
        )  # (B, Hkv, P)
        cfg = self.config
        scores = (
            get_policy(cfg.policy)
            .selection_scores(
                votes, tuple(votes.shape), kernel=cfg.pool_kernel, sink=cfg.sink, seed=cfg.seed
            )
            .to(votes.dtype)
        )
        keep = select_kv_reference(scores, self.budgets[layer])
        self.kept[layer] = [
            [[self.prompt[i] for i in head.tolist()] for head in row] for row in keep
        ]
        out = torch.empty_like(query)
        for b in range(batch):
            for h in range(heads):
                idx = keep[b][h // group]
                k = torch.cat([prompt_k[b, h // group, idx], key[b, h // group, self.response]])
                v = torch.cat([prompt_v[b, h // group, idx], value[b, h // group, self.response]])
                out[b, h] = torch.softmax(query[b, h] @ k.T * scaling, -1) @ v
        return out.transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def __call__(self, x, prefill: bool):
        self.mode, self.x = "prefill" if prefill else "revote", x
        return self.model(x, use_cache=False).logits


def greedy_commit(x, logits, mask_id):
    """Commit the leftmost masked position of row 0 (its most likely non-mask token)."""
    pos = int((x[0] == mask_id).nonzero()[0, 0])
    x[0, pos] = int(logits[0, pos, :mask_id].argmax())


def infill_input(model, prompt_len=24, span=(10, 16)):
    _, x = prompt_and_masks(model, prompt_len=prompt_len, gen_len=0)
    x[0, span[0] : span[1]] = model.config.mask_token_id
    return x


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "options,message",
    [
        ({"revote": 0}, "revote must be"),
        ({"revote": True}, "revote must be"),
        ({"revote": "often"}, "revote must be"),
        ({"revote": "block"}, "set block_length"),
        ({"revote": 2, "block_length": 4}, 'use revote="block"'),
        ({"revote": 1, "second_tier": "disk"}, "second_tier must be one of"),
        ({"second_tier": "host"}, "set revote too"),
        ({"revote": 1, "revote_voters": "all"}, "revote_voters must be one of"),
        ({"revote_voters": "masked"}, "set revote too"),
    ],
)
def test_bad_revote_options_are_refused(options, message):
    with pytest.raises(MaskKVConfigError, match=message):
        MaskKVConfig(**options)


def test_revote_off_keeps_no_second_tier_and_never_reselects():
    model = build("llada")
    net = maskkv_compile.optimize(model, budget=4, backend="eager")
    _, x = prompt_and_masks(model, 12, 4)
    net(x)
    net(x)
    assert net.runtime.last_session.tier is None
    stats = net.cache_stats()
    assert stats["second_tier"] is None and stats["revotes"] == stats["reselects"] == 0


# ------------------------------------------------------------------------------------------ ops


def _revote_inputs(batch=2, heads=4, kv_heads=2, prompt=11, rows=5, dim=8, seed=0, per_head=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rows, dim, generator=gen)
    k = torch.randn(batch, kv_heads, rows, dim, generator=gen)
    prompt_k = torch.randn(batch, kv_heads, prompt, dim, generator=gen)
    prompt_v = torch.randn(batch, kv_heads, prompt, dim, generator=gen)
    prompt_pos = torch.arange(prompt) * 2 + 1  # absolute positions, not 0..P-1
    prompt_valid = torch.ones(batch, prompt, dtype=torch.bool)
    prompt_valid[1, :3] = False  # row 1: a shorter (left-padded) prompt
    resp_valid = torch.ones(batch, rows, dtype=torch.bool)
    resp_valid[0, -1] = False  # a computed row that is not row 0's key
    row_end = torch.tensor([1, 5, 5, 4, 5])  # computed row 0 sees itself only, row 3 rows < 4
    voter_idx = torch.tensor([0, 1, 3, 4])
    voter_valid = torch.ones(batch, 4, dtype=torch.bool)
    voter_valid[1, 0] = False
    kept_len = torch.tensor([[3, 5], [4, 2]])
    kept_k = torch.zeros(batch, kv_heads, 5, dim)
    if per_head:  # block diffusion's candidates: each head's own entries first, own positions
        held = torch.tensor([[11, 7], [6, 9]])  # (B, Hkv)
        prompt_valid = torch.arange(prompt) < held[..., None]  # (B, Hkv, P)
        steps = torch.randint(1, 4, (batch, kv_heads, prompt), generator=gen)
        prompt_pos = torch.where(prompt_valid, steps.cumsum(-1), -1)  # increasing, -1 past
    return (
        q,
        k,
        prompt_k,
        prompt_v,
        prompt_pos,
        prompt_valid,
        resp_valid,
        row_end,
        voter_idx,
        voter_valid,
        kept_k,
        kept_len,
    )


@pytest.mark.parametrize("recent", [0, 2], ids=["votes alone", "recent 2"])
@pytest.mark.parametrize("per_head", [False, True], ids=["second tier", "per-head candidates"])
@pytest.mark.parametrize("blocked", [False, True], ids=["one score block", "prompt in blocks"])
def test_revote_op_matches_a_per_row_reference(blocked, per_head, recent, monkeypatch):
    if blocked:
        # scores above SCORE_BLOCK go in prompt blocks of chunk * KEY_BLOCK_FACTOR
        # columns, two passes
        monkeypatch.setattr(revote_kernels, "SCORE_BLOCK", 1)
        monkeypatch.setattr(revote_kernels, "KEY_BLOCK_FACTOR", 1)
    args = _revote_inputs(per_head=per_head)
    (
        q,
        k,
        prompt_k,
        prompt_v,
        prompt_pos,
        prompt_valid,
        resp_valid,
        row_end,
        voter_idx,
        voter_valid,
        kept_k,
        kept_len,
    ) = args
    scale = 0.4
    new_k, new_v, new_len, pos = torch.ops.maskkv.revote_kv(
        *args, scale, 3, "mask_voting_uniform", 5, 4, 0, recent
    )
    assert new_k.shape == kept_k.shape and torch.equal(new_len, kept_len)
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        voters = voter_idx[voter_valid[b]]
        for kv in range(k.shape[1]):
            valid = prompt_valid[b, kv] if per_head else prompt_valid[b]
            positions = prompt_pos[b, kv] if per_head else prompt_pos
            cols = valid.nonzero().flatten()
            votes = torch.zeros(len(cols), dtype=torch.float64)
            for voter in voters.tolist():  # its keys: the prompt's and the computed ones it sees
                seen = resp_valid[b] & (torch.arange(k.shape[2]) < row_end[voter])
                keys = torch.cat([prompt_k[b, kv, cols], k[b, kv, seen]])  # (P_b + R_b, D)
                for h in range(kv * group, (kv + 1) * group):
                    probs = torch.softmax(q[b, h, voter].double() @ keys.double().T * scale, -1)
                    votes += probs[: len(cols)]
            n = int(kept_len[b, kv])
            # the last ``recent`` candidates first (nearest first), then the best votes
            near = list(range(len(cols) - 1, len(cols) - 1 - recent, -1))
            ranked = near + [
                i
                for i in torch.sort(votes, descending=True, stable=True).indices.tolist()
                if i not in near
            ]
            top = sorted(ranked[:n])
            expected = positions[cols[top]]
            assert pos[b, kv, :n].tolist() == expected.tolist()
            assert bool((pos[b, kv, n:] == -1).all())
            torch.testing.assert_close(new_k[b, kv, :n], prompt_k[b, kv, cols[top]])
            torch.testing.assert_close(new_v[b, kv, :n], prompt_v[b, kv, cols[top]])
            assert bool((new_k[b, kv, n:] == 0).all())


def test_opcheck_revote_ops():
    args = _revote_inputs()
    opcheck(torch.ops.maskkv.revote_kv.default, (*args, 0.4, 3, "snapkv", 5, 4, 0, 0))
    per_head = _revote_inputs(per_head=True)
    for policy in ("maskkv", "snapkv", "streaming", "random"):
        opcheck(torch.ops.maskkv.revote_kv.default, (*per_head, 0.4, 3, policy, 5, 4, 0, 2))
    k, v = args[2], args[3]
    opcheck(torch.ops.maskkv.prompt_kv.default, (k, v, torch.tensor([0, 2, 3, 7])))


# -------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_whole_prompt_kept_revote_is_bit_equal(family):
    """Budget >= prompt: every re-vote keeps every entry in order; every call's logits are bit-equal
    to the same loop without re-selection, while the re-vote path really ran."""
    model = build(family)
    _, x = prompt_and_masks(model, 20, 6)
    mask = model.config.mask_token_id
    runs = {}
    for revote in (None, 1):
        net = maskkv_compile.optimize(
            model, budget=64, backend="eager", revote=revote, family=family
        )
        y, logits = x.clone(), []
        for _ in range(6):
            out = net(y).logits
            logits.append(out)
            greedy_commit(y, out, mask)
        runs[revote] = (logits, net.cache_stats())
    plain, revoted = runs[None], runs[1]
    assert all(torch.equal(a, b) for a, b in zip(plain[0], revoted[0]))
    assert revoted[1]["revotes"] == 5 and revoted[1]["steps"] == 5 and revoted[1]["prefills"] == 1
    assert plain[1]["revotes"] == 0 and plain[1]["second_tier"] is None
    assert revoted[1]["second_tier"]["bytes"] > 0 and revoted[1]["second_tier"]["revotes"] == 5
    assert revoted[1]["bytes"] == plain[1]["bytes"]  # the hot cache is the same size


@pytest.mark.parametrize(
    "family,layout,policy,voters",
    [
        ("llada", "suffix", "mask_voting_uniform", "response"),
        ("llada", "infill", "snapkv", "response"),
        ("dream", "suffix", "mask_voting_uniform", "response"),
        ("dream", "infill", "mask_voting_uniform", "response"),
        ("llada", "suffix", "mask_voting_uniform", "masked"),
        ("dream", "infill", "mask_voting_uniform", "masked"),
    ],
    # "dream": a Qwen2 (GQA) model run with Dream's shifted logits: the voters are the rows
    # before the masks
)
def test_revote_keeps_the_reference_top_k_of_the_current_queries(family, layout, policy, voters):
    """Every re-vote step: each layer's new kept set equals the reference's top-k of the votes of
    the queries this step computes (revote_voters="masked": of the rows still masked), over the
    whole prompt; the logits match the reference's."""
    model = build(family)
    mask = model.config.mask_token_id
    if layout == "suffix":
        _, x = prompt_and_masks(model, 24, 6)
    else:
        x = infill_input(model)
    response = (x[0] == mask).nonzero().flatten().tolist()
    prompt = [i for i in range(x.shape[1]) if i not in response]
    shift = 1 if family == "dream" else 0
    net = maskkv_compile.optimize(
        model,
        budget=5,
        backend="eager",
        revote=1,
        policy=policy,
        family=family,
        revote_voters=voters,
    )
    reference = RevoteReference(model, policy, shift, masked_only=voters == "masked")
    reference.prompt, reference.response = prompt, response
    y = x.clone()
    out = net(y).logits
    reference(y, prefill=True)
    before = [kept_positions(cache) for cache in net.runtime.last_session.layers]
    changed = False
    for step in range(4):
        greedy_commit(y, out, mask)
        reference.budgets = [cache.kept_len.clone() for cache in net.runtime.last_session.layers]
        out = net(y).logits
        expected = reference(y, prefill=False)
        session = net.runtime.last_session
        for layer, cache in enumerate(session.layers):
            assert kept_positions(cache) == reference.kept[layer], (step, layer)
            assert torch.equal(
                cache.kept_len, reference.budgets[layer]
            )  # the same per-head budgets
        rows = [max(p - shift, 0) for p in response]
        torch.testing.assert_close(out[:, rows], expected[:, rows], atol=1e-5, rtol=1e-5)
        changed |= [kept_positions(c) for c in session.layers] != before
    assert net.cache_stats()["revotes"] == 4
    assert changed, (
        "no re-vote changed any kept set: the test would not tell re-voting from not re-voting"
    )


def test_positions_stay_absolute_after_a_swap():
    """Infilling (prompt on both sides of the span) in a left-padded batch: after re-votes, every
    kept entry sits at one of its row's prompt positions and holds the prefill's post-RoPE K/V of
    that absolute position (the second tier's column for it)."""
    model = build("llada")
    mask = model.config.mask_token_id
    x = infill_input(model, prompt_len=22, span=(8, 13)).repeat(2, 1)
    x[1, 13:15] = mask  # row 1 masks a longer span
    pad = torch.ones_like(x, dtype=torch.long)
    pad[1, :3] = 0  # row 1 is left-padded
    net = maskkv_compile.optimize(model, budget=4, backend="eager", revote=1)
    y = x.clone()
    for _ in range(3):
        out = net(y, attention_mask=pad).logits
        for b in range(2):
            pos = int((y[b] == mask).nonzero()[0, 0])
            y[b, pos] = int(out[b, pos, :mask].argmax())
    assert net.cache_stats()["revotes"] == 2
    session = net.runtime.last_session
    tier = session.tier
    prompt_pos = tier.prompt_pos.tolist()
    for layer, cache in enumerate(session.layers):
        full_k, full_v = tier.prompt_kv[layer]
        for b in range(2):
            own = set(session.layout.prompt[b].nonzero().flatten().tolist())
            for h in range(cache.kept_pos.shape[1]):
                n = int(cache.kept_len[b, h])
                kept = cache.kept_pos[b, h, :n].tolist()
                assert set(kept) <= own and kept == sorted(kept)
                cols = [prompt_pos.index(p) for p in kept]
                assert torch.equal(cache.kept_k[b, h, :n], full_k[b, h, cols])
                assert torch.equal(cache.kept_v[b, h, :n], full_v[b, h, cols])


def test_second_tier_is_freed_with_the_session():
    model = build("llada")
    _, x = prompt_and_masks(model, 16, 4)
    _, other = prompt_and_masks(model, 16, 4, seed=7)
    net = maskkv_compile.optimize(
        model, budget=4, backend="eager", revote=1, config=MaskKVConfig(max_sessions=1)
    )
    net(x)
    tier = net.runtime.last_session.tier
    refs = [weakref.ref(t) for pair in tier.prompt_kv for t in pair]
    del tier
    net(other)  # a new prompt pushes the only session out
    gc.collect()
    assert all(r() is None for r in refs)
    assert net.cache_stats()["second_tier"]["bytes"] > 0  # the new session has its own
    refs = [weakref.ref(t) for pair in net.runtime.last_session.tier.prompt_kv for t in pair]
    net.reset()
    gc.collect()
    assert all(r() is None for r in refs)


def test_host_second_tier_runs_the_same_revotes():
    """second_tier="host": the tier is in host memory and every re-vote reads it from there. On a
    CPU model that is the device's own memory, so the tokens and kept sets equal the device
    tier's; the copies to and from a CUDA device are checked by scripts/gpu_check.py."""
    model = build("llada")
    _, x = prompt_and_masks(model, 24, 6)
    mask = model.config.mask_token_id
    runs = {}
    for where in ("device", "host"):
        net = maskkv_compile.optimize(model, budget=4, backend="eager", revote=1, second_tier=where)
        y = x.clone()
        for _ in range(6):
            greedy_commit(y, net(y).logits, mask)
        runs[where] = (
            y,
            net.cache_stats(),
            [layer.kept_pos for layer in net.runtime.last_session.layers],
        )
    (tokens, stats, kept), (host_tokens, host_stats, host_kept) = runs["device"], runs["host"]
    assert torch.equal(tokens, host_tokens) and all(
        torch.equal(a, b) for a, b in zip(kept, host_kept)
    )
    assert host_stats["revotes"] == stats["revotes"] == 5 and host_stats["prefills"] == 1
    assert (
        host_stats["second_tier"]["device"] == "cpu"
        and host_stats["second_tier"]["pinned"] is False
    )
    assert host_stats["second_tier"]["bytes"] == stats["second_tier"]["bytes"] > 0


@pytest.fixture(scope="module")
def dream():
    return build("dream")


@pytest.mark.shares_dynamo
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_revotes_under_its_budgets(policy, dream):
    model = dream
    mask = model.config.mask_token_id
    _, x = prompt_and_masks(model, 24, 4)
    with pytest.warns(UserWarning) if get_policy(policy).needs_profile else _nothing():
        net = maskkv_compile.optimize(
            model, budget=5, backend="eager", revote=2, policy=policy, family="dream"
        )
        y = x.clone()
        out = net(y).logits
    lengths = [c.kept_len.clone() for c in net.runtime.last_session.layers]
    before = [kept_positions(c) for c in net.runtime.last_session.layers]
    for _ in range(3):
        greedy_commit(y, out, mask)
        out = net(y).logits
    stats = net.cache_stats()
    assert stats["revotes"] == 1 and stats["steps"] == 3  # the 2nd step re-voted
    layers = net.runtime.last_session.layers
    assert all(torch.equal(c.kept_len, n) for c, n in zip(layers, lengths))
    if get_policy(policy).vote_transform in ("streaming", "random"):  # selections that ignore votes
        assert [kept_positions(c) for c in layers] == before


def test_block_revote_at_every_block_refresh():
    """revote="block": one re-vote per block refresh; with the whole prompt kept, bit-equal."""
    model = build("llada")
    mask = model.config.mask_token_id
    _, x = prompt_and_masks(model, 12, 8)
    runs = {}
    for revote, budget in ((None, 64), ("block", 64), ("block", 3)):
        net = maskkv_compile.optimize(
            model, budget=budget, backend="eager", block_length=4, revote=revote
        )
        y, logits = x.clone(), []
        for _ in range(8):
            out = net(y).logits
            logits.append(out)
            greedy_commit(y, out, mask)
        runs[(revote, budget)] = (logits, net.cache_stats())
    plain, revoted, evicted = runs[(None, 64)], runs[("block", 64)], runs[("block", 3)]
    assert all(torch.equal(a, b) for a, b in zip(plain[0], revoted[0]))
    for stats in (revoted[1], evicted[1]):
        assert stats["revotes"] == stats["transitions"]["block_refresh"] == 2
        assert stats["transitions"]["block_step"] == 5


@pytest.mark.inductor
def test_inductor_revote_matches_eager():
    """The unmodified loop on both backends, two prompts of different lengths: the compiled model
    commits the same tokens, keeps the same entries after every call and gives the same logits as
    eager; the re-vote graph really ran under Inductor (and re-selected something), and neither
    it nor the step graph was compiled again for the second prompt length."""
    model = build("dream")
    mask = model.config.mask_token_id
    nets = {
        backend: maskkv_compile.optimize(model, budget=4, backend=backend, revote=2, family="dream")
        for backend in ("eager", "inductor")
    }
    for prompt_len, seed in ((20, 1), (33, 5)):
        _, x = prompt_and_masks(model, prompt_len, 5, seed=seed)
        runs = {}
        for backend, net in nets.items():
            y, logits, kept = x.clone(), [], []
            for _ in range(5):  # a prefill, then 4 steps: steps 2 and 4 re-vote
                out = net(y).logits
                logits.append(out)
                kept.append([kept_positions(c) for c in net.runtime.last_session.layers])
                greedy_commit(y, out, mask)
            runs[backend] = (y, logits, kept)
        (eager_y, eager_logits, eager_kept), (ours_y, ours_logits, ours_kept) = (
            runs["eager"],
            runs["inductor"],
        )
        assert torch.equal(ours_y, eager_y), "the compiled loop committed other tokens"
        assert ours_kept == eager_kept
        assert ours_kept[2] != ours_kept[0], (
            "the re-vote changed no kept set: the test could not see it"
        )
        for a, b in zip(ours_logits, eager_logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for backend, net in nets.items():
        stats = net.cache_stats()
        assert stats["revotes"] == 4 and stats["steps"] == 8 and stats["prefills"] == 2, (
            backend,
            stats,
        )
    runtime = nets["inductor"].runtime
    assert runtime.compiled("revote").compiles == 1 and runtime.compiled("step").compiles == 1, (
        "Inductor recompiled for a new prompt length"
    )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
