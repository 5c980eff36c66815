"""Reasoning steps: where an answer's steps end (docs/reference.md section 2).

A *step* ends at the first token at which the step's own text contains the
``delimiter`` (default a blank line, ``"\\n\\n"``), or after a token budget. Two views
of the same rule:

* :func:`step_index` numbers the steps of recorded answers from their token texts
  (host side, for step-level reducers: :mod:`tokur_decode.core.aggregate`);
* :class:`StepEnds` tells, per decoding step and on the device, which rows just ended
  a step: the delimiter inside the new token, or split across the previous token and
  this one (two-token splits; vLLM's stop strings see the same for a two-character
  blank line).

Example:
    >>> step_index([["Add", " 2", ".\\n\\n", "Then", "\\n", "\\n", "4"]]).tolist()
    [[0, 0, 0, 1, 1, 1, 2]]
    >>> import torch
    >>> ends = StepEnds(["a", "\\n", ".\\n\\n", "b"], "\\n\\n")
    >>> tail = ends.start(2)
    >>> ended, tail = ends.update(torch.tensor([2, 1]), tail)   # ".\\n\\n" | "\\n"
    >>> ended.tolist()
    [True, False]
    >>> ended, tail = ends.update(torch.tensor([0, 1]), tail)   # "a" | "\\n" after "\\n"
    >>> ended.tolist()
    [False, True]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["DEFAULT_DELIMITER", "StepEnds", "check_delimiter", "step_index"]

#: A blank line ends a step unless a recipe says otherwise.
DEFAULT_DELIMITER = "\n\n"


def check_delimiter(delimiter, name: str = "delimiter") -> str:
    """``delimiter`` if it is a non-empty string.

    Raises:
        ValueError: naming ``name``.
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError(f"{name}: must be a non-empty string, got {delimiter!r}")
    return delimiter


def step_index(
    tokens: Sequence[Sequence[str]], delimiter: str = DEFAULT_DELIMITER, width: int | None = None
) -> torch.Tensor:
    """The step of each token ``[B, width]`` (int64; padding continues the last step):
    a step ends at the token where the text since the step began first contains
    ``delimiter``."""
    check_delimiter(delimiter)
    width = max((len(row) for row in tokens), default=0) if width is None else width
    out = torch.zeros(len(tokens), max(width, 1), dtype=torch.long)
    for b, row in enumerate(tokens):
        step, text = 0, ""
        for t, piece in enumerate(row[:width]):
            out[b, t] = step
            text += piece
            if delimiter in text:
                step, text = step + 1, ""
        if len(row) < width:
            out[b, len(row) :] = step
    return out[:, :width] if width == 0 else out


class StepEnds:
    """Which rows end a step at this token, on the device, from the token texts of a
    vocabulary (``pieces[i]``: token ``i``'s text; ids beyond them never end one).

    :meth:`start` gives the per-row state of a fresh step (``[B, len(delimiter) - 1]``
    booleans: whether the text so far ends with each proper prefix of the delimiter);
    :meth:`update` takes each row's new token and returns ``(ended, state)``.
    """

    def __init__(self, pieces: Sequence[str], delimiter: str = DEFAULT_DELIMITER, *, size=None):
        check_delimiter(delimiter)
        size = len(pieces) if size is None else max(size, len(pieces))
        d, pad = delimiter, [False] * (size - len(pieces))

        def column(test) -> list[bool]:  # beyond the pieces (a padded vocabulary): False
            return [test(piece) for piece in pieces] + pad

        splits = range(1, len(d))
        self.delimiter = d
        self.contains = torch.tensor(column(lambda piece: d in piece), dtype=torch.bool)
        self.ends = torch.tensor(
            [column(lambda piece, k=k: piece.endswith(d[:k])) for k in splits], dtype=torch.bool
        ).reshape(len(d) - 1, size)
        self.starts = torch.tensor(
            [column(lambda piece, k=k: piece.startswith(d[k:])) for k in splits], dtype=torch.bool
        ).reshape(len(d) - 1, size)

    def to(self, device) -> StepEnds:
        self.contains = self.contains.to(device)
        self.ends, self.starts = self.ends.to(device), self.starts.to(device)
        return self

    def start(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.ends.shape[0], dtype=torch.bool, device=self.ends.device)

    def update(self, token: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = (state & self.starts[:, token].T).any(dim=-1)
        return self.contains[token] | split, self.ends[:, token].T
