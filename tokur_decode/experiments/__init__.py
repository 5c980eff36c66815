"""Experiments: wrong-answer detection and test-time scaling on real models.

* :mod:`~tokur_decode.experiments.data`: JSONL datasets and built-in tasks (``tasks:NAME``);
* :mod:`~tokur_decode.experiments.graders`: numeric, string and sympy math graders;
* :mod:`~tokur_decode.experiments.metrics`: AUROC, AUPRC, PRR, Top-p accuracy, ECE and
  bootstrap intervals (positive class = wrong answer, score = uncertainty);
* :mod:`~tokur_decode.experiments.generations`: what the runners ask of any
  :class:`~tokur_decode.strategies.Backend` (``n`` responses per prompt, with signals);
* :mod:`~tokur_decode.experiments.detection` and :mod:`~tokur_decode.experiments.scaling`:
  the two resumable runners (``tokur-decode eval`` and ``tokur-decode scale``);
* :mod:`~tokur_decode.experiments.report`: Markdown, plots and terminal tables.

Example:
    >>> from tokur_decode.experiments import data, graders
    >>> item = data.load("tasks:capitals", limit=1)[0]
    >>> graders.grade(f"The answer is {item.answer.split('|')[0]}.", item.answer, item.grader)
    True
"""
