"""What the ``tokur-decode`` commands share: the model options and loading, signal lists,
TokUR's flags."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from ..core.limits import MAX_SAMPLES

__all__ = [
    "flags",
    "int_options",
    "integer",
    "SEED",
    "integers",
    "integers_from",
    "number",
    "load",
    "model_args",
    "signal_list",
    "tokur_args",
    "tokur_options",
    "verbalized_engine",
]


def flags(args: argparse.Namespace, *names: str) -> dict:
    """The parsed flags ``names`` as keyword arguments (each flag's value under its own
    name).

    Example:
        >>> flags(argparse.Namespace(risk=0.2, seed=3, out="x"), "risk", "seed")
        {'risk': 0.2, 'seed': 3}
    """
    return {name: getattr(args, name) for name in names}


def verbalized_engine(args):
    """The vLLM engine ``--verbalized`` asks on (structured outputs with Outlines)."""
    from ..verbalized.vllm_backend import engine

    return engine(
        args.model,
        enforce_eager=True,
        **flags(args, "dtype", "seed", "trust_remote_code"),
    )


def integer(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` (``None``: unbounded),
    refused when the command line is parsed, naming the flag and the range.

    Example:
        >>> parser = argparse.ArgumentParser(exit_on_error=False)
        >>> _ = parser.add_argument("--repeats", type=integer(1))
        >>> parser.parse_args(["--repeats", "0"])
        Traceback (most recent call last):
        ...
        argparse.ArgumentError: argument --repeats: an integer >= 1, got '0'
    """
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}")
        return value

    return parse


def integers(text: str, low: int = 1, high: int | None = None) -> list[int]:
    """An argparse ``type``: comma-separated integers from ``low`` to ``high``
    (``--batch-sizes 1,8``; :func:`integers_from` for other bounds)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < low or (high is not None and max(values) > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise argparse.ArgumentTypeError(f"comma-separated integers {bound}, got {text!r}")
    return values


def integers_from(low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """:func:`integers` with other bounds, as an argparse ``type``."""
    return lambda text: integers(text, low, high)


def number(low: float = 0.0, high: float | None = None, *, open_low: bool = True):
    """An argparse ``type``: a finite number above ``low`` (or from it, ``open_low``
    false) and at most ``high``.

    Example:
        >>> number()("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: a finite number > 0, got 'nan'
    """
    wanted = f"a finite number {'>' if open_low else '>='} {low:g}" + (
        "" if high is None else f" and <= {high:g}"
    )

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if open_low else value >= low)
        if not ok or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}")
        return value

    return parse


#: Seeds every random generator we hand them to accepts (NumPy's legacy seeding: 32 bits).
SEED = integer(0, 2**32 - 1)

#: TokUR's ``--tokur-*`` flags: option -> (type, help). Their defaults are
#: :class:`~tokur_decode.core.perturbation.PerturbationConfig`'s, shown, never set here.
_TOKUR_FLAGS = {
    "rank": (integer(1), "perturbed singular directions"),
    "sigma": (number(0, open_low=False), "noise scale"),
    "samples": (
        integer(1, MAX_SAMPLES),
        f"predictive samples M, clean included, 1 to {MAX_SAMPLES}",
    ),
    "seed": (SEED, "noise seed"),
}


def int_options(parser, *options: tuple[str, int, str], low: int = 1) -> None:
    """Integer flags ``(flag, default, help)``, each at least ``low``, the default shown."""
    for flag, default, text in options:
        parser.add_argument(
            flag, type=integer(low), default=default, help=f"{text} (default {default})"
        )


def model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="PATH_OR_NAME",
        help="a local transformers causal LM folder (or a name in the local HF cache); "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    group.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."
    )
    group.add_argument(
        "--dtype",
        default="auto",
        help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model folder's own Python code to run (off unless given)",
    )


def load(args):
    from transformers.utils import logging as hf_logging

    from ..models import load_default, load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.model:
        return load_model(
            args.model,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
        )
    return load_default(device=args.device, dtype=args.dtype)


def signal_list(text: str | None) -> list[str] | None:
    """``--signals`` validated (:func:`tokur_decode.core.signals.parse_signals`); ``None``:
    the strategy's or the default."""
    from ..core.signals import parse_signals

    return None if text is None else list(parse_signals(text))


def tokur_args(parser: argparse.ArgumentParser, title: str) -> None:
    """Add the ``--tokur-*`` flags (unset unless given: see :func:`tokur_options`)."""
    from ..core.perturbation import PerturbationConfig

    defaults = PerturbationConfig()
    group = parser.add_argument_group(title)
    for option, (kind, text) in _TOKUR_FLAGS.items():
        default = getattr(defaults, option)
        group.add_argument(f"--tokur-{option}", type=kind, help=f"{text} ({default})")


def tokur_options(args) -> dict | None:
    """The ``--tokur-*`` flags given (``None``: none), for ``tokur=`` or
    ``tokur_engine_args``: what is not given stays the recipe's ``[tokur]`` table's,
    else the defaults."""
    given = {k: getattr(args, f"tokur_{k}") for k in _TOKUR_FLAGS}
    return {k: v for k, v in given.items() if v is not None} or None
