"""Served traces in JSON or packed, and :func:`parse_response`, which reads either.

A trace in a server's response (``choices[i]["tokur"]``) lists one value per generated
token for every signal. With ``tokur_format: "packed"`` each of those lists (and the
token ids) is sent as little-endian bytes in base64 instead (``float16`` for values,
``int32`` for ids): 2 bytes per value and about a third more for base64, against 8 to 22
for a JSON number. float16 keeps about three significant digits; values beyond +-65504
become +-inf (only a self-certainty at its cap reaches them).

Example:
    >>> trace = {"token_ids": [5, 9], "tokens": ["a", "b"], "signals": {"entropy": [0.5, 2.0]}}
    >>> packed = pack_trace(trace)
    >>> packed["signals"]["entropy"], packed["format"]
    ('ADgAQA==', 'packed')
    >>> unpack_trace(packed)["signals"]["entropy"]
    [0.5, 2.0]
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["FORMATS", "pack_trace", "parse_response", "unpack_trace"]

#: The encodings a served trace can have (``tokur_format``).
FORMATS = ("json", "packed")

_VALUES = np.dtype("<f2")
_IDS = np.dtype("<i4")


def _pack(values: list, dtype: np.dtype) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text: str, dtype: np.dtype) -> list:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).tolist()


def pack_trace(trace: Mapping[str, Any]) -> dict[str, Any]:
    """``trace`` with its per-token lists packed (see the module docstring)."""
    out = dict(trace)
    out["format"] = "packed"
    out["token_ids"] = _pack(trace["token_ids"], _IDS)
    out["signals"] = {k: _pack(v, _VALUES) for k, v in trace["signals"].items()}
    if "alternatives" in trace:
        alt = dict(trace["alternatives"])
        width = len(alt["ids"][0]) if alt["ids"] else 0
        alt["k"] = width
        alt["ids"] = _pack([i for step in alt["ids"] for i in step], _IDS)
        alt["probs"] = _pack([p for step in alt["probs"] for p in step], _VALUES)
        out["alternatives"] = alt
    return out


def unpack_trace(trace: Mapping[str, Any]) -> dict[str, Any]:
    """A served trace as plain lists, whichever its format."""
    if trace.get("format", "json") != "packed":
        return dict(trace)
    out = {k: v for k, v in trace.items() if k != "format"}
    out["token_ids"] = _unpack(trace["token_ids"], _IDS)
    out["signals"] = {k: _unpack(v, _VALUES) for k, v in trace["signals"].items()}
    if "alternatives" in trace:
        alt = dict(trace["alternatives"])
        k = alt.pop("k")
        ids, probs = _unpack(alt["ids"], _IDS), _unpack(alt["probs"], _VALUES)
        alt["ids"] = [ids[i : i + k] for i in range(0, len(ids), k)] if k else []
        alt["probs"] = [probs[i : i + k] for i in range(0, len(probs), k)] if k else []
        out["alternatives"] = alt
    return out


def parse_response(response: Any) -> list[dict[str, Any] | None]:
    """The trace of every choice of a server's response (a completion or chat completion,
    streamed chunks joined or not), JSON or packed, as plain lists; ``None`` for a choice
    without one. ``response`` is the decoded JSON or the ``openai`` client's object (its
    extra fields are read).

    Example:
        >>> parse_response({"choices": [{"index": 0, "tokur": {"token_ids": [1],
        ...     "signals": {"entropy": [0.25]}}}, {"index": 1}]})
        [{'token_ids': [1], 'signals': {'entropy': [0.25]}}, None]
    """
    if hasattr(response, "model_dump"):
        response = response.model_dump()
    choices = response.get("choices", [])
    by_index = {c.get("index", i): c.get("tokur") for i, c in enumerate(choices)}
    return [
        None if by_index.get(i) is None else unpack_trace(by_index[i])
        for i in range(max(by_index, default=-1) + 1)
    ]
