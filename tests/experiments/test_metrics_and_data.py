"""Experiments: data loading, graders, metrics, scoring and the resumable run store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("sklearn")  # the experiments extra

from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from tokur_decode.core.trace import Trace  # noqa: E402
from tokur_decode.experiments import data, metrics, scoring  # noqa: E402
from tokur_decode.experiments.graders import GRADERS, grade  # noqa: E402
from tokur_decode.experiments.store import RunStore, read_run  # noqa: E402

# --------------------------------------------------------------------------- data


def test_builtin_tasks_are_seeded_prefix_stable_and_correct():
    a = data.load("tasks:arithmetic", seed=3)
    assert a == data.load("tasks:arithmetic", seed=3)
    assert a != data.load("tasks:arithmetic", seed=4)
    assert data.load("tasks:arithmetic", seed=3, limit=10) == a[:10]  # --limit then resume
    for item in a:
        expr = item.question.removeprefix("What is ").removesuffix("?")
        assert int(item.answer) == eval(expr)  # noqa: S307 - our own generated arithmetic
    legs = data.load("tasks:legs", limit=50)
    for item in legs:
        total = 0
        for count, animal in _animals(item.question):
            name = {"sheep": "sheep", "geese": "goose"}.get(animal, animal.rstrip("s"))
            total += count * data.LEGS[name]
        assert total == int(item.answer)
    caps = data.load("tasks:capitals")
    assert len(caps) == 50 and len({c.id for c in caps}) == 50
    assert all(c.grader == "string" and c.prompt.startswith(c.question) for c in caps)
    with pytest.raises(ValueError, match="size"):
        data._task("capitals", 0, 51)


def _animals(question: str):
    body = question.removeprefix("A farm has ").split(".")[0]
    for part in body.split(" and "):
        count, animal = part.split(" ", 1)
        yield int(count), animal


def test_load_many_keys_are_unique_and_duplicates_refused():
    items = data.load_many("tasks:capitals, tasks:legs", limit=3)
    assert [i.key for i in items][:2] == ["tasks:capitals/0", "tasks:capitals/1"]
    with pytest.raises(ValueError, match="listed twice"):
        data.load_many("tasks:legs,tasks:legs")
    with pytest.raises(ValueError, match="unknown task"):
        data.load("tasks:nope")
    with pytest.raises(ValueError, match="limit"):
        data.load("tasks:legs", limit=0)


def test_jsonl_shapes_gsm8k_math_and_per_item_grader(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        json.dumps({"question": "Sum?", "answer": "2 + 2 = <<4>>4\n#### 1,234"})
        + "\n\n"
        + json.dumps({"question": "More?", "answer": "#### 7", "id": "x"})
        + "\n"
    )
    items = data.load(str(gsm))
    assert [i.answer for i in items] == ["1234", "7"]
    assert [i.id for i in items] == ["0", "x"]
    assert items[0].grader == "numeric" and items[0].prompt == "Sum?"  # as written
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(
        json.dumps({"problem": "Half?", "solution": r"It is $\boxed{\frac{1}{2}}$."})
        + "\n"
        + json.dumps({"problem": "Who?", "answer": "Gauss", "grader": "string"})
        + "\n"
    )
    first, second = data.load(str(math_file))
    assert first.answer == r"\frac{1}{2}" and first.grader == "math"
    assert second.grader == "string"  # per-item override
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"input": "Colour of the sky?", "target": "blue"}) + "\n")
    assert data.load(str(text))[0].grader == "string"
    assert data.load(str(text), grader="math")[0].grader == "math"  # dataset override


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["q", "a"]', "expected a JSON object"),
        ('{"answer": "a"}', "no question"),
        ('{"question": "q"}', "no answer"),
        ('{"question": "q", "answer": "  "}', "no answer"),
        ('{"question": "q", "answer": "a", "grader": "fuzzy"}', "grader: unknown"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "answer": "1"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
        data.load(str(path))


def test_jsonl_duplicate_ids_and_empty_file(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"q": 1}\n'.replace('"q": 1', '"question": "a", "answer": "1", "id": 5') * 2)
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id '5'"):
        data.load(str(path))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no items"):
        data.load(str(empty))
    with pytest.raises(FileNotFoundError):
        data.load(str(tmp_path / "missing.jsonl"))
    folder = tmp_path / "a-folder.jsonl"
    folder.mkdir()
    with pytest.raises(ValueError, match="data: .*a-folder.jsonl is a folder"):
        data.load(str(folder))  # was IsADirectoryError
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        '{"question": "ok", "answer": "1"}\n{"question": "caf\xe9"}\n'.encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8 \(byte 18"):
        data.load(str(latin))


# --------------------------------------------------------------------------- graders


#: (grader, response, gold, right?): the numeric grader reads the last number (or a
#: boxed one), the string grader whole words of the answer line, the math grader sympy.
GRADED = [
    ("numeric", "3 dogs have 12 legs.", "12", True),
    ("numeric", "There are 12 legs, not 13.", "12", False),  # the LAST number counts
    ("numeric", "The answer is -1,234.", "-1234", True),
    ("numeric", "It costs $1,000,000 in total", "1000000", True),
    ("numeric", "That is 40%.", "40", True),
    ("numeric", "10-5 = 5", "5", True),  # a minus between numbers is not a sign
    ("numeric", "10-5", "-5", False),
    ("numeric", r"so \boxed{42}, then 7 more", "42", True),  # \boxed wins over the last number
    ("numeric", "#### 72", "72", True),
    ("numeric", "3.50 dollars", "3.5", True),
    ("numeric", "Answer: 3/4", "0.75", True),
    ("numeric", "twelve", "12", False),
    ("numeric", "", "0", False),
    ("numeric", "1,5", "15", False),  # not a thousands separator
    ("numeric", "12", "#### 1,2", False),
    ("string", "Paris.", "Paris", True),
    ("string", "The capital of France is Paris!", "Paris", True),
    ("string", "Parisian food", "Paris", False),  # whole words only
    ("string", "BOGOTÁ", "Bogota", True),  # accents and case
    ("string", "Answer: Washington, D.C.", "Washington|Washington, D.C.", True),
    ("string", "kiev", "Kyiv|Kiev", True),
    ("string", "Mexico", "Mexico City", False),
    ("string", "Answer: Rome\nNot Paris", "Paris", False),  # the answer line only
    ("string", "", "Paris", False),
    ("math", r"$\boxed{\frac{1}{2}}$", "0.5", True),
    ("math", r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    ("math", r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("math", r"\boxed{\dfrac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True),
    ("math", r"\boxed{\frac{\frac{1}{2}}{2}}", "1/4", True),  # nested braces
    ("math", r"\boxed{90^\circ}", "90", True),
    ("math", r"\boxed{1,000}", "1000", True),
    ("math", r"\boxed{(1,2)}", "(1,2)", True),
    ("math", r"\boxed{(2,1)}", "(1,2)", False),
    ("math", r"\boxed{(1,2)}", "(12)", False),
    ("math", r"\boxed{\text{(A)}}", "(A)", True),  # not sympy: normalised text
    ("math", r"\boxed{\pi/2}", r"\frac{\pi}{2}", True),
    ("math", r"\boxed{3}", "4", False),
    ("math", r"\boxed{__import__('os').system('true')}", "0", False),  # never evaluated
]


@pytest.mark.parametrize(("grader", "response", "gold", "expected"), GRADED)
def test_graders(grader, response, gold, expected):
    assert grade(response, gold, grader) is expected


def test_grader_keys_are_canonical_for_voting():
    numeric = GRADERS["numeric"]
    assert numeric.extract("1,000 apples") == numeric.extract("It is 1000.") == "1000"
    assert GRADERS["string"].extract("  Paris. ") == "paris"
    assert numeric.extract("no digits") is None
    with pytest.raises(ValueError, match="grader"):
        grade("1", "1", "fuzzy")


# --------------------------------------------------------------------------- metrics

_LABELS = st.lists(st.booleans(), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(_LABELS, st.data())
def test_auroc_auprc_match_sklearn_with_wrong_as_positive(correct, draw):
    scores = draw.draw(
        st.lists(st.integers(0, 5), min_size=len(correct), max_size=len(correct))
    )  # small integers: many ties
    c, u = np.array(correct), np.array(scores, dtype=float)
    if c.all() or not c.any():
        assert math.isnan(metrics.auroc(c, u))
        return
    assert metrics.auroc(c, u) == pytest.approx(roc_auc_score(~c, u))
    assert metrics.auroc(c, u) == pytest.approx(roc_auc_score(c, -u))  # TokUR's convention
    assert metrics.auprc(c, u) == pytest.approx(average_precision_score(~c, u))


@settings(max_examples=60, deadline=None)
@given(_LABELS, st.data())
def test_ranking_metrics_invariants(correct, draw):
    n = len(correct)
    u = np.array(draw.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=float)
    c = np.array(correct)
    # invariant under strictly increasing transforms of the score
    assert metrics.prr(c, u) == pytest.approx(metrics.prr(c, np.exp(u)), nan_ok=True)
    for p in metrics.TOP_P:
        assert 0 <= metrics.top_p_accuracy(c, u, p) <= 1
    # a constant score is exactly random: PRR 0, top-p accuracy = accuracy
    const = np.zeros(n)
    if c.any() and not c.all():
        assert metrics.prr(c, const) == pytest.approx(0.0, abs=1e-12)
        assert metrics.prr(c, ~c) == pytest.approx(1.0)  # the oracle
        assert metrics.prr(c, c) <= 0  # the anti-oracle
    assert metrics.top_p_accuracy(c, const, 0.5) == pytest.approx(c.mean())
    coverage, accuracy = metrics.risk_coverage(c, u)
    assert coverage[-1] == 1 and accuracy[-1] == pytest.approx(c.mean())


def test_metrics_hand_computed():
    correct = [True, True, True, False, False]
    u = [0.1, 0.2, 0.6, 0.5, 0.9]
    # pairs (wrong, right) ranked correctly: wrong 0.5 beats 0.1, 0.2 (not 0.6); 0.9 beats all
    assert metrics.auroc(correct, u) == pytest.approx(5 / 6)
    assert metrics.top_p_accuracy(correct, u, 0.25) == 1.0  # floor(1.25) = 1 answer
    assert metrics.top_p_accuracy(correct, u, 0.75) == pytest.approx(2 / 3)  # 0.1, 0.2, 0.5
    # kept accuracy at 1..5 answers: 1, 1, 2/3, 3/4, 3/5; oracle: 1, 1, 1, 3/4, 3/5
    method = (1 + 1 + 2 / 3 + 3 / 4 + 3 / 5) / 5
    oracle = (1 + 1 + 1 + 3 / 4 + 3 / 5) / 5
    assert metrics.prr(correct, u) == pytest.approx((method - 0.6) / (oracle - 0.6))
    # ties: the two tied answers count as half right each
    assert metrics.top_p_accuracy([True, False, True], [0.0, 0.0, 1.0], 0.34) == 0.5
    assert metrics.ece([True, False], [0.9, 0.9]) == pytest.approx(0.4)
    assert metrics.ece([True, True, False], [1.0, 0.95, 0.05]) == pytest.approx(
        (2 * 0.025 + 0.05) / 3
    )
    with pytest.raises(ValueError, match="confidence"):
        metrics.ece([True], [1.5])
    with pytest.raises(ValueError, match="p must"):
        metrics.top_p_accuracy([True], [0.0], 0)
    with pytest.raises(ValueError, match="finite"):
        metrics.auroc([True, False], [0.0, math.nan])


def test_bootstrap_intervals_cover_the_point_and_skip_undefined_resamples():
    rng = np.random.default_rng(0)
    correct = rng.random(60) < 0.6
    u = rng.random(60) + (~correct) * 0.5
    m = metrics.detection_metrics(correct, u, n_resamples=200, seed=1)
    for iv in m.values():
        assert iv.low <= iv.value <= iv.high
    assert m["auroc"].value == pytest.approx(roc_auc_score(~correct, u))
    assert m == metrics.detection_metrics(correct, u, n_resamples=200, seed=1)  # seeded
    # two wrong answers among 20: many resamples have none; the interval is still finite
    few = np.array([True] * 18 + [False] * 2)
    iv = metrics.detection_metrics(few, np.arange(20.0), n_resamples=200)["auroc"]
    assert math.isfinite(iv.low) and math.isfinite(iv.high)
    assert format(metrics.Interval(0.5, math.nan, math.nan)) == "0.500"
    assert metrics.Interval.from_dict(iv.to_dict()) == iv


# --------------------------------------------------------------------------- scoring


def test_trace_scores_cover_every_reducer_and_orientation():
    from tokur_decode.core.aggregate import REDUCERS, STEP_REDUCERS

    trace = Trace(
        {
            "max_prob": torch.tensor([[0.9, 0.5, 0.0], [0.2, 0.0, 0.0]]),
            "entropy": torch.tensor([[0.1, 2.0, 9.0], [1.0, 0.0, 0.0]]),
        },
        torch.zeros(2, 3, dtype=torch.long),
        torch.tensor([2, 1]),
    )
    rows = scoring.trace_scores(trace)
    per_token = set(REDUCERS) - set(STEP_REDUCERS)  # no token texts: no steps
    assert set(rows[0]) == {f"max_prob:{r}" for r in per_token} | {
        f"entropy:{r}" for r in per_token if r not in ("naive", "vanilla")
    }
    trace.tokens = [["1", "\n\n"], ["2"]]
    with_steps = scoring.trace_scores(trace)
    assert with_steps[0]["entropy:step_mean_max"] == pytest.approx(1.05)  # one step
    assert rows[0]["entropy:mean"] == pytest.approx(1.05)  # padding ignored
    assert rows[0]["max_prob:naive"] == pytest.approx(1 - 0.45)
    assert scoring.uncertainty("max_prob:mean", 0.7) == -0.7
    assert scoring.uncertainty("max_prob:naive", 0.7) == 0.7
    assert scoring.uncertainty("entropy:max", 2.0) == 2.0
    assert scoring.uncertainty("verbalized_confidence", 0.8) == -0.8
    assert scoring.uncertainty("response_length", 7) == 7
    assert scoring.headline_scores(list(rows[0]))[:2] == ["max_prob:naive", "entropy:mean"]


# --------------------------------------------------------------------------- store


def test_store_resumes_refuses_other_configs_and_drops_a_torn_line(tmp_path):
    config = {"kind": "detect", "seed": 0, "signals": ["a"]}
    with RunStore(tmp_path, config) as store:
        store.append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with (tmp_path / "results.jsonl").open("a") as fh:
        fh.write('{"key": "c", "v"')  # the run died while writing
    with RunStore(tmp_path, config) as again:
        assert sorted(again.done) == ["a", "b"]
        again.append([{"key": "c", "v": 3}])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"signals: \[\"a\"\] there, \[\"b\"\] now"):
        RunStore(tmp_path, {**config, "signals": ["b"]})
    (tmp_path / "results.jsonl").write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"results\.jsonl:2: invalid JSON"):
        RunStore(tmp_path, config)


def test_one_run_writes_a_folder_at_a_time(tmp_path):
    """A second run into a folder being written is refused (it used to add duplicate
    records); once the first ends, the folder opens again (the control)."""
    config = {"kind": "detect", "seed": 0}
    first = RunStore(tmp_path, config)
    with pytest.raises(ValueError, match="out: another run is writing to"):
        RunStore(tmp_path, config)
    first.append([{"key": "a"}])
    first.close()
    with pytest.raises(ValueError, match="closed"):
        first.append([{"key": "b"}])
    with RunStore(tmp_path, config) as second:
        assert sorted(second.done) == ["a"]
    dropped = RunStore(tmp_path, config)
    del dropped  # dropped without close(): the folder is free again
    RunStore(tmp_path, config).close()
    (tmp_path / "results.jsonl").write_text('{"key": "a"}\n{"key": "a"}\n')  # an old race
    with pytest.raises(ValueError, match="holds item a twice"):
        read_run(tmp_path)


def test_a_run_that_fails_before_its_first_item_blocks_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with RunStore(tmp_path, {"kind": "detect", "seed": 0}):
            raise RuntimeError("the model failed to load")
    assert not (tmp_path / "config.json").exists()  # nothing half-done
    with RunStore(tmp_path, {"kind": "detect", "seed": 1}) as rerun:  # other settings: fine
        rerun.append([{"key": "a"}])
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 1
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_jsonl_prompts_are_sent_as_written_unless_asked(tmp_path, embedded):
    """A JSONL question reaches the model unchanged; a suffix or a named template only
    when asked; built-in tasks keep their instruction (the control)."""
    from tokur_decode.core.text import prompt_token_ids
    from tokur_decode.experiments.graders import grade

    _, tok = embedded
    path = tmp_path / "gsm.jsonl"
    question = "Natalia sold 48 clips in April and half as many in May. How many in all?"
    path.write_text(json.dumps({"question": question, "answer": "#### 72"}) + "\n")
    (item,) = data.load(str(path))
    assert item.prompt == question and item.system is None and item.messages == question
    (sent,) = prompt_token_ids(tok, [item.messages])
    alone = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    assert sent == list(getattr(alone, "input_ids", alone))  # nothing appended

    (suffixed,) = data.load(str(path), prompt_suffix="Answer with just the number.")
    assert suffixed.prompt == question + " Answer with just the number."
    (qwen,) = data.load(str(path), prompt_template="tokur-qwen")
    assert qwen.prompt.startswith(question) and qwen.prompt.endswith("within \\boxed{}.")
    (llama,) = data.load(str(path), prompt_template="tokur-llama")
    assert llama.prompt == question and "\\boxed{answer}" in llama.system
    (with_system,) = prompt_token_ids(tok, [llama.messages])
    assert "Therefore, the final answer is" in tok.decode(with_system)
    assert question in tok.decode(with_system)
    with pytest.raises(ValueError, match="chat template"):
        prompt_token_ids(tok, [llama.messages], chat=False)
    with pytest.raises(ValueError, match="prompt_template: unknown"):
        data.load(str(path), prompt_template="nope")
    with pytest.raises(ValueError, match="prompt_suffix"):
        data.load(str(path), prompt_suffix="x", prompt_template="tokur-qwen")
    assert data.load("tasks:legs", limit=1)[0].prompt.endswith("Answer with just the number.")
    answer = "... = 72.\nTherefore, the final answer is: $\\boxed{72}$. I hope it is correct."
    assert grade(answer, "72", "math") and grade(answer, "72", "numeric")
    assert not grade(answer.replace("{72}", "{71}"), "72", "math")
