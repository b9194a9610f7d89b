"""The Dream-style test model (tests/dream_model.py) and the project's Dream loop
(maskkv_compile/dream.py), on the plain uncached model."""

import pytest
import torch
from dream_model import (
    DREAM_ALGS,
    DreamGenerationConfig,
    DreamGenerationMixin,
    DreamModelOutput,
    tiny_dream_style,
)

from maskkv_compile.dream import ALGS, dream_generate, sample_with_confidence

LENGTHS = (6, 11, 17)
NEW = 8
# transformers' eager attention takes its softmax in float32 whatever the model dtype, so a
# float64 model is float64-exact with SDPA only; eager rows agree to float32 rounding.
LOGITS_TOL = {"sdpa": 1e-10, "eager": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two, and far faster on a
    shared, loaded 2-core machine (thread contention made each float64 matmul ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_dream_style(attn=request.param, dtype=torch.float64)


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_dream_style(attn="sdpa", dtype=torch.float64)


def prompts_for(model, lengths=LENGTHS, seed=1):
    """Random prompts (never the mask or pad id) and their left-padded batch (ids, 0/1 mask)."""
    gen = torch.Generator().manual_seed(seed)
    pad_id = model.config.pad_token_id
    prompts = [torch.randint(0, pad_id, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return prompts, ids, mask


def dream_inputs(mask2d: torch.Tensor, new: int):
    """The [B, 1, N, N] bool mask and tok_idx that Dream's loop builds from a left-padded mask."""
    keys = torch.cat([mask2d, torch.ones(mask2d.shape[0], new, dtype=mask2d.dtype)], dim=1)
    tok_idx = (keys.long().cumsum(-1) - 1).masked_fill(keys == 0, 1)
    real = keys.bool()
    return keys, real[:, None, None, :] & real[:, None, :, None], tok_idx


# ----------------------------------------------------------------------------- the model


def test_model_is_dream_shaped(sdpa_model):
    config = sdpa_model.config
    assert config.model_type == "Dream" and config.is_causal is False
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.rope_parameters["rope_theta"] == 1e6
    attention = sdpa_model.model.layers[0].self_attn
    assert all(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert config.mask_token_id == config.vocab_size - 1 and config.pad_token_id not in (
        None,
        config.mask_token_id,
    )
    # bidirectional: the first row sees the last token
    x = torch.randint(0, 200, (1, 10))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 200
    assert not torch.allclose(sdpa_model(x).logits[0, 0], sdpa_model(y).logits[0, 0])
    # "full" is no mask; any other string is refused
    assert torch.equal(sdpa_model(x, "full", None).logits, sdpa_model(x).logits)
    with pytest.raises(ValueError, match="'full'"):
        sdpa_model(x, "causal", None)


def test_padded_batch_rows_equal_rows_alone(model):
    """Dream's 4-D bool mask + tok_idx (positional), and the loop's 2-D mask + position_ids."""
    prompts, ids, mask = prompts_for(model)
    mask_id = model.config.mask_token_id
    x = torch.cat([ids, torch.full((len(prompts), NEW), mask_id)], dim=1)
    keys, mask4d, tok_idx = dream_inputs(mask, NEW)
    with torch.no_grad():
        four_d = model(x, mask4d, tok_idx).logits
        two_d = model(x, attention_mask=keys, position_ids=tok_idx).logits
        assert not four_d.isnan().any() and not two_d.isnan().any()
        for row, prompt in enumerate(prompts):
            alone = model(
                torch.cat([prompt, torch.full((NEW,), mask_id)])[None], "full", None
            ).logits[0]
            real = slice(x.shape[1] - alone.shape[0], None)
            tol = LOGITS_TOL[model.config._attn_implementation]
            assert (four_d[row, real] - alone).abs().max() < tol
            assert (two_d[row, real] - alone).abs().max() < tol


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus"])
def test_padded_generation_rows_equal_rows_alone(model, alg):
    prompts, ids, mask = prompts_for(model)
    options = dict(max_new_tokens=NEW, steps=4, alg=alg)
    batch = model.diffusion_generate(ids, attention_mask=mask, **options)
    ours = dream_generate(
        model, ids, attention_mask=mask, mask_token_id=model.config.mask_token_id, **options
    )
    for row, prompt in enumerate(prompts):
        alone = model.diffusion_generate(prompt[None], **options)[0]
        assert torch.equal(batch[row, -NEW:], alone[-NEW:]), row
        assert torch.equal(ours[row, -NEW:], alone[-NEW:]), row
    assert torch.equal(batch[:, : ids.shape[1]], ids)  # padding and prompts untouched


# ----------------------------------------------------------------------------- diffusion_generate


@pytest.mark.parametrize("alg", DREAM_ALGS)
@pytest.mark.parametrize(
    "sampling",
    [dict(), dict(temperature=0.7, top_p=0.9, top_k=20), dict(alg_temp=0.5)],
    ids=["greedy", "sampled", "alg_temp"],
)
def test_every_alg_fills_every_mask(sdpa_model, alg, sampling):
    _, ids, mask = prompts_for(sdpa_model)
    mask_id = sdpa_model.config.mask_token_id
    torch.manual_seed(0)
    out = sdpa_model.diffusion_generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        steps=5,
        alg=alg,
        output_history=True,
        return_dict_in_generate=True,
        **sampling,
    )
    assert isinstance(out, DreamModelOutput) and len(out.history) == 5
    assert torch.equal(out.history[-1], out.sequences)
    assert not (out.sequences == mask_id).any() and torch.equal(
        out.sequences[:, : ids.shape[1]], ids
    )
    left = [int((h == mask_id).sum()) for h in out.history]
    assert left == sorted(left, reverse=True)
    ours = dream_generate(
        sdpa_model,
        ids,
        attention_mask=mask,
        mask_token_id=mask_id,
        max_new_tokens=NEW,
        steps=5,
        alg=alg,
        generator=torch.Generator().manual_seed(0),
        **sampling,
    )
    assert not (ours == mask_id).any() and torch.equal(ours[:, : ids.shape[1]], ids)
    assert bool((ours < sdpa_model.config.vocab_size).all())


class Recorder:
    """Forwards to a model and records each call's inputs (masks left per row, kwargs)."""

    def __init__(self, model, mask_id):
        self.model, self.mask_id, self.calls = model, mask_id, []

    def __call__(self, x, **kwargs):
        self.calls.append(((x == self.mask_id).sum(1).tolist(), sorted(kwargs), kwargs))
        return self.model(x, **kwargs)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
@pytest.mark.parametrize("alg_temp", [None, 0.3])
def test_dream_generate_schedule_and_model_call(sdpa_model, alg, alg_temp):
    """int(masks * (1 - s/t)) unmasked per step, all at the last; the model gets a 2-D mask
    and cumsum positions with padding, nothing but x without."""
    prompts, ids, mask = prompts_for(sdpa_model)
    mask_id, steps = sdpa_model.config.mask_token_id, 5
    timesteps = torch.linspace(1, 1e-3, steps + 1)
    for attention_mask in (mask, None, torch.ones_like(mask)):
        recorder = Recorder(sdpa_model, mask_id)
        dream_generate(
            recorder,
            ids,
            attention_mask=attention_mask,
            mask_token_id=mask_id,
            max_new_tokens=NEW,
            steps=steps,
            alg=alg,
            alg_temp=alg_temp,
            generator=torch.Generator().manual_seed(3),
        )
        left = [counts for counts, _, _ in recorder.calls]
        assert len(left) == steps and left[0] == [NEW] * len(prompts)
        for i in range(steps - 1):
            expected = left[i][0] - int(left[i][0] * (1 - timesteps[i + 1] / timesteps[i]))
            assert left[i + 1] == [expected] * len(prompts)
        padded = attention_mask is mask
        assert all(
            names == (["attention_mask", "position_ids"] if padded else [])
            for _, names, _ in recorder.calls
        )
        if padded:
            kwargs = recorder.calls[0][2]
            keys, _, tok_idx = dream_inputs(mask, NEW)
            assert torch.equal(kwargs["attention_mask"], keys) and torch.equal(
                kwargs["position_ids"], tok_idx
            )


class ThinWrapper:
    """Only what DreamGenerationMixin documents it reads: __call__, generation_config, config,
    device."""

    def __init__(self, model):
        self._forward = model.forward
        self.generation_config = model.generation_config
        self.config = model.config
        self.device = model.device
        self.calls = 0

    def __call__(self, *args, **kwargs):
        assert len(args) == 3 and not kwargs  # self(x, attention_mask, tok_idx), positionally
        self.calls += 1
        return self._forward(*args)


@pytest.mark.parametrize("alg", ["origin", "topk_margin"])
def test_diffusion_generate_binds_to_a_thin_wrapper(sdpa_model, alg):
    _, ids, mask = prompts_for(sdpa_model)
    options = dict(attention_mask=mask, max_new_tokens=NEW, steps=4, alg=alg, temperature=0.5)
    torch.manual_seed(7)
    own = sdpa_model.diffusion_generate(ids, **options)
    wrapper = ThinWrapper(sdpa_model)
    torch.manual_seed(7)
    borrowed = DreamGenerationMixin.diffusion_generate(wrapper, ids, **options)
    assert torch.equal(own, borrowed) and wrapper.calls == 4
    # the config's defaults apply, kwargs override them, and None falls back to config ids
    wrapper.generation_config = None
    torch.manual_seed(7)
    assert torch.equal(DreamGenerationMixin.diffusion_generate(wrapper, ids, **options), own)
    with_config = DreamGenerationConfig(
        mask_token_id=sdpa_model.config.mask_token_id,
        max_new_tokens=NEW,
        steps=4,
        alg=alg,
        temperature=0.5,
    )
    torch.manual_seed(7)
    assert torch.equal(
        sdpa_model.diffusion_generate(ids, attention_mask=mask, generation_config=with_config), own
    )


# ----------------------------------------------------------------------------- the two loops agree


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_dream_generate_equals_diffusion_generate(model, alg, padded):
    """Temperature 0; origin's transfer draws line up through the global RNG (same seed)."""
    prompts, ids, mask = prompts_for(model, lengths=(9, 14) if padded else (14, 14))
    kwargs = dict(attention_mask=mask) if padded else {}
    options = dict(max_new_tokens=NEW, steps=6, alg=alg)
    torch.manual_seed(11)
    theirs = model.diffusion_generate(ids, **kwargs, **options)
    torch.manual_seed(11)
    ours = dream_generate(model, ids, mask_token_id=model.config.mask_token_id, **kwargs, **options)
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "filters", [dict(), dict(top_k=3), dict(top_p=0.7), dict(top_p=0.7, top_k=2)]
)
def test_sampling_follows_the_filtered_distribution(filters):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]], dtype=torch.float64)
    temperature = 0.8
    expected = torch.softmax(logits / temperature, -1)[0]
    if "top_p" in filters:  # smallest prefix (by probability) whose mass reaches top_p
        keep = (expected.cumsum(0) - expected) <= filters["top_p"]
        expected = torch.where(keep, expected, 0)
    if "top_k" in filters:
        expected[filters["top_k"] :] = 0
    expected = expected / expected.sum()
    draws = 20000
    confidence, tokens = sample_with_confidence(
        logits.expand(draws, -1),
        alg="maskgit_plus",
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
        **filters,
    )
    frequencies = torch.bincount(tokens, minlength=logits.shape[1]).double() / draws
    assert (frequencies - expected).abs().max() < 0.015
    assert torch.allclose(confidence, expected[tokens])
    assert not frequencies[expected == 0].any()


