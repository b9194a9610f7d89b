"""torch.compile(model, backend="maskkv", options={...}): entry point, results, errors."""

import json
import subprocess
import sys

import pytest
import torch

import maskkv_compile
from maskkv_compile._torch_private import BackendCompilerFailed
from maskkv_compile.config import MaskKVConfigError
from maskkv_compile.passes import UnsupportedModelError

from helpers import build, prompt_and_masks

BUDGET = 8
PROMPT_LEN, GEN_LEN = 24, 8
CASES = [("llada", "sdpa"), ("dream", "eager")]  # Llama MHA + fused SDPA, Qwen2 GQA + eager chain

# One LLaDA-style loop, run by the parent (on optimize's model) and by the child process (on
# torch.compile's): each step commits the single most confident masked position, in place
# (so the tensor the caller marked dynamic stays the one the model sees).
LOOP = '''
def denoise(model, x, mask_id, steps):
    for _ in range(steps):
        with torch.no_grad():
            logits = model(x, use_cache=False).logits
        masked = (x[0] == mask_id).nonzero().flatten()
        conf, token = logits[0, masked].double().softmax(-1).max(-1)
        pick = int(conf.argmax())
        x[0, masked[pick]] = token[pick]
    return x
'''

# The child never imports maskkv_compile: the models are built from transformers configs
# written out here (what maskkv_compile.models.tiny_llada / tiny_dream build, seed 0), and
# "maskkv" is found through the torch_dynamo_backends entry point.
CHILD = '''
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

def build(family, attn):
    config_cls, model_cls, kv_heads = SPECS[family]
    config = config_cls(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=8192, mask_token_id=255, attn_implementation=attn,
    )
    config.is_causal = False
    torch.manual_seed(0)
    model = model_cls(config)
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model.eval()

results = {"imported_before": "maskkv_compile" in sys.modules, "runs": {}}
for family, attn in args["cases"]:
    torch._dynamo.reset()
    model = build(family, attn)
    compiled = torch.compile(
        model, backend="maskkv", options={"budget": args["budget"], "mask_token_id": 255, "backend": "eager"}
    )
    x = torch.tensor(args["x"])
    torch._dynamo.mark_dynamic(x, 1)
    out = denoise(compiled, x, 255, args["steps"])
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    results["runs"][f"{family}-{attn}"] = {"tokens": out.tolist(), "checksum": checksum}
results["imported_after"] = "maskkv_compile" in sys.modules
print("RESULT " + json.dumps(results))
'''.replace("LOOP", LOOP)

namespace = {"torch": torch}
exec(LOOP, namespace)
denoise = namespace["denoise"]


def test_maskkv_backend_is_registered():
    assert "maskkv" in torch._dynamo.list_backends(exclude_tags=())


def test_backend_in_a_process_that_never_imports_the_package_equals_optimize(tmp_path):
    model = build("llada", "sdpa")
    _, x = prompt_and_masks(model, PROMPT_LEN, GEN_LEN)
    args = {"cases": CASES, "budget": BUDGET, "x": x.tolist(), "steps": GEN_LEN, "threads": torch.get_num_threads()}
    # cwd outside the checkout: from its root, transformers' probe for the Hugging Face
    # ``kernels`` package would import this repository's kernels/ folder (and the package)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    child = json.loads(line[len("RESULT "):])
    assert child["imported_before"] is False
    assert child["imported_after"] is True  # loaded by torch through the entry point
    for family, attn in CASES:
        model = build(family, attn)
        theirs = child["runs"][f"{family}-{attn}"]
        ours_checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        assert theirs["checksum"] == pytest.approx(ours_checksum, rel=0, abs=1e-9), "child built another model"
        optimized = maskkv_compile.optimize(model, budget=BUDGET, backend="eager")
        ours = denoise(optimized, x.clone(), model.config.mask_token_id, GEN_LEN)
        assert (ours[:, PROMPT_LEN:] != model.config.mask_token_id).all()
        assert ours.tolist() == theirs["tokens"], f"{family}/{attn}: backend and optimize disagree"
        assert optimized.runtime.counts.prefills == 1 and optimized.runtime.counts.steps == GEN_LEN - 1
        # the budget is below the prompt length: the steps really ran on an evicted cache
        assert [layer["kept_per_kv_head"] for layer in optimized.cache_stats()["layers"]] == [
            [BUDGET] * model.config.num_key_value_heads
        ] * 2


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


@pytest.mark.parametrize("options,key", [
    ({**VALID, "bugdet": 4}, "bugdet"),
    ({**VALID, "budget": 0}, "budget"),
    ({**VALID, "budget": "8"}, "budget"),
    ({**VALID, "backend": "tvm"}, "backend"),
])
def test_invalid_options_name_the_key(tiny, options, key):
    error = backend_error(tiny, options=options)
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert repr(key) in str(error) or f"{key} must" in str(error)


def test_mask_token_id_must_come_in_options(tiny):
    error = backend_error(tiny, options={"budget": 8, "backend": "eager"})
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert "mask_token_id" in str(error) and "options=" in str(error)


def test_mode_is_refused(tiny):
    error = backend_error(tiny, mode="max-autotune")
    assert isinstance(error.inner_exception, MaskKVConfigError)
    assert "no mode=" in str(error) and "'max-autotune'" in str(error) and "options=" in str(error)


def test_static_sequence_length_is_refused(tiny):
    error = backend_error(tiny, dynamic_seq=False, options=VALID)
    assert isinstance(error.inner_exception, UnsupportedModelError)
    assert "mark_dynamic(input_ids, 1)" in str(error) and "symbolic" in str(error)


def test_dynamic_true_with_the_eager_option_equals_optimize():
    """dynamic=True turns the model's float constants (the attention scale) into graph inputs."""
    import maskkv_compile
    from maskkv_compile.models import tiny_dream

    model = tiny_dream(layers=2, hidden=64)
    x = torch.randint(0, 255, (1, 40), generator=torch.Generator().manual_seed(0))
    x[:, 32:] = 255
    compiled = torch.compile(model, backend="maskkv", dynamic=True,
                             options={"budget": 8, "mask_token_id": 255, "backend": "eager"})
    optimized = maskkv_compile.optimize(model, budget=8, backend="eager")
    for step in range(3):
        ours = compiled(x, use_cache=False).logits[:, 32:]
        # a clone: optimize() marks its input dynamic, which would change the compiled model's guards
        torch.testing.assert_close(ours, optimized(x.clone()).logits[:, 32:])
        x[0, 32 + step] = int(ours[0, step].argmax())
    assert optimized.runtime.counts.steps == 2
