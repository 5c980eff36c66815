"""Helpers shared by the tests (fixtures are in ``conftest.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["NEAR_TIE", "NoHostSync", "agreeing_steps", "calibrated_round_trip", "script"]

#: Two most probable tokens closer than this in probability are a near tie: another
#: engine, or another machine's kernels, may round them into the other order.
NEAR_TIE = 1e-3

#: Questions the engine tests answer (short, mixed, with known answers).
QUESTIONS = [
    "What is the capital of France?",
    "Who won the 1937 Tour de France?",
    "What is 17 + 25?",
    "Name a primary colour.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
    "Who wrote Hamlet?",
    "What is the largest planet in the solar system?",
]


def prompt_token_ids(tokenizer, questions) -> list[list[int]]:
    """Each question's prompt token ids as the transformers path encodes it (chat
    template), unpadded: what the vLLM tests send."""
    from tokur_decode.core.text import encode_prompts

    enc = encode_prompts(tokenizer, questions)
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    ]


def agreeing_steps(tokens, reference, margins) -> int:
    """The steps over which a greedy decoding ``tokens`` agrees with a ``reference``
    decoding of the same prompt (by another engine, or on other kernels). Where they
    part, the reference's two most probable tokens must have been a near tie
    (``margins``: the reference's ``margin`` signal per step, p(1) - p(2)), or the
    assertion fails; past that step the two decode different texts.

    Example:
        >>> agreeing_steps([5, 6, 7], [5, 6, 7], [0.5, 0.5, 0.5])
        3
        >>> agreeing_steps([5, 9, 7], [5, 6, 7], [0.5, 1e-4, 0.5])
        1
        >>> agreeing_steps([5, 9, 7], [5, 6, 7], [0.5, 0.5, 0.5])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: parted at step 1, where the margin is 0.5...
    """
    tokens, reference = [int(t) for t in tokens], [int(t) for t in reference]
    n = min(len(tokens), len(reference))
    same = next((t for t in range(n) if tokens[t] != reference[t]), n)
    if same < n:
        margin = float(margins[same])
        assert margin < NEAR_TIE, f"parted at step {same}, where the margin is {margin:.3g}"
    return same


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads tensor data back to the host."""

    FORBIDDEN = {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::nonzero",
        "aten::is_nonzero",
        "aten::equal",
        "aten::allclose",
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation in the hot path: {name}")
        if name == "aten::_to_copy" and kwargs and str(kwargs.get("device", "")) == "cpu":
            if any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args):
                raise AssertionError("device-to-host copy in the hot path")
        return func(*args, **(kwargs or {}))


def calibrated_round_trip(backend, answer, folder, seed: int = 2) -> tuple:
    """Calibrate, write, load, generate: an ``eval`` run of ``backend`` on 48 built-in
    items, an abstention rule calibrated on it (``chosen_logprob:sum``, risk 0.5 at
    delta 0.2; ``seed``: a split for which 48 answers certify a rule), written as a
    recipe; then ``answer(prompts, recipe_path)`` generates with the recipe and returns
    a :class:`~tokur_decode.core.result.GenerationResult`. Returns the run's records,
    the rule's action config and the result."""
    from tokur_decode.experiments import data, detection
    from tokur_decode.experiments.abstention import calibrate_run, write_rule
    from tokur_decode.strategies.recipe import Strategy

    items = data.load("tasks:capitals", limit=24) + data.load("tasks:arithmetic", limit=24)
    run = detection.run_detection(
        items,
        backend,
        out=folder / "run",
        signals="chosen_logprob,entropy",
        max_new_tokens=12,
        n_resamples=20,
        progress=False,
    )
    calibrated = calibrate_run(
        folder / "run", risk=0.5, delta=0.2, score="chosen_logprob:sum", seed=seed
    )
    recipe = folder / "rule.toml"
    write_rule(calibrated, recipe)
    assert Strategy.load(recipe) == calibrated.strategy
    result = answer([item.prompt for item in items], recipe)
    return run.records, calibrated.strategy.config, result


def script(name: str):
    """The module of ``scripts/<name>.py`` (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
