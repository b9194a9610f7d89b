import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".inductor-cache")
)

ROOT = Path(__file__).resolve().parent.parent

# One intra-op thread for the whole session: the models are tiny (more threads only contend on
# the 2-core CI machine, and under `-n 2` each worker has one core), and every test starts
# with the same setting whatever ran before it. A test that wants more sets it; the fixture
# below puts it back.
torch.set_num_threads(1)

# config modules a test may patch by assignment (a `config.patch` context restores itself)
_CONFIGS = (torch._dynamo.config, torch._inductor.config, torch._functorch.config)


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    """Each test compiles from scratch: no dynamo cache entries carried between tests. A test
    marked ``shares_dynamo`` keeps them: its cases reuse one module-scoped optimized model, whose
    compiled frames a reset would throw away (each case still starts from an empty runtime)."""
    if request.node.get_closest_marker("shares_dynamo") is None:
        torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Whatever a test sets globally (thread count, default dtype, deterministic algorithms,
    matmul precision, grad mode, dynamo/Inductor/functorch config, environment variables) is put
    back afterwards, so no test depends on which tests ran before it."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    precision = torch.get_float32_matmul_precision()
    grad = torch.is_grad_enabled()
    configs = [config.get_config_copy() for config in _CONFIGS]
    environ = dict(os.environ)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        torch.set_default_dtype(dtype)
    if (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ) != (
        deterministic,
        warn_only,
    ):
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if torch.get_float32_matmul_precision() != precision:
        torch.set_float32_matmul_precision(precision)
    torch.set_grad_enabled(grad)
    for config, saved in zip(_CONFIGS, configs):
        now = config.get_config_copy()
        for key, value in saved.items():
            if now.get(key) is not value and now.get(key) != value:
                setattr(config, key, value)
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)


# -- entry points in this process: a fresh interpreter proves nothing more for them --------------


@pytest.fixture
def script(monkeypatch, capsys):
    """Run a script of the repository (``examples/x.py ARGS``) in this process as ``__main__``,
    from the repository root; its stdout."""

    def run_script(path, *args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", [path, *args])
        monkeypatch.syspath_prepend(str((ROOT / path).parent))  # as `python path` puts it first
        runpy.run_path(str(ROOT / path), run_name="__main__")
        return capsys.readouterr().out

    return run_script


@pytest.fixture
def cli(monkeypatch, capsys):
    """``maskkv-compile ARGS`` in this process (exit status 0); its stdout."""
    from maskkv_compile.cli import main

    def run_cli(*args):
        monkeypatch.setattr(sys, "argv", ["maskkv-compile", *args])  # bench --json records it
        assert main(list(args)) == 0
        return capsys.readouterr().out

    return run_cli
