"""The package's shape: imports only downward through the layers, no import cycle (function-level imports
included), a light ``import dsformer`` and a torch-free command-line parser, small core modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dsformer

PACKAGE = Path(dsformer.__file__).parent

# lowest first; a module may import its own layer's modules and those of the layers below
LAYERS = [
    ("basics", ["dsformer.version", "dsformer.errors", "dsformer.files", "dsformer.hardware", "dsformer.report"]),
    ("structures", ["dsformer.structures"]),
    ("surgery", ["dsformer.surgery", "dsformer.allocation", "dsformer.calibration"]),
    ("quantization", ["dsformer.quantize"]),
    ("checkpoint IO", ["dsformer.checkpoint"]),
    ("kernels", ["dsformer.kernels"]),
    ("STF", ["dsformer.stf", "dsformer.callbacks"]),
    ("harness", ["dsformer.harness"]),
    ("CLI", ["dsformer.cli", "dsformer.__main__"]),
]
CORE = [name for _, prefixes in LAYERS[:7] for name in prefixes]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node, but for ``if TYPE_CHECKING:`` blocks (imports for type checkers only, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(name: str) -> set[str]:
    """Every dsformer module that ``name`` imports, anywhere in it (inside functions too)."""
    found = set()
    for node in _runtime_nodes(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(MODULES)
            found |= submodules  # `from package import module` imports the module
            if len(submodules) < len(node.names):  # and names defined in the package itself
                found.add(node.module)
    return {module for module in found if module in MODULES and module != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    return next(i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if name == p or name.startswith(p + "."))


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        if name != "dsformer":
            layer(name)


def test_nothing_imports_the_package_facade() -> None:
    """``dsformer/__init__`` loads names on first use; a module importing it would tie every layer together."""
    assert not [name for name, targets in GRAPH.items() if "dsformer" in targets]
    assert GRAPH["dsformer"] <= {"dsformer.version"}, "the facade imports nothing else at run time"


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"dsformer"}))
def test_imports_go_down_the_layers(name: str) -> None:
    upward = [target for target in GRAPH[name] if target != "dsformer" and layer(target) > layer(name)]
    assert not upward, f"{name} ({LAYERS[layer(name)][0]}) imports {upward} from a layer above it"


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components of the import graph are all single modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node] - {"dsformer"}:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_structures_import_no_kernel_and_name_no_structure_outside() -> None:
    """Kernels register their backends for a structure; nothing outside a structure's module special-cases it
    (DS is only the default structure of ``CompressConfig`` and ``STF.wrap``)."""
    for name in MODULES:
        if name.startswith("dsformer.structures"):
            assert not any(t.startswith("dsformer.kernels") for t in GRAPH[name]), name
    for name in ("dsformer.surgery", "dsformer.checkpoint", "dsformer.quantize", "dsformer.stf"):
        text = code(name)
        words = ('"ds"', '"svd"', '"nm"', "DenseSparseLinear", "LowRank", "NMLinear", "NMConfig", ".basis", '"basis"')
        for word in (*words, "isinstance(structure", "structure.name ==", "structure.name in"):
            assert word not in text, f"{name} names {word}"


def code(name: str) -> str:
    """A module's code without its docstrings and comments."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_core_loads_without_transformers() -> None:
    core = [name for name in CORE if name in MODULES and name != "dsformer.callbacks"]  # Trainer's callback
    code = "import sys, dsformer; " + "; ".join(f"import {name}" for name in core)
    code += "; print('transformers' in sys.modules)"
    assert run_python(code) == "False"


def test_the_command_line_help_loads_no_torch() -> None:
    code = (
        "import sys, contextlib, io\nfrom dsformer.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main(['--help'])\n"
        "print('torch' in sys.modules)"
    )
    assert run_python(code) == "False"


def test_module_sizes() -> None:
    core = [name for name in MODULES if name.startswith(tuple(CORE)) and layer(name) < layer("dsformer.harness")]
    large = {name: n for name in core if (n := len(MODULES[name].read_text().splitlines())) > 400}
    assert not large, f"core modules over 400 lines: {large}"
    assert len(MODULES["dsformer.cli"].read_text().splitlines()) <= 340  # parsing and one call per verb
