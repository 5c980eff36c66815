"""What the ``tokur-decode`` commands share: the model options and loading, signal lists,
TokUR's flags."""

from __future__ import annotations

import argparse

__all__ = ["load", "model_args", "signal_list", "tokur_args", "tokur_options"]

#: TokUR's ``--tokur-*`` flags: option -> (type, help). Their defaults are
#: :class:`~tokur_decode.core.perturbation.PerturbationConfig`'s, shown, never set here.
_TOKUR_FLAGS = {
    "rank": (int, "perturbed singular directions"),
    "sigma": (float, "noise scale"),
    "samples": (int, "predictive samples M, clean included"),
    "seed": (int, "noise seed"),
}


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
