"""Monitored generation on a vLLM engine, with the transformers path's result type.

:func:`generate` is :func:`tokur_decode.strategies.generate` on a
:class:`~tokur_decode.vllm.VLLMBackend` (what ``tokur-decode generate --backend vllm``
runs): best-of-N samples its candidates through the engine (``SamplingParams(n=N)``),
DeepConf online sends its warm-up candidates, calibrates one threshold per prompt and
sends the later candidates with a stop at it, branch recipes re-submit each alternative
on the prefix cache (:mod:`tokur_decode.vllm.branching`); all choose with the same code
as transformers.

Example:
    >>> import tokur_decode.vllm as tv
    >>> engine = tv.llm(enforce_eager=True)                              # doctest: +SKIP
    >>> result = tv.generate(engine, "Who won the 1937 Tour de France?",
    ...                      strategy="logtoku-abstain")                  # doctest: +SKIP
    >>> result.texts[0], result.actions[0][0]["step"]                    # doctest: +SKIP
    ("I don't know.", 18)
    >>> best = tv.generate(engine, "What is 17 + 25?",
    ...                    strategy="self-certainty-best-of-n")           # doctest: +SKIP
    >>> best.actions[0][0]["chosen"], len(best.candidates[0])            # doctest: +SKIP
    (3, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.result import GenerationResult
from ..strategies import run
from .backend import VLLMBackend

__all__ = ["generate"]


def generate(
    engine, prompts: str | Sequence[str], *, chat: bool | None = None, **options
) -> GenerationResult:
    """Answer ``prompts`` on ``engine`` (built with :func:`tokur_decode.vllm.llm`)
    while recording signals and acting on them as ``strategy`` says.

    ``chat`` and ``options`` mean what they mean in :func:`tokur_decode.hf.generate`;
    TokUR's options are the engine's (:func:`~tokur_decode.vllm.tokur_engine_args`),
    except its noise scale, which a request may set (``tokur={"sigma": ...}``); other
    ``tokur`` options (or a recipe's ``[tokur]`` table) that differ from the engine's
    are refused, naming them. A resample recipe with the adaptive rule is given by name or TOML
    path (the engine loads it); rollback is refused with a ``ValueError`` before
    anything is sent. A branch recipe's ``tokens_generated`` counts what the engine
    decoded (see :func:`tokur_decode.vllm.branching.branch`).
    """
    signal_params, options = run.split_options(options)
    return run.generate(VLLMBackend(engine, chat=chat, **signal_params), prompts, **options)
