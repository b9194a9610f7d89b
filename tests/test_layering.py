"""The package's layers (docs/architecture.md): the core imports no tool, `import maskkv_compile`
loads no tool module, the import graph has no cycle, and the repository's root folders
never shadow another package."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed name -> folder (pyproject.toml's package-dir)
FOLDERS = {
    "maskkv_compile": ROOT / "maskkv_compile",
    "maskkv_compile.passes": ROOT / "passes",
    "maskkv_compile.kernels": ROOT / "kernels",
}
# the tools: reports, pictures, benchmarks, evaluation, the demo models and the command line
TOOLS = (
    "maskkv_compile.explain",
    "maskkv_compile.graph_diff",
    "maskkv_compile.graph_view",
    "maskkv_compile.model_explorer",
    "maskkv_compile.bench",
    "maskkv_compile.bench_plots",
    "maskkv_compile.bench_block",
    "maskkv_compile.bench_gemma",
    "maskkv_compile.measure",
    "maskkv_compile.cli",
    "maskkv_compile.evaluation",
    "maskkv_compile.tiny_models",
    "maskkv_compile.llada2_standin",
    "maskkv_compile.sdar_standin",
    "maskkv_compile.fastdllm_standin",
)


def is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


def package_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports (a ``from package import name`` counts as an
    import of the submodule ``name`` when there is one, else of the package)."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in tree.body if top_level_only else ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = (
                        module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    )
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                edges.update(
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                )
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def python(code: str, cwd: Path = ROOT) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_graph_reader_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "maskkv_compile.naming" in graph["maskkv_compile.passes.find_attention"]
    assert "maskkv_compile.kernels.attention" in graph["maskkv_compile.kernels"]


def test_no_import_cycle_in_the_package():
    # every import, including the ones inside functions
    assert cycles(import_graph()) == []


def test_the_core_imports_no_tool():
    graph = import_graph()
    core = [m for m in graph if not is_tool(m) and m != "maskkv_compile"]
    assert {
        m: sorted(e for e in graph[m] if is_tool(e))
        for m in core
        if any(is_tool(e) for e in graph[m])
    } == {}
    # the package's own __init__ names tools only lazily (module __getattr__), never at import
    assert not [e for e in import_graph(top_level_only=True)["maskkv_compile"] if is_tool(e)]


HEAVY = ("matplotlib", "tabulate", "torch._dynamo", "torch._inductor", "sympy")


def test_import_loads_no_tool_module():
    """``import maskkv_compile`` loads no tool module, and neither dynamo, Inductor nor sympy
    (seconds to import: ``_torch_private`` imports them at their first use)."""
    loaded = json.loads(
        python(
            "import json, sys; import maskkv_compile; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('maskkv_compile') or m "
            f"in {HEAVY!r})))"
        )
    )
    assert [m for m in loaded if is_tool(m) or m in HEAVY] == []
    assert (
        "maskkv_compile.naming" in loaded
        and "maskkv_compile.passes" in loaded
        and "maskkv_compile.kernels" in loaded
    )


def test_every_lazy_private_name_resolves():
    """The private torch names ``_torch_private`` imports at first use all exist in this torch
    (a moved one fails here, not at a user's first compile)."""
    from maskkv_compile import _torch_private

    for name in _torch_private._LAZY:
        assert getattr(_torch_private, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = _torch_private.no_such_name


def test_lazy_entry_points_stay_functions():
    # the module maskkv_compile.explain imported first must not hide the function of that name
    out = python(
        "from maskkv_compile.explain import Report; import maskkv_compile.calibrate; import "
        "maskkv_compile; print(maskkv_compile.explain.__module__, maskkv_compile.explain.__name__, "
        "maskkv_compile.calibrate.__name__, 'explain' in dir(maskkv_compile))"
    )
    assert out == "maskkv_compile.explain explain calibrate True"
    import maskkv_compile

    assert callable(maskkv_compile.explain) and callable(maskkv_compile.calibrate)
    assert set(maskkv_compile.__all__) <= set(dir(maskkv_compile))


def test_root_folders_do_not_shadow_huggingface_kernels():
    """Run from the repository root (on sys.path, as ``python -m``/``-c`` put it), a top-level
    ``import kernels`` finds this repository's folder; transformers does that to probe for
    Hugging Face's kernels package. It must load no second copy of an op module (a second
    ``torch.library.custom_op`` definition replaces the first without a word) and read "not
    available"."""
    out = python(
        "import sys; assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd(); "
        "import kernels; import maskkv_compile.kernels as k; import torch; "
        "from transformers.utils.import_utils import is_kernels_available; "
        "assert kernels.attention is k.attention and kernels.__file__ == k.__file__; "
        # no second copy of an op module
        "assert not [m for m in sys.modules if m.startswith('kernels.')]; "
        "print(is_kernels_available(), hasattr(torch.ops.maskkv, 'select_kv'))"
    )
    assert out == "False True"
