"""Where tokur-decode caches what it computes once: converted models, TokUR's bases.

Example:
    >>> import os
    >>> os.environ["TOKUR_DECODE_CACHE"] = "/tmp/tokur-cache"
    >>> str(cache_dir())
    '/tmp/tokur-cache'
    >>> del os.environ["TOKUR_DECODE_CACHE"]
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$TOKUR_DECODE_CACHE``, else ``$XDG_CACHE_HOME/tokur-decode`` (default
    ``~/.cache/tokur-decode``)."""
    if env := os.environ.get("TOKUR_DECODE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tokur-decode"
