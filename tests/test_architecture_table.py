"""The architecture table in the docs is the one the matrix produces: a row for each
architecture TokUR claims in vLLM (each built and checked by tests/test_architectures.py),
a column for each check, no cell written by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .architectures import ARCHITECTURES
from .helpers import script

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_claims_exactly_the_architectures_the_matrix_checks():
    pytest.importorskip("vllm")
    from tokur_decode.vllm.tokur import ARCHITECTURES as CLAIMED

    assert set(CLAIMED) == set(ARCHITECTURES)


def test_the_docs_table_has_a_generated_row_per_architecture_and_a_column_per_check():
    text = (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    table = text.split("<!-- table: generated -->")[1].split("<!-- end of table -->")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \|(.*)\|$", table, re.M)}
    assert set(ARCHITECTURES) <= set(rows)
    checks = script("architecture_table").CHECKS
    for arch in ARCHITECTURES:
        cells = [c.strip() for c in rows[arch].split("|")]
        assert len(cells) == len(checks)
        assert all(c == "passed" or re.match(r"(failure|error|skipped): ", c) for c in cells)


def test_the_table_renders_what_the_report_says(tmp_path):
    arch = next(iter(ARCHITECTURES))
    report = tmp_path / "report.xml"
    report.write_text(
        "<testsuites><testsuite>"
        f'<testcase name="test_vllm_sigma_zero_has_no_epistemic_uncertainty[{arch}]"/>'
        f'<testcase name="test_vllm_batched_equals_the_m_passes[{arch}]">'
        '<failure message="AssertionError: too far | apart&#10;detail"/></testcase>'
        "</testsuite></testsuites>"
    )
    table = script("architecture_table")
    cells = table.outcomes(report)
    assert cells[("test_vllm_sigma_zero_has_no_epistemic_uncertainty", arch)] == "passed"
    failed = cells[("test_vllm_batched_equals_the_m_passes", arch)]
    assert failed == "failure: AssertionError: too far / apart"  # first line, no pipe
    row = next(line for line in table.table(cells).splitlines() if line.startswith(f"| {arch}"))
    assert "not run" in row and "passed" in row and "failure: " in row
