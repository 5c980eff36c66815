"""The groups of the parallel run (``make test``: ``pytest -n 2``; ``conftest.py`` at
the root): a module that uses the session-wide ``plain_engine`` is in its group, so
that the engine starts once a run; every other module is a group of its own."""

from __future__ import annotations

import re
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]


def _uses_plain_engine(path: Path) -> bool:
    """Whether a fixture or test of the module asks for ``plain_engine``."""
    return bool(re.search(r"def \w+\([^)]*\bplain_engine\b", path.read_text(encoding="utf-8")))


def test_the_modules_that_share_the_engine_are_one_group():
    users = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    users = {u for u in users if _uses_plain_engine(ROOT / u)}
    assert users == set(conftest._SHARED)  # a new user, or a renamed one, is caught here
    assert {conftest.group_of(f"{u}::test_x") for u in users} == {"plain-engine"}


def test_every_other_module_is_its_own_group():
    assert conftest.group_of("tests/core/test_trace.py::test_a[1-x]") == "tests/core/test_trace.py"
    assert conftest.group_of("tokur_decode/core/signals.py::tokur_decode.core.signals.entropy") == (
        "tokur_decode/core/signals.py"
    )
