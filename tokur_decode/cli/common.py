"""What the ``tokur-decode`` commands share: the model options and loading, signal lists."""

from __future__ import annotations

import argparse

__all__ = ["load", "model_args", "signal_list"]


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
