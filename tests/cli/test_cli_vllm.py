"""``tokur-decode generate --backend vllm`` as a new user runs it: no KV variable set,
memory held by another process, JSON on stdout; mistakes refused before the engine
starts."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.engine]

HOLD_GIB = 4
CLI = [sys.executable, "-m", "tokur_decode.cli", "generate", "--backend", "vllm"]


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    return env | {"PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def memory_held():
    """Another process holding HOLD_GIB GiB (touched pages, so the memory is in use)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"x = b'1' * ({HOLD_GIB} << 30); print('held', flush=True); "
            "import time; time.sleep(900)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    yield
    holder.kill()
    holder.wait()


def test_the_default_reservation_fails_under_held_memory(memory_held):
    """The control: without a bounded KV cache, vLLM's own default does not start here."""
    from tokur_decode.models import default_model_path

    code = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM(model={str(default_model_path())!r}, enforce_eager=True, max_model_len=512)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "Available memory" in proc.stdout + proc.stderr


def test_generate_starts_a_bounded_tokur_engine_and_prints_only_json(memory_held):
    args = ["--json", "--max-new-tokens", "4", "--signals", "entropy,tokur", "What is 2 + 2?"]
    proc = subprocess.run(
        [*CLI, *args], env=_clean_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # nothing but the report on stdout
    assert report["answer"]
    values = [t["tokur_epistemic"] for t in report["tokens"]]
    assert values and all(math.isfinite(v) and v >= 0 for v in values)  # a TokUR engine
    # (it started under held memory, where vLLM's default reservation fails: bounded)
    info = [line for line in proc.stderr.splitlines() if re.search(r"(^|\) )INFO ", line)]
    assert info == [], info[:5]  # vLLM's INFO lines are not the command's output
    # the engine stopped in time, not killed ("force killing remaining processes") nor
    # seen dying by vLLM's monitor ("engine core exited unexpectedly")
    assert "force killing" not in proc.stderr and "unexpectedly" not in proc.stderr


def test_vllms_info_log_comes_back_when_asked_for():
    env = _clean_env() | {"VLLM_LOGGING_LEVEL": "INFO"}
    args = ["--json", "--max-new-tokens", "2", "What is 2 + 2?"]
    proc = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Explicitly set" in proc.stderr  # vLLM's own line: the bounded KV cache


def test_what_the_engine_cannot_do_is_refused_before_it_starts():
    for args, message in [
        (["--strategy", "entropy-rollback"], "own decoding loop"),
        (["--strategy", "self-certainty-best-of-n", "--temperature", "0"], "temperature"),
        (["--signals", "entropy,bogus"], "unknown 'bogus'"),
    ]:
        proc = subprocess.run(
            [*CLI, *args, "q"], env=_clean_env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr
        assert "EngineCore" not in proc.stderr  # no engine was started
        assert "Traceback" not in proc.stderr  # one clear line, not a traceback
        assert proc.stderr.strip().splitlines()[-1].startswith("tokur-decode: error: ")


def test_a_failed_engine_start_names_its_cause_and_the_fix():
    args = ["--kv-cache-gib", "10000", "--max-new-tokens", "2", "q"]
    proc = subprocess.run(
        [*CLI, *args], env=_clean_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tokur-decode: error: the vLLM engine did not start: ValueError: ")
    assert "Available memory" in last and "--kv-cache-gib" in last
    assert "Exception: could not create" not in last  # a warning quoting one is not the cause
    assert "(EngineCore pid=" in proc.stderr  # vLLM's log is still passed through
