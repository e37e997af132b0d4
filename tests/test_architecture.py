"""The rules of docs/architecture.md: layers import one way, no cycles, ``import fa4_inductor`` is lean, and every
environment variable is read in ``config.py`` and documented in the README."""

import ast
import pathlib
import re
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fa4_inductor"
BASE = {"fa4_inductor.stats", "fa4_inductor._torch_private", "fa4_inductor.config"}
WIRING = {"fa4_inductor", "fa4_inductor.api", "fa4_inductor.__main__"}
# What compile/ may use of the runtime: the op schemas it emits and what FA4 serves.
COMPILE_USES_OF_RUNTIME = {"fa4_inductor.runtime.ops", "fa4_inductor.runtime.support",
                           "fa4_inductor.runtime.fa4_version"}


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in MODULES and module != name and not name.startswith(module + ".")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in WIRING:
        return "wiring"
    return module.split(".")[1]


ALLOWED = {
    "base": {"base"},
    "runtime": {"base", "runtime"},
    "compile": {"base", "compile"},
    "eager": {"base", "eager", "runtime"},
    "inspection": {"base", "compile", "runtime", "eager", "inspection"},
    "wiring": {"base", "compile", "runtime", "eager", "inspection", "wiring"},
}


def test_every_module_is_in_a_layer():
    assert {_layer(m) for m in MODULES} <= set(ALLOWED), sorted(m for m in MODULES if _layer(m) not in ALLOWED)


def test_layers_import_one_way():
    wrong = []
    for module, imported in GRAPH.items():
        layer = _layer(module)
        for other in imported:
            allowed = _layer(other) in ALLOWED[layer] or (layer == "compile" and other in COMPILE_USES_OF_RUNTIME)
            if not allowed:
                wrong.append(f"{module} -> {other}")
    assert not wrong, wrong


def test_no_import_cycles():
    """Depth-first search for a back edge, imports inside functions included."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(GRAPH[module]):
            if state.get(other) == "open":
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"
    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_import_is_lean():
    """``import fa4_inductor`` (here, without CUDA) builds no C++ launcher, imports no Triton kernel module and makes
    no CUDA context."""
    code = ("import sys, torch; import fa4_inductor; "
            "from fa4_inductor.runtime import native; "
            "assert native.load.cache_info().currsize == 0, 'native launcher built at import'; "
            "assert native.install_cuda_forward.cache_info().currsize == 0, 'launcher installed at import'; "
            "assert native.install_cuda_backward.cache_info().currsize == 0, 'launcher installed at import'; "
            "assert 'fa4_inductor.runtime.block_lists_kernel' not in sys.modules; "
            "assert 'fa4_inductor.runtime.split_kv_combine' not in sys.modules; "
            "assert not torch.cuda.is_initialized(); print('lean')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "lean" in result.stdout, result.stderr[-2000:]


def test_environment_variables_are_read_in_config_only():
    readers = [f"{path.name}: {line.strip()}" for path in PACKAGE.rglob("*.py") if path.name != "config.py"
               for line in path.read_text().splitlines() if re.search(r"os\.environ(\.get|\[)|os\.getenv", line)]
    assert not readers, readers


def test_the_readme_documents_every_variable():
    from fa4_inductor import config

    readme = (PACKAGE.parent / "README.md").read_text()
    assert [v.name for v in config.VARIABLES if f"`{v.name}`" not in readme] == []
