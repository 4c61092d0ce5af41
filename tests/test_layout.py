"""The repository's shape: what imports what, and nothing stray under version control."""

from __future__ import annotations

import ast
import subprocess
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
