r"""Named prompt templates: how a dataset's question becomes what the model is sent.

A JSONL question is sent as written unless a run asks otherwise: ``--prompt-suffix TEXT``
appends text (``"Answer with just the number."``), ``--prompt-template NAME`` applies
one of :data:`TEMPLATES`. Two ship, the prompts of TokUR's evaluation, both asking for
the final answer in ``\boxed{}`` (the ``math`` and ``numeric`` graders read it):

* ``tokur-llama``: a system prompt (Llama-3-Instruct models) asking for step-by-step
  work ending in "Therefore, the final answer is: $\boxed{answer}$";
* ``tokur-qwen``: the question followed by "Let's think step by step and output the
  final answer within \boxed{}." (Qwen2.5 models).

Example:
    >>> apply("tokur-qwen", "What is 2 + 3?")
    (None, "What is 2 + 3?\nLet's think step by step and output the final answer within \\boxed{}.")
    >>> system, user = apply("tokur-llama", "What is 2 + 3?")
    >>> user, system.splitlines()[-1]
    ('What is 2 + 3?', 'Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct.')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEMPLATES", "Template", "apply"]


@dataclass(frozen=True)
class Template:
    """A system prompt (or ``None``) and the user message, ``{question}`` filled in."""

    system: str | None
    user: str


TEMPLATES: dict[str, Template] = {
    "tokur-llama": Template(
        system=(
            "Solve the following math problem efficiently and clearly. Work step by step, "
            "one short step per line, and check each step.\n"
            "Regardless of the approach, always conclude with:\n"
            "Therefore, the final answer is: $\\boxed{answer}$. I hope it is correct."
        ),
        user="{question}",
    ),
    "tokur-qwen": Template(
        system=None,
        user="{question}\nLet's think step by step and output the final answer within \\boxed{{}}.",
    ),
}


def apply(name: str, question: str) -> tuple[str | None, str]:
    """``(system prompt or None, user message)`` of template ``name`` for ``question``."""
    if name not in TEMPLATES:
        raise ValueError(f"prompt_template: unknown {name!r}; choose from {sorted(TEMPLATES)}")
    template = TEMPLATES[name]
    return template.system, template.user.format(question=question)
