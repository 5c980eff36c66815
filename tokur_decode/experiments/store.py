"""A run folder that survives interruption: its configuration and its results, one JSON
line per item, appended (and flushed to disk) as items complete.

Reopening the folder with the same configuration returns the items already done, so a
rerun skips them; a different configuration is refused with the keys that differ. A
last line cut short by a crash is dropped (that item is simply redone).

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> store = RunStore(folder, {"kind": "detect", "seed": 0})
    >>> store.append([{"key": "tasks:legs/0", "correct": True}])
    >>> sorted(RunStore(folder, {"kind": "detect", "seed": 0}).done)
    ['tasks:legs/0']
    >>> RunStore(folder, {"kind": "detect", "seed": 1})
    Traceback (most recent call last):
    ...
    ValueError: out: ... (seed: 0 there, 1 now); use another --out or the same settings
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RunStore", "read_run"]

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.jsonl"


class RunStore:
    """The configuration (``config.json``) and results (``results.jsonl``) of a run.

    Attributes:
        folder: the run folder.
        config: the run's configuration (JSON-able).
        done: records already written, by their ``"key"``.
    """

    def __init__(self, folder: str | Path, config: dict) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".writable"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"out: cannot write to {self.folder} ({exc.strerror})") from exc
        self.config = json.loads(json.dumps(config))  # as it reads back from disk
        config_path = self.folder / CONFIG_NAME
        if config_path.is_file():
            saved = json.loads(config_path.read_text(encoding="utf-8"))
            if saved != self.config:
                diffs = [
                    f"{k}: {json.dumps(saved.get(k))} there, {json.dumps(self.config.get(k))} now"
                    for k in sorted(set(saved) | set(self.config))
                    if saved.get(k) != self.config.get(k)
                ]
                raise ValueError(
                    f"out: {self.folder} was made with another configuration "
                    f"({'; '.join(diffs)}); use another --out or the same settings"
                )
        else:
            config_path.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        self.path = self.folder / RESULTS_NAME
        self.done: dict[str, dict] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        records, offset = _parse(data, self.path)
        self.done = {record["key"]: record for record in records}
        with self.path.open("r+b") as fh:
            fh.truncate(offset)
            if offset and not data[:offset].endswith(b"\n"):
                fh.seek(offset)
                fh.write(b"\n")

    def append(self, records: list[dict]) -> None:
        """Write ``records`` (each with a unique ``"key"``) and flush them to disk."""
        with self.path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for record in records:
            self.done[record["key"]] = record


def read_run(folder: str | Path) -> tuple[dict, list[dict]]:
    """``(config, records)`` of a finished or interrupted run, read only.

    Raises:
        ValueError: ``folder`` holds no run (naming what is missing) or no result yet.
    """
    folder = Path(folder)
    config_path, results = folder / CONFIG_NAME, folder / RESULTS_NAME
    for path in (config_path, results):
        if not path.is_file():
            raise ValueError(f"run: {folder} is not a run folder (no {path.name})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    records, _ = _parse(results.read_bytes(), results)
    if not records:
        raise ValueError(f"run: {folder} has no results yet")
    return config, records


def _parse(data: bytes, path: Path) -> tuple[list[dict], int]:
    """The records of a results file's bytes and how many bytes they take: a last line
    cut short by a crash (no newline, not JSON) is left out; any other bad line is an
    error naming ``path`` and the line."""
    records, offset = [], 0
    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            if not line.endswith(b"\n"):  # the line being written when the run stopped
                break
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
        offset += len(line)
        if record is not None:
            records.append(record)
    return records, offset
