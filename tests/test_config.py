"""The option surface: policy and revote objects, their validation, the string and flat
spellings they replace, the runtime's view, printing, and the family detection that
``optimize`` and ``backend="maskkv"`` share."""

import ast
import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import maskkv_compile
from maskkv_compile import (
    AdaKV,
    AllVoting,
    MaskKV,
    MaskKVConfig,
    MaskKVConfigError,
    MaskVotingUniform,
    PromptVoting,
    PyramidKV,
    Random,
    Revote,
    SnapKV,
    SqueezeAttention,
    StreamingLLM,
)
from maskkv_compile.config import detect_family, resolve
from maskkv_compile.policies import _CLASSES, POLICIES, Policy, get_policy
from maskkv_compile.profile import LayerProfile

ROOT = Path(__file__).resolve().parents[1]
PROFILE = LayerProfile((0.1, 0.3, 0.2), {"model_class": "M", "n_layers": 3}, meta={"n_prompts": 2})

OBJECTS = {
    "maskkv": MaskKV(),
    "mask_voting_uniform": MaskVotingUniform(),
    "snapkv": SnapKV(),
    "prompt_voting": PromptVoting(),
    "all_voting": AllVoting(),
    "streaming": StreamingLLM(),
    "random": Random(),
    "pyramidkv": PyramidKV(SnapKV()),
    "squeezeattention": SqueezeAttention(SnapKV()),
    "adakv": AdaKV(SnapKV()),
}


# ---------------------------------------------------------------- the objects


def test_every_name_maps_to_its_default_object():
    assert set(OBJECTS) == set(POLICIES)
    for name, obj in OBJECTS.items():
        assert get_policy(name) == obj and type(get_policy(name)) is type(obj)
        assert MaskKVConfig(policy=name).eviction == obj
        assert MaskKVConfig(policy=name) == MaskKVConfig(policy=obj)
        assert MaskKVConfig(policy=obj).policy == name  # the runtime's view: the name


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: MaskKV(alpha=1.5), r"MaskKV\(alpha=...\) must be a number in \[0, 1\]"),
        (lambda: MaskKV(beta=-0.1), r"MaskKV\(beta=...\)"),
        (lambda: MaskKV(alpha=True), r"MaskKV\(alpha=...\)"),
        (lambda: MaskKV(profile=[0.1, 0.2]), r"MaskKV\(profile=...\) must be a LayerProfile"),
        (lambda: SnapKV(window=0), r"SnapKV\(window=...\) must be an int >= 1"),
        (lambda: SnapKV(kernel=4), r"SnapKV\(kernel=...\) must be an odd int"),
        (lambda: StreamingLLM(sinks=-1), r"StreamingLLM\(sinks=...\)"),
        (lambda: Random(seed=1.5), r"Random\(seed=...\)"),
        (lambda: AdaKV(selection="snapkv"), r"AdaKV\(selection=...\) must be a SnapKV"),
        (lambda: SqueezeAttention(SnapKV(), profile="p.json"), r"SqueezeAttention\(profile=...\)"),
        (lambda: Revote(every=0), "revote must be an int >= 1"),
        (lambda: Revote(every="often"), "revote must be"),
        (lambda: Revote(voters="all"), r"Revote\(voters=...\)"),
        (lambda: Revote(second_tier="disk"), r"Revote\(second_tier=...\)"),
    ],
)
def test_objects_validate_at_construction(make, message):
    with pytest.raises(MaskKVConfigError, match=message):
        make()


def test_flat_options_land_on_the_policy_that_has_them():
    assert MaskKVConfig(policy="snapkv", window=8, pool_kernel=3).eviction == SnapKV(
        window=8, kernel=3
    )
    assert MaskKVConfig(policy="adakv", window=8).eviction == AdaKV(SnapKV(window=8))
    assert MaskKVConfig(policy="squeezeattention", profile=PROFILE).eviction == SqueezeAttention(
        profile=PROFILE
    )
    assert MaskKVConfig(alpha=0.3, beta=0.5, profile=PROFILE).eviction == MaskKV(0.3, 0.5, PROFILE)
    assert MaskKVConfig(policy="streaming", sink=2).eviction == StreamingLLM(sinks=2)
    assert MaskKVConfig(policy="random", seed=7).eviction == Random(seed=7)
    # on an object: the flat option updates it
    assert MaskKVConfig(policy=SnapKV(kernel=3), window=4).eviction == SnapKV(window=4, kernel=3)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"window": 8}, r"window=8 does not apply to policy MaskKV.*SnapKV\(window=8\)"),
        (
            {"policy": "snapkv", "alpha": 0.2},
            r"alpha=0.2 does not apply to policy SnapKV.*MaskKV\(alpha=0.2\)",
        ),
        (
            {"policy": "snapkv", "profile": PROFILE},
            r"profile=LayerProfile\(3 layers, 2 prompts\) does not apply",
        ),
        ({"seed": 3}, r"seed=3 does not apply to policy MaskKV.*Random\(seed=3\)"),
        ({"policy": "random", "sink": 1}, "sink=1 does not apply.*StreamingLLM"),
        ({"policy": "streaming", "pool_kernel": 3}, "pool_kernel=3 does not apply"),
        ({"policy": "h2o"}, "unknown policy 'h2o'"),
        ({"policy": 3}, "policy must be a policy name or object"),
        ({"windw": 3}, r"unknown option\(s\) \['windw'\]"),
        ({"recent": -1}, "recent must be >= 0, got -1"),
        ({"budget": 8, "recent": 9}, "recent=9 exceeds budget=8"),
        ({"prefill_chunk": 0}, "prefill_chunk must be >= 1, got 0"),
    ],
)
def test_an_option_the_policy_lacks_is_refused(options, message):
    with pytest.raises(MaskKVConfigError, match=message):
        MaskKVConfig(**options)


