"""The cause of a failed vLLM engine start, in one line.

vLLM starts its engine in other processes; when one fails, the caller gets only
"Engine core initialization failed. See root cause above", and the cause is a line in
the middle of the processes' tracebacks on stderr. :class:`EngineLog` copies stderr
(file descriptor 2, which those processes inherit) through to the terminal and keeps
its last lines, so that :meth:`EngineLog.cause` can name the first exception they
report.

Example:

    >>> import os
    >>> with EngineLog() as log:
    ...     _ = os.write(2, b"(Worker pid=7) WARNING 12-01 13:03 [x.py:1] Exception: not it\\n")
    ...     _ = os.write(2, b"(Worker pid=7) ERROR 12-01 13:03 [x.py:2] ValueError: no room\\n")
    ...     log.flush()
    >>> log.cause()
    'ValueError: no room'
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading

__all__ = ["EngineLog", "start_failure"]

# A traceback's last line, "SomeError: message", alone or after vLLM's error prefix
# "(Worker pid=7) ERROR 12-01 13:03:37 [file.py:1063] " (warnings quoting one are not)
_EXCEPTION = re.compile(
    r"^(?:\(\w+ pid=\d+\) )?(?:ERROR \S+ \S+ \[[^\]]+\] )?([A-Za-z_][\w.]*(?:Error|Exception): .+)$"
)
_STARTUP = "Engine core initialization failed"
_MARKER = b"\0tokur-engine-log\0"  # written by flush(), never passed through


class EngineLog:
    """Stderr passed through while the context is open, its last ``keep`` lines kept.

    Processes started inside the context keep writing through it after it closes;
    their lines are still passed through (by a daemon thread) but no longer kept."""

    def __init__(self, keep: int = 2000) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._pending = b""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._written = self._read = 0
        self._keeping = True

    def __enter__(self) -> EngineLog:
        sys.stderr.flush()
        read, write = os.pipe()
        self._terminal = os.dup(2)
        os.dup2(write, 2)
        os.close(write)
        threading.Thread(target=self._pump, args=(read,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        with self._lock:
            self._keeping = False
        os.dup2(self._terminal, 2)  # the pipe stays open for processes that inherited it

    def flush(self) -> None:
        """Wait until everything written to stderr so far has been passed through."""
        sys.stderr.flush()
        with self._lock:
            self._written += 1
            target = self._written
        os.write(2, _MARKER + b"\n")
        with self._drained:
            self._drained.wait_for(lambda: self._read >= target, timeout=5)

    def _pump(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            data = self._pending + chunk
            *complete, self._pending = data.split(b"\n")
            with self._lock:
                for raw in complete:
                    if raw.endswith(_MARKER):
                        self._read += 1
                        self._drained.notify_all()
                        raw = raw[: -len(_MARKER)]
                        if not raw:
                            continue
                    os.write(self._terminal, raw + b"\n")
                    if self._keeping:
                        self.lines.append(raw.decode("utf-8", "replace"))

    def cause(self) -> str | None:
        """The first exception line the kept lines report (the root cause: vLLM's
        processes log the innermost failure first), without vLLM's prefix."""
        for line in self.lines:
            match = _EXCEPTION.search(line.rstrip())
            if match and _STARTUP not in match.group(1):
                return match.group(1)
        return None


def start_failure(exc: BaseException, log: EngineLog | None) -> str | None:
    """The one-line message for ``exc`` when it is vLLM's failed engine start: the cause
    from ``log`` and the fix for the causes we know; ``None`` for any other error."""
    if not isinstance(exc, RuntimeError) or _STARTUP not in str(exc):
        return None
    cause = log.cause() if log is not None else None
    message = "the vLLM engine did not start: " + (cause or "its log above says why")
    if cause is None or "memory" in cause.lower():
        message += (
            "; --kv-cache-gib sets the KV cache it reserves (on CPU, memory that another "
            "process holds is not available to it)"
        )
    return message
