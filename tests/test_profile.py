"""Layer-importance profile: measurement, fingerprints, versioned JSON (maskkv_compile.profile)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from maskkv_compile.budgets import maskkv_layer_budgets
from maskkv_compile.profile import (
    PROFILE_VERSION,
    LayerProfile,
    ProfileMismatchError,
    attention_importance,
    model_fingerprint,
)

LLAMA = SimpleNamespace(
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    hidden_size=64,
    architectures=["LlamaForCausalLM"],
)


def _fp(**changes):
    return {**model_fingerprint(LLAMA), **changes}


def test_attention_importance_matches_naive():
    gen = torch.Generator().manual_seed(0)
    h_in, h_out = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    cosines = []
    for b in range(2):
        for t in range(5):
            a, c = h_in[b, t].tolist(), h_out[b, t].tolist()
            dot = sum(x * y for x, y in zip(a, c))
            cosines.append(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in c)))
    assert attention_importance(h_in, h_out) == pytest.approx(
        1 - sum(cosines) / len(cosines), abs=1e-5
    )
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    kept = cosines[:5] + cosines[5:7]
    assert attention_importance(h_in, h_out, mask) == pytest.approx(
        1 - sum(kept) / len(kept), abs=1e-5
    )


def test_attention_importance_extremes():
    h = torch.randn(7, 8)
    assert attention_importance(h, 3 * h) == pytest.approx(0.0, abs=1e-6)
    assert attention_importance(h, -h) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError):
        attention_importance(h, h[:, :4])


def test_model_fingerprint_reads_common_names():
    assert model_fingerprint(LLAMA) == {
        "model_class": "LlamaForCausalLM",
        "n_layers": 4,
        "n_heads": 8,
        "n_kv_heads": 2,
        "hidden_size": 64,
    }
    llada = SimpleNamespace(
        n_layers=32, n_heads=32, n_kv_heads=None, d_model=4096, architectures=["LLaDAModelLM"]
    )
    assert model_fingerprint(llada) == {
        "model_class": "LLaDAModelLM",
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "hidden_size": 4096,
    }

    class TinyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(
                num_hidden_layers=2, num_attention_heads=4, hidden_size=32
            )

    fp = model_fingerprint(TinyModel())
    assert fp["model_class"] == "TinyModel" and fp["n_kv_heads"] == 4 and fp["n_layers"] == 2
    nested = SimpleNamespace(get_text_config=lambda: LLAMA)
    assert model_fingerprint(nested, model_class="X")["n_layers"] == 4
    with pytest.raises(ValueError, match="n_heads"):
        model_fingerprint(SimpleNamespace(num_hidden_layers=2, hidden_size=8))


def test_profile_round_trip(tmp_path):
    prof = LayerProfile(
        (0.5, 0.1, 0.125, 0.7), model_fingerprint(LLAMA), meta={"n_prompts": 8, "gen_length": 128}
    )
    path = prof.save(tmp_path / "profile.json")
    data = json.loads(path.read_text())
    assert data["version"] == PROFILE_VERSION and data["importance"] == [0.5, 0.1, 0.125, 0.7]
    loaded = LayerProfile.load(path)
    assert loaded == prof and loaded.n_layers == 4 and isinstance(loaded.importance, tuple)
    assert maskkv_layer_budgets(loaded.importance, 64) == maskkv_layer_budgets(prof.importance, 64)


def test_profile_refuses_bad_files(tmp_path):
    prof = LayerProfile([0.1] * 4, model_fingerprint(LLAMA))
    data = prof.to_dict()
    (tmp_path / "new.json").write_text(json.dumps({**data, "version": PROFILE_VERSION + 1}))
    with pytest.raises(ValueError, match="newer"):
        LayerProfile.load(tmp_path / "new.json")
    (tmp_path / "other.json").write_text(json.dumps({"importance": [0.1]}))
    with pytest.raises(ValueError, match="not a MaskKV layer profile"):
        LayerProfile.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="4 layers"):
        LayerProfile([0.1] * 3, model_fingerprint(LLAMA))
    with pytest.raises(ValueError, match="JSON"):
        LayerProfile([0.1] * 4, model_fingerprint(LLAMA), meta={"x": object()}).save(
            tmp_path / "bad.json"
        )


def test_check_compatible():
    prof = LayerProfile([0.1] * 4, model_fingerprint(LLAMA))
    prof.check_compatible(model_fingerprint(LLAMA))
    prof.check_compatible(LLAMA)
    other = _fp(model_class="Qwen2ForCausalLM", n_kv_heads=4)
    with pytest.raises(ProfileMismatchError) as err:
        prof.check_compatible(other)
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg and "n_kv_heads: 2 vs 4" in msg


def test_from_measurements_averages():
    prof = LayerProfile.from_measurements(
        [[0.2, 0.0, 0.1, 0.6], [0.4, 0.2, 0.1, 0.2]], model_fingerprint(LLAMA), gen_length=64
    )
    assert prof.importance == pytest.approx((0.3, 0.1, 0.1, 0.4))
    assert prof.meta == {"n_prompts": 2, "gen_length": 64}