def test_confidences():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 0.5]], dtype=torch.float64)
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    conf, tokens = sample_with_confidence(logits, alg="maskgit_plus")
    assert tokens.tolist() == [0, 1] and torch.allclose(conf, probs.max(-1).values)
    conf, _ = sample_with_confidence(logits, alg="topk_margin")
    assert torch.allclose(conf, probs[:, 0] - probs[:, 1])
    conf, _ = sample_with_confidence(logits, alg="entropy")
    assert torch.allclose(conf, (probs * probs.log()).sum(-1)) and conf[1] < conf[0]
    conf, _ = sample_with_confidence(logits, alg="entropy", top_k=1)  # 0 log 0 = 0, not NaN
    assert torch.equal(conf, torch.zeros(2, dtype=torch.float64))


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_error_clearly(sdpa_model):
    _, ids, mask = prompts_for(sdpa_model)
    mask_id = sdpa_model.config.mask_token_id

    def run(ids=ids, **kwargs):
        kwargs.setdefault("mask_token_id", mask_id)
        return dream_generate(
            sdpa_model,
            ids,
            max_new_tokens=kwargs.pop("max_new_tokens", 2),
            steps=kwargs.pop("steps", 1),
            **kwargs,
        )

    with_mask = ids.clone()
    with_mask[0, -1] = mask_id
    right_padded = mask.flip(1)
    cases = [
        (dict(ids=with_mask), "contains the mask token 255.*dream_generate"),
        (dict(ids=ids.float()), "token ids"),
        (dict(ids=ids[0]), "token ids"),
        (dict(ids=ids[:, :0]), "prompt is empty"),
        (dict(mask_token_id=None), "mask_token_id must be an int"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
        (dict(steps=True), "steps must be a positive int"),
        (dict(alg="greedy"), "alg must be one of"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k must be a positive int"),
        (dict(alg_temp=-0.1), "alg_temp"),
        (dict(eps=0.0), "eps"),
        (dict(eps=1.0), "eps"),
        (dict(generator=0), "generator"),
        (dict(attention_mask=mask[:, 1:]), "shaped like input_ids"),
        (dict(attention_mask=mask * 2), "only 0"),
        (dict(attention_mask=right_padded), "LEFT padding"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            run(**kwargs)

    # neither every row nor the response's predictions (MaskKV's response_logits_only)
    class MissingRow:
        def __call__(self, x, **kwargs):
            return type("Out", (), {"logits": sdpa_model(x, **kwargs).logits[:, 1:]})()

    with pytest.raises(ValueError, match="logits for every row"):
        dream_generate(MissingRow(), ids, mask_token_id=mask_id, max_new_tokens=2, steps=1)
    with pytest.raises(TypeError, match="unknown generation options"):
        sdpa_model.diffusion_generate(ids, max_new_tokens=2, steps=1, block_length=2)
    with pytest.raises(ValueError, match="alg must be one of"):
        sdpa_model.diffusion_generate(ids, max_new_tokens=2, steps=1, alg="greedy")
