"""The code blocks of the README and the docs run as written, pasted into a file and run
from a folder outside the repository, with nothing set in the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)


def _run(code: str, tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_readme_runs_top_to_bottom(tmp_path):
    blocks = _blocks("README.md")
    assert len(blocks) >= 6
    proc = _run("\n".join(blocks), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


_DEEP_IMPORT = re.compile(r"^\s*from tokur_decode\.(?!vllm\b)[\w.]+ import", re.M)


def test_the_readmes_examples_import_from_the_top_level_only():
    """The public API is the top level (``tokur_decode``; vLLM's is ``tokur_decode.vllm``,
    an extra): a README example that reaches into a submodule shows an internal path."""
    deep = [
        m.group(0).strip() for block in _blocks("README.md") for m in _DEEP_IMPORT.finditer(block)
    ]
    assert deep == []
    assert _DEEP_IMPORT.search("from tokur_decode.hf.actions import StopOnTrigger")  # control
    assert not _DEEP_IMPORT.search("from tokur_decode.vllm import llm")


def test_control_a_broken_block_fails(tmp_path):
    proc = _run(_blocks("README.md")[1].replace("signals.entropy", "signals.entropyy"), tmp_path)
    assert proc.returncode != 0 and "entropyy" in proc.stderr


def test_the_verbalized_doc_block_runs(tmp_path):
    pytest.importorskip("outlines")
    (block,) = _blocks("docs/verbalized.md")
    proc = _run(block, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.engine
@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_vllm_doc_block_runs_as_a_script(tmp_path, index):
    pytest.importorskip("vllm")
    blocks = _blocks("docs/vllm.md")
    assert len(blocks) == 3
    proc = _run(blocks[index], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()  # it printed its results
