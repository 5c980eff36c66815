"""From an eval run to a calibrated recipe: the files written (all or none), the CLI,
the refusals, and the round trip on the embedded model (calibrate, write, load,
generate) abstaining exactly where the rule fails. The vLLM round trip is in
``tests/vllm/test_engine.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokur_decode.core.policy import Trigger
from tokur_decode.experiments import data, detection, plots
from tokur_decode.experiments.abstention import (
    _float32_inside,
    calibrate_run,
    trigger_score,
    write_rule,
)
from tokur_decode.experiments.store import read_run
from tokur_decode.experiments.validity import trigger_fires
from tokur_decode.strategies.recipe import Strategy

from ..helpers import calibrated_round_trip
from .test_runners import ScriptedBackend


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """60 scripted answers (40 right: low entropy; 20 wrong: high entropy)."""
    folder = tmp_path_factory.mktemp("run")
    items = data.load("tasks:arithmetic", limit=60)
    detection.run_detection(
        items,
        ScriptedBackend(items),
        out=folder,
        signals="entropy,deepconf",
        n_resamples=10,
        progress=False,
    )
    return folder


def test_a_run_becomes_a_recipe_a_report_and_a_plot(scripted_run, tmp_path):
    result = calibrate_run(scripted_run, risk=0.2, delta=0.1)
    files = write_rule(result, tmp_path / "rule.toml")
    assert [f.name for f in files] == ["rule.toml", "rule.json", "rule.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rule.json", "rule.png", "rule.toml"]
    loaded = Strategy.load(tmp_path / "rule.toml")
    assert loaded == result.strategy and loaded.action == "abstain"
    rule = loaded.config
    assert rule.risk == 0.2 and rule.delta == 0.1 and 0.6 < rule.coverage <= 0.8
    assert rule.score == result.rule.score and "60 items" in rule.calibrated_on
    # on the scripted answers: every right one kept, and few wrong ones
    _, records = read_run(scripted_run)
    kept = [r for r in records if rule.keeps(r["scores"][rule.score])]
    assert all(rule.keeps(r["scores"][rule.score]) for r in records if r["correct"])
    assert sum(not r["correct"] for r in kept) / len(kept) <= 0.2 < 20 / 60
    report_ = json.loads((tmp_path / "rule.json").read_text())
    assert report_["guarantee"].startswith("with probability at least 0.9")
    assert report_["recipe"]["action"]["threshold"] == rule.threshold


def test_nothing_is_written_when_calibration_or_writing_fails(scripted_run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs at least 91 calibration items"):
        calibrate_run(scripted_run, risk=0.025, delta=0.1)
    result = calibrate_run(scripted_run, risk=0.2)

    def broken(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "calibration_plot", broken)
    with pytest.raises(ValueError, match="No space left on device"):
        write_rule(result, tmp_path / "rule.toml")
    assert list(tmp_path.iterdir()) == []  # neither the recipe nor a temporary file
    with pytest.raises(ValueError, match="does not exist"):
        write_rule(result, tmp_path / "no" / "rule.toml")
    with pytest.raises(ValueError, match="is not a run folder"):
        calibrate_run(tmp_path, risk=0.1)


def test_the_cli_writes_the_rule_or_says_what_is_missing(scripted_run, tmp_path, capsys):
    from tokur_decode.cli import main

    out = tmp_path / "rule.toml"
    assert main(["calibrate", str(scripted_run), "--risk", "0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Rule: keep when" in printed and "Guarantee: with probability" in printed
    assert out.is_file() and out.with_suffix(".png").is_file()
    args = ["calibrate", str(scripted_run), "--risk", "0.02", "--out", str(tmp_path / "x.toml")]
    assert main(args) == 2
    assert "needs at least 114 calibration items" in capsys.readouterr().err
    assert not (tmp_path / "x.toml").exists() and not (tmp_path / "x.json").exists()
    for bad, message in [
        (["--score", "margin:mean"], "score: 'margin:mean' was not recorded"),
        (["--delta", "1"], "delta: must be in (0, 1)"),
        (["--out", str(tmp_path / "r.txt")], "--out: the recipe is a .toml file"),
        (["--out", str(tmp_path / "nodir" / "r.toml")], "--out: the folder"),
        (["--seed=-1"], "argument --seed: an integer from 0 to 4294967295, got '-1'"),
    ]:
        argv = ["calibrate", str(scripted_run), "--risk", "0.2", "--out", str(out), *bad]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["calibrate", str(scripted_run), "--risk", "0.2", "--json", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["score"]  # stdout is the JSON, whole
    assert "wrote " in printed.err
    assert out.stat().st_mode & 0o777 == 0o644  # readable as any file the user writes


def test_unlabelled_answers_are_refused_not_counted_as_wrong(scripted_run, tmp_path):
    lines = (scripted_run / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for record in records[::2]:
        record["correct"] = None  # a score run's answers without gold or label
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text((scripted_run / "config.json").read_text())
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=rf"run: {len(records[::2])} of {len(records)} answers"):
        calibrate_run(folder, risk=0.2)
    calibrate_run(scripted_run, risk=0.2)  # the control: all labelled


def test_a_probe_rule_is_written_as_numbers_and_read_back(scripted_run, tmp_path):
    result = calibrate_run(scripted_run, risk=0.2, score="probe", holdout=0.5)
    write_rule(result, tmp_path / "probe.toml")
    text = (tmp_path / "probe.toml").read_text()
    assert "[action.probe]" in text and "pickle" not in text
    loaded = Strategy.load(tmp_path / "probe.toml")
    assert loaded.config.probe == result.rule.probe and loaded.config.keep == "below"
    assert set(loaded.signals) <= {"entropy", "deepconf"}


@pytest.mark.slow
def test_the_round_trip_on_the_embedded_model_abstains_exactly_where_the_rule_fails(
    embedded, tmp_path
):
    from tokur_decode.core.result import GenerationResult
    from tokur_decode.hf import HFBackend, generate

    model, tok = embedded

    def answer(prompts, recipe) -> GenerationResult:  # eval's batches of 8, so equal numbers
        parts = [
            generate(model, tok, prompts[i : i + 8], strategy=str(recipe), max_new_tokens=12)
            for i in range(0, len(prompts), 8)
        ]
        texts = [t for p in parts for t in p.texts]
        actions = [a for p in parts for a in p.actions]
        return GenerationResult(texts, parts[0].trace, prompts, actions)

    backend = HFBackend.deferred(lambda: embedded, model_name="embedded", batch_size=8)
    records, rule, result = calibrated_round_trip(backend, answer, tmp_path)
    decisions = [a[-1] for a in result.actions]
    assert all(d["action"] == "abstain" and d["risk"] == 0.5 for d in decisions)
    for record, decision, text in zip(records, decisions, result.texts, strict=True):
        assert decision["value"] == pytest.approx(record["scores"][rule.score], abs=1e-6)
        fails = not rule.keeps(record["scores"][rule.score])
        assert decision["abstained"] == fails == (text == rule.abstain_text)
        if not fails:
            assert text == record["response"]
    abstained = sum(d["abstained"] for d in decisions)
    assert 0 < abstained < len(decisions)  # the rule acts, and not on everything


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-5, 5, width=32), min_size=0, max_size=12),
    st.floats(-5, 5),
    st.sampled_from(["above", "below"]),
    st.integers(1, 3),
    st.integers(0, 4),
    st.integers(1, 3),
)
def test_the_trigger_score_says_exactly_where_the_trigger_fires(
    values, lam, direction, patience, min_tokens, window
):
    trigger = Trigger("entropy", lam, direction, patience, min_tokens, window)
    u = trigger_score(trigger, values)
    fires = trigger_fires(trigger, values)
    # the rule "keep when u <= threshold", written back as the trigger's float32 threshold
    written = _float32_inside(lam if direction == "above" else -lam, direction)
    again = trigger_fires(
        Trigger("entropy", written, direction, patience, min_tokens, window), values
    )
    assert again == (not u <= (lam if direction == "above" else -lam))
    if direction == "above":
        assert fires == (u > np.float32(lam))
    else:
        assert fires == (-u < np.float32(lam))


def test_a_stop_recipe_gets_a_certified_threshold(scripted_run, tmp_path):
    recipe = {
        "name": "entropy-abstain",
        "description": "Abstain when entropy stays high.",
        "trigger": {"signal": "entropy", "threshold": 9.0, "patience": 2},
        "action": {"type": "stop", "abstain_text": "No idea."},
    }
    result = calibrate_run(scripted_run, risk=0.2, recipe=recipe, name="calibrated")
    write_rule(result, tmp_path / "calibrated.toml")
    loaded = Strategy.load(tmp_path / "calibrated.toml")
    assert loaded.action == "stop" and loaded.trigger.patience == 2
    assert loaded.trigger.threshold != 9.0 and "Threshold calibrated: with probability" in (
        loaded.description
    )
    _, records = read_run(scripted_run)
    stopped = [trigger_fires(loaded.trigger, r["values"]["entropy"]) for r in records]
    kept = [r for r, s in zip(records, stopped, strict=True) if not s]
    assert sum(not r["correct"] for r in kept) / len(kept) <= 0.2
    with pytest.raises(ValueError, match="reads 'logtoku_epistemic', which the run did not record"):
        calibrate_run(scripted_run, risk=0.2, recipe="logtoku-abstain")
    with pytest.raises(ValueError, match="does not abstain"):
        calibrate_run(scripted_run, risk=0.2, recipe="entropy-resample")
