"""The layers of docs/architecture.md hold: import-linter's contract passes, and fails on a forbidden import."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter (dev extra) is not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "micronet", tmp_path / "micronet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layer_contract_is_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.parametrize(("module", "forbidden"), [
    ("scoring/report.py", "from micronet.training import STAGES"),   # siblings stay independent
    ("io/loading.py", "from micronet import scoring"),             # io sits below scoring
    ("models/layers.py", "import micronet.compress"),              # models is the bottom
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, forbidden):
    tree = _copy_tree(tmp_path)
    path = tree / "micronet" / module
    path.write_text(path.read_text() + f"\n{forbidden}\n")
    result = _lint(tree)
    assert result.returncode != 0 and "BROKEN" in result.stdout


def test_no_first_party_import_hides_inside_a_function():
    """Function-level imports of micronet hid the import cycles; heavy third-party ones may still be deferred."""
    offenders = []
    for file in (ROOT / "micronet").rglob("*.py"):
        lines = file.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("micronet"):
                        offenders.append(f"{file.relative_to(ROOT)}:{inner.lineno}")
                    elif isinstance(inner, ast.Import) and any(a.name.startswith("micronet") for a in inner.names):
                        offenders.append(f"{file.relative_to(ROOT)}:{inner.lineno}")
    assert not offenders, offenders
