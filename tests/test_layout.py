"""The repository's shape: what imports what, and nothing stray under version control."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages of ours it must never import (DESIGN.md: dependency direction)
FORBIDDEN = {
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
    "shared_models": {"client", "server", "simulations"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_it_must_not(package):
    offending = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & FORBIDDEN[package]
    }
    assert not offending, f"{package} imports {offending}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from server.run_config import APP_DIR\n    import client.cli\n")
    assert _imports(probe) == {"server", "client"}


def test_no_pid_log_or_output_files_are_tracked():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    stray = [f for f in tracked if f.endswith((".pid", ".out", ".log")) or f.startswith("runs/")]
    assert not stray


PACKAGES = ("server", "client", "shared_models", "simulations")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported: not those in a function body
    (deliberate lazy imports) nor under ``if TYPE_CHECKING:`` (never run)."""

    def walk(nodes: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                yield from walk(node.orelse)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        yield from walk(
                            child.body if isinstance(child, ast.excepthandler) else [child]
                        )

    yield from walk(ast.parse(path.read_text(), filename=str(path)).body)


def import_graph(
    root: Path = ROOT, packages: tuple[str, ...] = PACKAGES, *, lazy: bool = False
) -> dict[str, set[str]]:
    """Module -> our modules whose code runs when it is imported (module-level imports only;
    with ``lazy``, also the imports inside functions: every module it may use).

    ``from a.b import c`` runs ``a.b`` and, when ``c`` is a module, ``a.b.c``; importing
    ``a.b.c`` also runs the packages ``a`` and ``a.b`` first, unless the importer is inside them
    (then they are already running).
    """
    files = {_module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        targets: set[str] = set()
        if lazy:
            tree = ast.parse(path.read_text(), filename=str(path))
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        else:
            nodes = list(_module_level_imports(path))
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(
                    (base if node.level else []) + ([node.module] if node.module else [])
                )
                names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:i])
                    if prefix in files and prefix not in ancestors and prefix != module:
                        targets.add(prefix)
        graph[module] = targets
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[m1, m2, ..., m1]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_packages_import_graph_has_no_cycle():
    graph = import_graph()
    assert "shared_models.partition" in graph["shared_models.tasks.images"]
    cycle = import_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_follows_relative_imports_and_packages(tmp_path):
    """The circle issue #30 found, rebuilt: a module importing a package whose ``__init__``
    imports a module that imports the first one back; a lazy import does not count."""
    pkg = tmp_path / "pkg"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks" / "__init__.py").write_text("from .images import X\n")
    (pkg / "tasks" / "base.py").write_text("LABEL = 1\n")
    (pkg / "tasks" / "images.py").write_text("def f():\n    from ..partition import g\nX = 1\n")
    (pkg / "partition.py").write_text("from .tasks.base import LABEL\n")
    assert import_cycle(import_graph(tmp_path, ("pkg",))) is None
    (pkg / "tasks" / "images.py").write_text("from ..partition import g\nX = 1\n")
    assert import_cycle(import_graph(tmp_path, ("pkg",))) == [
        "pkg.partition",
        "pkg.tasks",
        "pkg.tasks.images",
        "pkg.partition",
    ]


def _entry_points() -> set[str]:
    """The modules fedcare starts: its console script, Flower's app components, and the
    modules shipped code runs with ``python -m``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    targets = [
        *project["project"]["scripts"].values(),
        *project["tool"]["flwr"]["app"]["components"].values(),
    ]
    started = {
        match
        for pkg in PACKAGES
        for path in (ROOT / pkg).rglob("*.py")
        for match in re.findall(r'"-m",\s*"([\w.]+)"', path.read_text())
    }
    return {target.partition(":")[0] for target in targets} | started


def test_every_shipped_module_is_used_by_fedcare():
    """No module of the packages is there only for benchmarks or tests: each one is reached
    from an entry point through imports (lazy ones included; a package's ``__init__`` runs
    before its modules). Code only benchmarks use lives in benchmarks/, tests' in tests/."""
    graph = import_graph(lazy=True)
    entry = _entry_points()
    assert entry <= set(graph), f"entry points not found: {entry - set(graph)}"
    reached, todo = set(), list(entry)
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        todo += [*graph[module], *(parents & set(graph))]
    assert sorted(set(graph) - reached) == []


# Public names of the packages that only tests use, and why they stay shipped.
TEST_ONLY_NAMES = {
    # the closed form the client-level DP tests pin Flower's accountant against; it sits beside
    # calibrate_client_noise, which searches the same accountant
    "client_dp_epsilon": "server/strategies.py",
}


def test_every_public_function_and_class_of_the_packages_is_used_by_them():
    """A top-level public function or class whose name appears nowhere else in the packages is
    there for benchmarks or tests (move it to benchmarks/ or tests/); decorated ones (typer
    commands, Flower handlers) are called by their framework."""
    files = [path for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")]
    words = Counter(re.findall(r"\w+", "\n".join(path.read_text() for path in files)))
    unused = {
        node.name: str(path.relative_to(ROOT))
        for path in files
        for node in ast.parse(path.read_text()).body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
        and not node.name.startswith("_")
        and not node.decorator_list
        and words[node.name] == 1  # its definition only
    }
    assert unused == TEST_ONLY_NAMES
