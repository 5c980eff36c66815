"""What a request records beside its signals: one typed part, each field one setting.

A per-request setting is a field of :class:`Recording`, declared once with its help
text; everything else is derived from the fields, so adding one means this file and
the two engines that honour it (the transformers monitor, the vLLM processor core):

* :func:`tokur_decode.strategies.generate` (and ``plan``, ``hf.generate``,
  ``vllm.generate``) take it as a keyword argument;
* the command line takes it as ``--<name>`` (:meth:`Recording.add_flags`,
  :meth:`Recording.from_flags`);
* vLLM takes it as the flat ``extra_args`` key ``tokur_<name>`` (:meth:`to_flat`,
  :meth:`from_flat`), offline and over HTTP (``vllm_xargs``).

Each is checked in the constructor, with an error naming the key as the caller spelt
it (``alternatives``, ``tokur_alternatives``, ``--alternatives``).

Example:
    >>> Recording(alternatives=3).to_flat("tokur_")
    {'tokur_alternatives': 3}
    >>> Recording.from_flat({"tokur_alternatives": 99}, "tokur_")
    Traceback (most recent call last):
    ...
    ValueError: tokur_alternatives: an integer from 0 to 20, got 99
    >>> Recording.from_flat({}, "tokur_") == Recording()
    True
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_ALTERNATIVES", "Recording", "check_alternatives"]

#: The most alternatives per step a trace records.
MAX_ALTERNATIVES = 20


def check_alternatives(k, name: str = "alternatives") -> int:
    """``k`` if it is a number of alternatives to record (0: none), else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_ALTERNATIVES:
        raise ValueError(f"{name}: an integer from 0 to {MAX_ALTERNATIVES}, got {k!r}")
    return k


def _setting(default: Any, help: str, metavar: str) -> Any:
    """A field that is a per-request setting: its default, help text and metavar."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass(frozen=True)
class Recording:
    """What a request records beside its signals.

    Attributes:
        alternatives: each step's ``k`` most probable tokens and their probabilities
            (``trace.alternatives``; 0: none).

    Raises:
        ValueError: naming the field.
    """

    alternatives: int = _setting(
        0,
        f"record each step's K most probable tokens and their probabilities "
        f"(0 to {MAX_ALTERNATIVES}; 0: none)",
        "K",
    )

    def __post_init__(self) -> None:
        check_alternatives(self.alternatives)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names (the keyword arguments)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def checked(cls, values: Mapping, spelling: str = "{}") -> Recording:
        """The recording of ``values`` (settings by name; absent ones take their
        defaults), an error naming the key as ``spelling`` formats it."""
        try:
            return cls(**values)
        except ValueError as exc:
            name, sep, rest = str(exc).partition(": ")
            if spelling.startswith("--"):
                name = name.replace("_", "-")
            raise ValueError(f"{spelling.format(name)}{sep}{rest}") from exc

    @classmethod
    def from_flat(cls, args: Mapping, prefix: str) -> Recording:
        """The recording in flat ``extra_args`` (``<prefix><name>`` keys)."""
        values = {n: args[prefix + n] for n in cls.names() if prefix + n in args}
        return cls.checked(values, prefix + "{}")

    def to_flat(self, prefix: str) -> dict:
        """Flat ``extra_args`` keys for the settings that differ from the defaults."""
        default = Recording()
        return {
            prefix + n: getattr(self, n)
            for n in self.names()
            if getattr(self, n) != getattr(default, n)
        }

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """One ``--<name>`` option per setting."""
        for f in dataclasses.fields(cls):
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=type(f.default),
                default=f.default,
                metavar=f.metadata["metavar"],
                help=f.metadata["help"],
            )

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> dict:
        """The settings parsed by :meth:`add_flags`, checked (an error names the flag),
        as keyword arguments."""
        values = {n: getattr(args, n) for n in cls.names()}
        cls.checked(values, "--{}")
        return values
