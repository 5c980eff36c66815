"""The one-line cause of a failed vLLM engine start (:mod:`tokur_decode.cli.engine_log`);
the real failure is in ``tests/cli/test_cli_vllm.py``."""

from __future__ import annotations

import os
import subprocess
import sys

from tokur_decode.cli.engine_log import EngineLog, start_failure

STARTUP = RuntimeError("Engine core initialization failed. See root cause above.")


def test_the_first_error_of_a_child_process_is_the_cause():
    with EngineLog() as log:
        code = (
            "import sys\n"
            "print('(Worker pid=9) WARNING 12-01 10:00:00 [a.py:1] Exception: a fallback', "
            "file=sys.stderr)\n"
            "print('(Worker pid=9) ERROR 12-01 10:00:01 [b.py:2] ValueError: the root', "
            "file=sys.stderr)\n"
            "print('RuntimeError: Worker failed with error the root', file=sys.stderr)\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)  # inherits fd 2
        log.flush()
    message = start_failure(STARTUP, log)
    assert message == "the vLLM engine did not start: ValueError: the root"


def test_a_memory_cause_gets_the_fix_and_other_errors_pass_through():
    with EngineLog() as log:
        os.write(2, b"ValueError: Available memory on node 0 is less than requested\n")
        log.flush()
    assert "--kv-cache-gib" in start_failure(STARTUP, log)
    assert start_failure(RuntimeError("something else"), log) is None  # re-raised by main
    assert start_failure(ValueError("Engine core initialization failed"), log) is None
    assert "its log above says why" in start_failure(STARTUP, None)


def test_stderr_is_restored_and_passed_through(capfd):
    with EngineLog() as log:
        os.write(2, b"inside\n")
        log.flush()
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "inside\nafter\n"
    assert list(log.lines) == ["inside"]
