"""A run folder that survives interruption: its configuration and its results, one JSON
line per item, appended (and flushed to disk) as items complete.

Reopening the folder with the same configuration returns the items already done, so a
rerun skips them; a different configuration is refused with the keys that differ. A
last line cut short by a crash is dropped (that item is simply redone). One run writes
a folder at a time: the store holds an exclusive lock on ``.lock`` in it until
:meth:`RunStore.close` (or the process ends), and a second run is refused. The
configuration is written (atomically) with the first results, so a run that fails
before its first item leaves nothing that blocks the corrected rerun.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> store = RunStore(folder, {"kind": "detect", "seed": 0})
    >>> store.append([{"key": "tasks:legs/0", "correct": True}])
    >>> store.close()
    >>> again = RunStore(folder, {"kind": "detect", "seed": 0})
    >>> sorted(again.done)
    ['tasks:legs/0']
    >>> again.close()
    >>> RunStore(folder, {"kind": "detect", "seed": 1})
    Traceback (most recent call last):
    ...
    ValueError: out: ... (seed: 0 there, 1 now); use another --out or the same settings
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

__all__ = ["RunStore", "read_run"]

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".lock"


class RunStore:
    """The configuration (``config.json``) and results (``results.jsonl``) of a run.

    Attributes:
        folder: the run folder.
        config: the run's configuration (JSON-able).
        done: records already written, by their ``"key"``.
    """

    def __init__(self, folder: str | Path, config: dict) -> None:
        self.folder = Path(folder)
        self._lock = _lock(self.folder)
        try:
            self._open(config)
        except BaseException:
            self.close()
            raise

    def _open(self, config: dict) -> None:
        self.config = json.loads(json.dumps(config))  # as it reads back from disk
        self.path = self.folder / RESULTS_NAME
        self.done: dict[str, dict] = {}
        if self.path.is_file():
            self._read()
        config_path = self.folder / CONFIG_NAME
        # a configuration without results (a run that failed before its first item,
        # from an older version) does not block: it is rewritten with the first results
        self._config_written = False
        if config_path.is_file() and self.done:
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
            self._config_written = True

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
        """Write ``records`` (each with a unique ``"key"``) and flush them to disk (the
        configuration first, with the first records)."""
        if self._lock is None:
            raise ValueError(f"out: the run store of {self.folder} is closed")
        if not self._config_written:
            _write_atomically(self.folder / CONFIG_NAME, json.dumps(self.config, indent=2) + "\n")
            self._config_written = True
        with self.path.open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for record in records:
            self.done[record["key"]] = record

    def close(self) -> None:
        """Release the folder's lock (the store writes no more)."""
        if getattr(self, "_lock", None) is not None:  # None: closed, or never locked
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def __del__(self) -> None:  # a store dropped without close() frees its folder
        self.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(folder: Path) -> int:
    """An exclusive lock on ``folder``'s lock file (the folder made if need be), held by
    the returned descriptor; creating the file is the check that the folder is writable.

    Raises:
        ValueError: the folder cannot be written, or another run holds the lock.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ValueError(f"out: cannot write to {folder} ({exc.strerror})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"out: another run is writing to {folder}; wait for it to end or use another --out"
        ) from None
    return fd


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``: a whole new file or the old one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    seen: set[str] = set()
    for record in records:
        key = record.get("key")
        if key in seen:
            raise ValueError(f"run: {results} holds item {key} twice (two runs wrote it)")
        seen.add(key)
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
