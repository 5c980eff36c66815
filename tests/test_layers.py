"""The import contract (pyproject's ``[tool.importlinter]``): kept by the tree, broken by
a violation injected into a copy of it (the controls that show the check can fail)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is a dev extra")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "tokur_decode", tmp_path / "tokur_decode")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_the_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("vllm/backend.py", "from ..hf import HFBackend", "layers"),  # sibling backends
        ("core/trace.py", "from ..strategies import run", "layers"),  # core reaching up
        ("strategies/run.py", "import transformers", "import no engine"),
    ],
)
def test_a_violation_breaks_the_build(tmp_path, module, line, contract):
    tree = _copy(tmp_path)
    path = tree / "tokur_decode" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = _lint(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), result.stdout
