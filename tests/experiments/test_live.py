"""``scale --live``: recipes run for real on a scripted backend; what each item records
(grade, the recipe's own token count, seconds) and the summary against majority@8."""

from __future__ import annotations

import pytest

from tokur_decode.experiments.data import Item
from tokur_decode.experiments.live import check_recipes, run_recipes, summarize_live

from ..strategies.test_adaptive_sampling import Voting


def _items():
    return [
        Item("tasks:arithmetic", str(i), f"q{i}", answer, "numeric", str(i))
        for i, answer in enumerate(["4", "7"])
    ]


def test_each_recipe_is_run_graded_and_counted():
    # prompt p's k-th answer (over every call) is script[p][k], k + 1 tokens long
    script = [["4"] * 40, ["1", "7", "7", "7", "7", "7", "7", "7", "7"] + ["7"] * 40]
    names = ["greedy", "self-consistency", "esc"]
    rows = run_recipes(Voting(script), _items(), names, max_new_tokens=8, seed=0)
    greedy, majority, esc = (rows[1][name] for name in names)
    assert greedy["correct"] is False and greedy["tokens"] == 1  # its first answer, "1"
    assert majority["correct"] is True and majority["tokens"] == sum(range(2, 10))
    assert esc["correct"] is True and esc["tokens"] == sum(range(10, 14))  # one window of 4
    assert all(r[n]["seconds"] > 0 and r[n]["load"] >= 0 for r in rows for n in names)

    summary = summarize_live([{"live": r} for r in rows], n_resamples=50)
    methods = summary["methods"]
    assert methods["greedy"]["accuracy"]["value"] == 0.5
    assert methods["self-consistency"]["accuracy"]["value"] == 1.0
    assert methods["self-consistency"]["tokens_vs_majority"] == 1.0
    assert methods["esc"]["tokens_vs_majority"] == pytest.approx(
        methods["esc"]["tokens"] / methods["self-consistency"]["tokens"]
    )


def test_unknown_recipes_are_refused_by_name():
    assert check_recipes(["greedy", "esc", "greedy"]) == ["greedy", "esc"]
    with pytest.raises(ValueError, match="live: "):
        check_recipes(["no-such-recipe"])