def test_a_flat_option_at_its_default_is_not_an_error():
    # e.g. the evaluation suite's MaskKVConfig(seed=0) under every policy
    assert MaskKVConfig(seed=0, window=32, sink=4).eviction == MaskKV()
    assert MaskKVConfig(second_tier="device", revote_voters="response").reselection is None


def test_revote_objects_and_their_spellings():
    assert MaskKVConfig(revote=2).reselection == Revote(every=2)
    assert MaskKVConfig(revote=2, revote_voters="masked", second_tier="host").reselection == Revote(
        every=2, voters="masked", second_tier="host"
    )
    assert MaskKVConfig(revote="block", block_length=4).reselection == Revote(every="block")
    with pytest.raises(MaskKVConfigError, match="set block_length"):
        MaskKVConfig(revote=Revote(every="block"))
    with pytest.raises(MaskKVConfigError, match='use revote="block"'):
        MaskKVConfig(revote=Revote(every=1), block_length=4)
    with pytest.raises(MaskKVConfigError, match="set revote too"):
        MaskKVConfig(revote_voters="masked")
    # an int re-times an existing Revote and keeps its other options; None turns it off
    base = MaskKVConfig(revote=Revote(every=1, voters="masked"))
    assert MaskKVConfig.from_options({"revote": 3}, base=base).reselection == Revote(
        every=3, voters="masked"
    )
    assert MaskKVConfig.from_options({"revote": None}, base=base).reselection is None


