"""torch.compile(model, backend="maskkv", options={...}): entry point, results, errors."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import build, prompt_and_masks
from maskkv_compile.passes import UnsupportedModelError

import maskkv_compile
from maskkv_compile._torch_private import BackendCompilerFailed
from maskkv_compile.config import MaskKVConfigError

BUDGET = 8
PROMPT_LEN, GEN_LEN = (
    25,
    8,
)  # 33 tokens: no dim of the test models is 33 (a static trace would refuse it)
CASES = [("llada", "sdpa"), ("dream", "eager")]  # Llama MHA + fused SDPA, Qwen2 GQA + eager chain

# One LLaDA-style loop, run by the parent (on optimize's model) and by the child process (on
# torch.compile's): each step commits the single most confident masked position, in place.
LOOP = """
def denoise(model, x, mask_id, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(x, use_cache=False).logits
        masked = (x[0] == mask_id).nonzero().flatten()
        conf, token = logits[0, masked].double().softmax(-1).max(-1)
        pick = int(conf.argmax())
        x[0, masked[pick]] = token[pick]
    return x
"""

# The child never imports maskkv_compile before compiling: the models are built from
# transformers configs written out here (what maskkv_compile.tiny_models.tiny_llada / tiny_dream
# build, seed 0), and "maskkv" is found through the torch_dynamo_backends entry point. Each
# run is the plain user spelling: no mark_dynamic, options only (and dynamic= when asked).
# After the loop it asks maskkv_compile.runtimes which MaskKV runtimes ran, and how often.
CHILD = """
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
LOOP
SPECS = {
    "llada": (LlamaConfig, LlamaForCausalLM, 4),  # kv heads = heads: MHA like LLaDA
    "dream": (Qwen2Config, Qwen2ForCausalLM, 2),  # GQA like Dream
}

def build(family, attn, dtype):
    config_cls, model_cls, kv_heads = SPECS[family]
    config = config_cls(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=8192,
        mask_token_id=255, attn_implementation=attn,
    )
    config.is_causal = False
    torch.manual_seed(0)
    model = model_cls(config)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model.eval().to(getattr(torch, dtype))

results = {"imported_before": "maskkv_compile" in sys.modules, "runs": []}
for run in args["runs"]:
    torch._dynamo.reset()
    model = build(run["family"], run["attn"], run["dtype"])
    options = {"budget": args["budget"], "mask_token_id": 255, **run["options"]}
    compiled = torch.compile(model, backend="maskkv", options=options, **run["compile"])
    x = torch.tensor(args["x"])
    out = denoise(compiled, x, 255, args["steps"])
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    imported = "maskkv_compile" in sys.modules  # loaded by torch through the entry point
    import maskkv_compile
    counts = [(r.counts.prefills, r.counts.steps) for r in maskkv_compile.runtimes(compiled)]
    results["runs"].append(
        {"tokens": out.tolist(), "checksum": checksum, "counts": counts, "imported": imported}
    )
print("RESULT " + json.dumps(results))
""".replace("LOOP", LOOP)

namespace = {"torch": torch}
exec(LOOP, namespace)
denoise = namespace["denoise"]


def test_maskkv_backend_is_registered():
    assert "maskkv" in torch._dynamo.list_backends(exclude_tags=())


def run_child(tmp_path, runs: list[dict], x: torch.Tensor) -> dict:
    args = {
        "runs": runs,
        "budget": BUDGET,
        "x": x.tolist(),
        "steps": GEN_LEN,
        "threads": torch.get_num_threads(),
    }
    # cwd outside the checkout: from its root, transformers' probe for the Hugging Face
    # ``kernels`` package would import this repository's kernels/ folder (and the package)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    child = json.loads(line[len("RESULT ") :])
    assert child["imported_before"] is False
    return child


def check_equals_optimize(run: dict, theirs: dict, x: torch.Tensor) -> None:
    """The child's tokens are optimize()'s, and its MaskKV runtime ran every call (1 prefill, then
    steps)."""
    family, attn = run["family"], run["attn"]
    model = build(family, attn, dtype=getattr(torch, run["dtype"]))
    ours_checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    assert theirs["checksum"] == pytest.approx(ours_checksum, rel=0, abs=1e-9), (
        "child built another model"
    )
    assert theirs["imported"] is True
    # no dynamo fallback: one MaskKV runtime, which ran every call, and ran steps after the prefill
    assert theirs["counts"] == [[1, GEN_LEN - 1]], theirs["counts"]
    optimized = maskkv_compile.optimize(model, budget=BUDGET, backend="eager")
    ours = denoise(optimized, x.clone(), model.config.mask_token_id, GEN_LEN)
    assert (ours[:, PROMPT_LEN:] != model.config.mask_token_id).all()
    assert ours.tolist() == theirs["tokens"], (
        f"{family}/{attn} {run['compile']}: backend and optimize disagree"
    )
    assert optimized.runtime.counts.prefills == 1 and optimized.runtime.counts.steps == GEN_LEN - 1
    # the budget is below the prompt length: the steps really ran on an evicted cache
    assert [layer["kept_per_kv_head"] for layer in optimized.cache_stats()["layers"]] == [
        [BUDGET] * model.config.num_key_value_heads
    ] * 2


def test_static_trace_in_a_process_that_never_imports_the_package_equals_optimize(tmp_path):
    """No mark_dynamic: dynamo traces the length as a constant; the backend makes it symbolic."""
    _, x = prompt_and_masks(build("llada", "sdpa"), PROMPT_LEN, GEN_LEN)
    runs = [
        {
            "family": family,
            "attn": attn,
            "dtype": "float32",
            "options": {"backend": "eager"},
            "compile": {},
        }
        for family, attn in CASES
    ]
    child = run_child(tmp_path, runs, x)
    for run, theirs in zip(runs, child["runs"]):
        check_equals_optimize(run, theirs, x)


@pytest.mark.inductor
def test_dynamic_true_under_inductor_in_a_fresh_process_equals_optimize(tmp_path):
    """dynamic=True makes the attention scale a graph input; Inductor compiles the graphs anyway.
    The eager attention chain (scores * scale) is the spelling that scale input hid from the
    pattern matcher; float64 so that Inductor and eager pick the same tokens."""
    _, x = prompt_and_masks(build("llada", "sdpa"), PROMPT_LEN, GEN_LEN)
    runs = [
        {
            "family": "llada",
            "attn": "eager",
            "dtype": "float64",
            "options": {},
            "compile": {"dynamic": True},
        }
    ]
    child = run_child(tmp_path, runs, x)
    check_equals_optimize(runs[0], child["runs"][0], x)


@pytest.fixture(scope="module")
def tiny():
    return build("llada", "sdpa")


def compile_and_call(model, dynamic_seq=True, **compile_kwargs):
    compiled = torch.compile(model, backend="maskkv", **compile_kwargs)
    _, x = prompt_and_masks(model, 12, 4)
    if dynamic_seq:
        torch._dynamo.mark_dynamic(x, 1)
    with torch.no_grad():
        return compiled(x, use_cache=False)


def backend_error(model, **kwargs) -> Exception:
    """The error the backend raised (dynamo wraps it in BackendCompilerFailed)."""
    with pytest.raises(BackendCompilerFailed) as info:
        compile_and_call(model, **kwargs)
    return info.value


VALID = {"budget": 8, "mask_token_id": 255, "backend": "eager"}


def test_valid_options_compile_and_run(tiny):
    out = compile_and_call(tiny, options=VALID)
    assert out.logits.shape == (1, 16, 256)


@pytest.mark.parametrize(
    "options,key",
    [
        ({**VALID, "bugdet": 4}, "bugdet"),
        ({**VALID, "budget": 0}, "budget"),
        ({**VALID, "budget": "8"}, "budget"),
        ({**VALID, "backend": "tvm"}, "backend"),
    ],
)
def test_invalid_options_name_the_key(tiny, options, key):
    error = backend_error(tiny, options=options)
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert repr(key) in str(error) or f"{key} must" in str(error)


def test_mask_token_id_must_come_in_options(tiny):
    error = backend_error(tiny, options={"budget": 8, "backend": "eager"})
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert "mask_token_id" in str(error) and "options=" in str(error)


def test_an_unknown_mode_names_the_valid_ones(tiny):
    error = backend_error(tiny, options={**VALID, "mode": "fastest"})
    assert isinstance(error.inner_exception, MaskKVConfigError)
    for name in (
        "'fastest'",
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ):
        assert name in str(error)


def test_a_bare_mode_says_to_put_it_among_the_options(tiny):
    """torch.compile refuses mode= with options=, and the backend needs options (mask_token_id)."""
    error = backend_error(tiny, mode="max-autotune")
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert (
        "options=" in str(error)
        and "'mode': 'max-autotune'" in str(error)
        and "mask_token_id" in str(error)
    )


def test_mode_with_the_eager_option_runs_and_warns(tiny):
    with pytest.warns(UserWarning, match="mode='max-autotune' is ignored"):
        out = compile_and_call(tiny, options={**VALID, "mode": "max-autotune"})
    assert out.logits.shape == (1, 16, 256)


def test_mode_reaches_inductor_as_config_patches(tiny, monkeypatch):
    """options mode="max-autotune" -> compile_fx(config_patches=...) for the prefill and step
    graphs. compile_fx is replaced by a recorder that runs the graph as FX code (no Inductor
    compile)."""
    from maskkv_compile import _torch_private

    seen = []

    def recorder(gm, example_inputs, config_patches=None):
        seen.append(config_patches)
        return lambda *args: gm(*args)

    monkeypatch.setattr(_torch_private, "compile_fx", recorder)
    options = {"budget": 8, "mask_token_id": 255, "mode": "max-autotune"}
    compiled = torch.compile(tiny, backend="maskkv", options=options)
    _, x = prompt_and_masks(tiny, 12, 5)  # 17 tokens: no model dim is 17
    with torch.no_grad():
        first = compiled(x, use_cache=False).logits
        x[0, 12] = int(first[0, 12].argmax())
        compiled(x, use_cache=False)
    expected = torch._inductor.list_mode_options("max-autotune")
    assert expected["max_autotune"] is True
    assert seen == [expected, expected]  # the prefill graph, then the step graph
    assert [(r.counts.prefills, r.counts.steps) for r in maskkv_compile.runtimes(compiled)] == [
        (1, 1)
    ]


@pytest.mark.parametrize(
    "seq_len,what",
    [
        (64, "which is also a size of the model"),  # the hidden size: a weight dimension
        (
            16,
            "does not follow another length",
        ),  # the head size: only the graph's view shapes show it
    ],
)
def test_a_static_length_equal_to_a_model_dim_is_a_clear_error(tiny, seq_len, what):
    compiled = torch.compile(tiny, backend="maskkv", options=VALID)
    _, x = prompt_and_masks(tiny, seq_len - 4, 4)
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(x, use_cache=False)
    error = info.value.inner_exception
    assert isinstance(error, UnsupportedModelError)
    message = str(error)
    assert f"traced as the constant {seq_len}" in message and what in message
    assert "dynamic=True" in message and "mark_dynamic(input_ids, 1)" in message


def test_a_second_length_recompiles_and_keeps_running_maskkv(tiny):
    """A static first trace serves its length; another length is a new dynamo graph, not an eager
    fallback."""
    compiled = torch.compile(tiny, backend="maskkv", options=VALID)
    calls = 0
    for prompt_len in (13, 21, 29):  # + 4 masks: no model dim is 17, 25 or 33
        _, x = prompt_and_masks(tiny, prompt_len, 4)
        with torch.no_grad():
            for _ in range(2):
                compiled(x, use_cache=False)
                calls += 1
                x[0, prompt_len] = 0
    built = maskkv_compile.runtimes(compiled)
    assert sum(r.counts.prefills + r.counts.steps for r in built) == calls
    assert all(r.counts.steps >= 1 for r in built)


def test_runtimes_raises_before_any_call(tiny):
    compiled = torch.compile(tiny, backend="maskkv", options=VALID)
    with pytest.raises(RuntimeError, match="no MaskKV runtime was built"):
        maskkv_compile.runtimes(compiled)


def test_a_graph_break_is_an_error_that_says_so(tiny):
    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, **kwargs):
            ids = input_ids * 1
            torch._dynamo.graph_break()
            return self.model(ids, **kwargs)

    error = backend_error(Broken(tiny), options=VALID)
    assert isinstance(error.inner_exception, UnsupportedModelError)
    assert "graph break" in str(error) and "fullgraph=True" in str(error)


def test_dynamic_true_with_the_eager_option_equals_optimize():
    """dynamic=True turns the model's float constants (the attention scale) into graph inputs."""
    import maskkv_compile
    from maskkv_compile.tiny_models import tiny_dream

    model = tiny_dream(layers=2, hidden=64)
    x = torch.randint(0, 255, (1, 40), generator=torch.Generator().manual_seed(0))
    x[:, 32:] = 255
    compiled = torch.compile(
        model,
        backend="maskkv",
        dynamic=True,
        options={"budget": 8, "mask_token_id": 255, "backend": "eager"},
    )
    optimized = maskkv_compile.optimize(model, budget=8, backend="eager")
    for step in range(3):
        ours = compiled(x, use_cache=False).logits[:, 32:]
        # a clone: optimize() marks its input dynamic, which would change the
        # compiled model's guards
        torch.testing.assert_close(ours, optimized(x.clone()).logits[:, 32:])
        x[0, 32 + step] = int(ours[0, step].argmax())
    assert optimized.runtime.counts.steps == 2


def test_a_changed_float_attribute_under_dynamic_true_is_an_error():
    """dynamic=True passes the attention scale as an input; the backend compiled its value in."""
    from maskkv_compile.tiny_models import tiny_llada

    model = tiny_llada(layers=2, hidden=64, attn="eager")
    compiled = torch.compile(model, backend="maskkv", dynamic=True, options=VALID)
    _, x = prompt_and_masks(model, 12, 5)
    with torch.no_grad():
        compiled(x, use_cache=False)
        model.model.layers[0].self_attn.scaling = 0.5
        with pytest.raises(UnsupportedModelError, match="changed from 0.25 to 0.5"):
            compiled(x, use_cache=False)
    assert [(r.counts.prefills, r.counts.steps) for r in maskkv_compile.runtimes(compiled)] == [
        (1, 0)
    ]
