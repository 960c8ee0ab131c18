"""The package layers of README "Architecture", checked rather than hoped for.

import-linter (``[tool.importlinter]`` in pyproject.toml) checks the packages; these tests show that its contract
really fails a broken layer, and check what import-linter cannot take as a root: the entry-point modules.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("configs", "diffusion", "models", "data", "training", "evaluation", "benchmarks")
ENTRY_POINTS = ("train", "sample", "evaluate")


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(__import__("sys").executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is not installed: it is a dev dependency (pip install import-linter)")
    return exe


def _run_lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_lint_imports(), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, function-local imports included."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_contract_holds():
    proc = _run_lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_contract_fails_a_broken_layer(tmp_path):
    """A copy of the packages where diffusion imports models inside a function: lint-imports must refuse it."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _run_lint(tmp_path).returncode == 0  # the copy itself is clean
    loss = tmp_path / "diffusion" / "loss.py"
    loss.write_text(loss.read_text() + "\n\ndef _sneaky():\n    from models import build_network\n\n"
                    "    return build_network\n")
    proc = _run_lint(tmp_path)
    assert proc.returncode != 0
    assert "diffusion is not allowed to import models" in proc.stdout, proc.stdout


def test_nothing_imports_an_entry_point():
    """train.py, sample.py and evaluate.py parse, wire and call: no package, benchmark or other entry point imports
    them (the tests may, to test them)."""
    offenders = []
    sources = [p for name in PACKAGES for p in (ROOT / name).rglob("*.py")]
    sources += [ROOT / f"{name}.py" for name in ENTRY_POINTS]
    for path in sources:
        bad = _imported_roots(path) & set(ENTRY_POINTS) - {path.stem if path.parent == ROOT else ""}
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(bad))}")
    assert not offenders, offenders


def test_the_import_scanner_sees_function_local_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import sample\n    from evaluate import main\n")
    assert {"sample", "evaluate"} <= _imported_roots(probe)