def test_the_runtime_view():
    config = MaskKVConfig(
        policy=AdaKV(SnapKV(window=8, kernel=3)), revote=Revote(every=2, voters="masked")
    )
    assert (config.policy, config.window, config.pool_kernel) == ("adakv", 8, 3)
    assert (config.alpha, config.beta, config.profile, config.sink, config.seed) == (
        0.1,
        0.4,
        None,
        4,
        0,
    )
    assert (config.revote, config.revote_voters, config.second_tier) == (2, "masked", "device")
    config = MaskKVConfig(
        policy=MaskKV(alpha=0.3, beta=0.2, profile=PROFILE), revote="block", block_length=4
    )
    assert (config.alpha, config.beta, config.profile) == (0.3, 0.2, PROFILE)
    assert config.revote == "block" and MaskKVConfig().revote is None
    assert (
        MaskKVConfig(policy=StreamingLLM(sinks=2)).sink == 2
        and MaskKVConfig(policy=Random(seed=5)).seed == 5
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 3
    with pytest.raises(AttributeError):
        config.window = 3


def test_replace_and_from_options_keep_the_policy_options():
    base = MaskKVConfig(policy=MaskKV(alpha=0.3))
    assert dataclasses.replace(base, budget=8).eviction == MaskKV(alpha=0.3)
    assert MaskKVConfig.from_options(
        {"policy": "maskkv", "budget": 8}, base=base
    ).eviction == MaskKV(alpha=0.3)
    assert MaskKVConfig.from_options({"policy": "snapkv"}, base=base).eviction == SnapKV()
    assert MaskKVConfig.from_options({"policy": SnapKV(window=4)}).window == 4
    assert MaskKVConfig.from_options(
        {"window": 4}, base=MaskKVConfig(policy="pyramidkv")
    ).eviction == PyramidKV(SnapKV(window=4))


def test_printing_shows_the_whole_effective_configuration():
    config = MaskKVConfig(budget=8, policy=AdaKV(SnapKV(window=8)), revote=2)
    text = repr(config)
    assert text == config.describe()
    for part in (
        "budget=8",
        "policy=AdaKV(selection=SnapKV(window=8, kernel=5))",
        "revote=Revote(every=2, voters='response', second_tier='device')",
        "min_keep=1",
        "layers='uniform'",
    ):
        assert part in text, part
    # the default says plainly which layer allocation runs
    assert "uniform: MaskKV has no layer profile" in repr(MaskKVConfig())
    assert "boundary-aware from a profile of 2" in MaskKVConfig(profile=PROFILE).layer_allocation
    assert MaskKVConfig(policy="pyramidkv").layer_allocation.startswith("pyramid")


def test_to_dict_and_fingerprint_follow_every_option():
    config = MaskKVConfig(policy=MaskKV(alpha=0.3, profile=PROFILE), revote=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["policy"]["name"] == "maskkv" and data["policy"]["alpha"] == 0.3
    assert data["policy"]["profile"]["importance"] == [0.1, 0.3, 0.2]
    assert data["revote"] == {"every": 2, "voters": "response", "second_tier": "device"}
    prints = {
        MaskKVConfig(policy=p).fingerprint()
        for p in (SnapKV(), SnapKV(window=8), SnapKV(kernel=3), AdaKV())
    }
    assert len(prints) == 4
    assert (
        MaskKVConfig(policy=SnapKV(window=8)).fingerprint()
        == MaskKVConfig(policy="snapkv", window=8).fingerprint()
    )


def test_option_names_read_back():
    config = MaskKVConfig(policy=SnapKV(window=8), revote=2)
    for name in MaskKVConfig.option_names():
        getattr(config, name)  # every option the surfaces take can be read back
    assert (
        MaskKVConfig.from_options(
            {
                name: getattr(config, name)
                for name in MaskKVConfig.option_names()
                if name not in ("alpha", "beta", "profile", "sink", "seed")
            }
        )
        == config
    )


def test_adding_a_policy_is_adding_one_class():
    @dataclasses.dataclass(frozen=True, repr=False)
    class LastTokens(Policy):
        """Keeps the most recent prompt tokens (StreamingLLM without sinks)."""

        name = "test_last_tokens"
        vote_transform = "streaming"

    try:
        assert get_policy("test_last_tokens") == LastTokens()
        config = MaskKVConfig(policy="test_last_tokens")
        assert (
            config.eviction == LastTokens()
            and config.policy == "test_last_tokens"
            and config.sink == 4
        )
        scores = config.eviction.selection_scores(None, (1, 1, 6), sink=0)
        assert scores[0, 0].argsort(descending=True)[:2].tolist() == [5, 4]
    finally:
        del _CLASSES["test_last_tokens"]


# ---------------------------------------------------------------- one front door


def test_detect_family_from_the_model_and_from_the_graph():
    from dream_model import tiny_dream_style
    from helpers import build

    from maskkv_compile.pipeline import copy_graph_module

    dream, qwen = tiny_dream_style(), build("dream")
    assert detect_family(model=dream) == "dream" and detect_family(model=qwen) == "llada"
    assert resolve(MaskKVConfig(), model=dream).family == "dream"
    assert resolve(MaskKVConfig(family="llada"), model=dream).family == "llada"  # given wins
    seen = {}

    def recorder(gm, example_inputs):
        seen[len(seen)] = detect_family(graph=copy_graph_module(gm))
        return gm.forward

    for model in (dream, qwen):
        torch.compile(model, backend=recorder, fullgraph=True)(torch.randint(0, 250, (1, 10)))
    assert seen == {0: "dream", 1: "llada"}


def test_the_backend_detects_dream_as_optimize_does():
    from dream_model import tiny_dream_style

    torch._dynamo.reset()
    model = tiny_dream_style()
    options = {"budget": 4, "backend": "eager", "mask_token_id": model.config.mask_token_id}
    compiled = torch.compile(model, backend="maskkv", options=options, dynamic=True)
    ids = torch.cat(
        [torch.randint(0, 250, (1, 12)), torch.full((1, 4), model.config.mask_token_id)], 1
    )
    with torch.no_grad():
        compiled(ids)
    assert [r.config.family for r in maskkv_compile.runtimes(compiled)] == ["dream"]
    assert maskkv_compile.optimize(model, budget=4, backend="eager").maskkv_config.family == "dream"


# ---------------------------------------------------------------- layering


def test_kernels_import_no_policy_code():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = [
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        ]
        imported += [
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        ]
        bad = [
            m
            for m in imported
            if m.split(".")[-1] in ("policies", "policy_ops", "budgets", "config")
        ]
        assert not bad, f"{path.name} imports {bad}"
    assert hasattr(torch.ops.maskkv, "selection_scores") and hasattr(
        torch.ops.maskkv, "head_budgets"
    )


def test_the_cli_takes_policy_names_validated_by_the_config():
    import argparse

    from maskkv_compile.cli import build_parser, policy_name

    assert policy_name("snapkv") == "snapkv"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown policy 'h2o'.*snapkv"):
        policy_name("h2o")
    args = build_parser().parse_args(
        ["eval", "--policies", "maskkv", "adakv", "--heatmap-policies", "streaming"]
    )
    assert args.policies == ["maskkv", "adakv"] and args.heatmap_policies == ["streaming"]


def test_optimize_takes_every_option_the_readme_lists():
    """The README's options table is the contract of ``optimize`` as of ``MaskKVConfig``:
    ``optimize`` refused four of them (max_sessions, reuse_logits, min_keep, vote_chunk) with
    a TypeError. Found by a randomized hunt."""
    from helpers import build

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Options (`MaskKVConfig`", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert len(listed) >= 15
    taken = inspect.signature(maskkv_compile.optimize).parameters
    assert [name for name in listed if name not in taken] == []
    values = dict(max_sessions=3, reuse_logits=True, min_keep=2, vote_chunk=32)
    optimized = maskkv_compile.optimize(build("llada"), budget=4, backend="eager", **values)
    assert {k: getattr(optimized.maskkv_config, k) for k in values} == values
