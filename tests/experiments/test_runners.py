"""Experiment runners: detection and scaling on a scripted backend (fast, exact), the
DeepConf online simulation, resumption, reports, and an end-to-end run on the real
embedded model through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tokur_decode.core.signals import parse_signals
from tokur_decode.core.trace import Trace
from tokur_decode.experiments import (
    data,
    detection,
    metrics,
    report,
    scaling,
    scaling_methods,
    scaling_simulation,
)
from tokur_decode.experiments.generations import generations
from tokur_decode.hf import HFBackend
from tokur_decode.strategies.backend import Backend, Decoded


class ScriptedBackend:
    """Answers and per-token signals fixed by the prompt, so the numbers are known:
    a correct answer is confident (low entropy, high deepconf), a wrong one is not.
    Records every prompt it is asked about."""

    acts = ()

    def __init__(self, items, *, fail_after: int | None = None):
        self.by_prompt = {item.prompt: item for item in items}
        self.calls: list[str] = []
        self.fail_after = fail_after

    def describe(self) -> dict:
        return {"backend": "scripted"}

    def particles(self, prompts, request):
        raise ValueError("act: not offered")

    def decode(self, prompts, request):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += list(prompts)
        n, seed = request.n, request.sampling.seed
        texts, rows = [], []
        for prompt in prompts:
            item = self.by_prompt[prompt]
            rng = np.random.default_rng([int(item.id), n, seed])
            for j in range(n):
                right = (int(item.id) + j) % 3 != 0 if n > 1 else int(item.id) % 3 != 0
                texts.append(f"The answer is {item.answer if right else '-1'}.")
                length = 6 + j % 3
                base = 0.2 if right else 1.5
                rows.append((base + 0.1 * rng.random(length), length))
        t = max(r[1] for r in rows)
        entropy = torch.zeros(len(rows), t)
        for j, (values, length) in enumerate(rows):
            entropy[j, :length] = torch.tensor(values)
        trace = Trace(
            {"entropy": entropy, "deepconf": 10.0 - entropy},
            torch.zeros(len(rows), t, dtype=torch.long),
            torch.tensor([r[1] for r in rows]),
            tokens=[[f"t{i}" for i in range(r[1])] for r in rows],
            texts=texts,
        )
        prompt_of = [i for i in range(len(prompts)) for _ in range(n)]
        return Decoded(trace, prompt_of, [[] for _ in rows], sum(r[1] for r in rows))

    def generate(self, prompts, **kwargs):
        return generations(self, prompts, **kwargs)


#: A scripted scaling run's settings.
SCALE = dict(
    signals="entropy,deepconf",
    strategies=["deepconf-offline-vote"],
    temperature=0.7,
    repeats=4,
    n_resamples=30,
    progress=False,
)


def _items(n=12):
    return data.load("tasks:arithmetic", limit=n)


def test_backends_follow_the_protocol():
    assert isinstance(HFBackend.deferred(lambda: None, model_name="x"), Backend)
    assert isinstance(ScriptedBackend([]), Backend)
    with pytest.raises(ValueError, match="batch_size"):
        HFBackend.deferred(lambda: None, model_name="x", batch_size=0)
    with pytest.raises(ValueError, match="signals: unknown"):
        parse_signals("entropy,bogus")


def test_detection_metrics_of_a_scripted_run(tmp_path):
    items = _items()
    result = detection.run_detection(
        items,
        ScriptedBackend(items),
        out=tmp_path,
        signals="entropy,deepconf",
        n_resamples=50,
        progress=False,
    )
    records, summary = result.records, result.summary
    assert [r["correct"] for r in records] == [int(i.id) % 3 != 0 for i in items]
    assert summary["datasets"]["all"]["accuracy"]["value"] == pytest.approx(8 / 12)
    head = {h["score"]: h for h in summary["headline"]}
    # entropy separates right (0.2..0.3) from wrong (1.5..1.6): perfect detection,
    # whichever way the signal points (deepconf is a confidence, negated)
    for score in ("entropy:mean", "deepconf:deepconf_lowest_group"):
        assert head[score]["auroc"]["value"] == 1.0
        assert head[score]["prr"]["value"] == pytest.approx(1.0)
        assert head[score]["top_0.5"]["value"] == 1.0
    assert summary["auroc"]["entropy:max"]["all"] == 1.0  # every aggregate is scored
    assert head["response_length"]["auroc"]["value"] == 0.5  # all answers are 6 tokens
    assert records[0]["values"]["entropy"] and records[0]["tokens"][0] == "t0"


def test_interrupted_detection_run_resumes_without_regenerating(tmp_path):
    items = _items(12)
    first = ScriptedBackend(items, fail_after=8)  # dies on its second batch of 8
    with pytest.raises(RuntimeError, match="interrupted"):
        detection.run_detection(
            items, first, out=tmp_path, signals="entropy", n_resamples=20, progress=False
        )
    saved = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(saved) == 8
    again = ScriptedBackend(items)
    result = detection.run_detection(
        items, again, out=tmp_path, signals="entropy", n_resamples=20, progress=False
    )
    assert again.calls == [item.prompt for item in items[8:]]  # only the missing ones
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert lines[:8] == saved and len(lines) == 12  # nothing lost, nothing redone
    assert [r["key"] for r in result.records] == [i.key for i in items]
    # --limit then the full run: the first items are not generated again
    small = tmp_path / "limit"
    detection.run_detection(
        items[:4],
        ScriptedBackend(items),
        out=small,
        signals="entropy",
        n_resamples=20,
        progress=False,
    )
    full = ScriptedBackend(items)
    detection.run_detection(
        items, full, out=small, signals="entropy", n_resamples=20, progress=False
    )
    assert full.calls == [item.prompt for item in items[4:]]
    with pytest.raises(ValueError, match="another configuration"):
        detection.run_detection(
            items, full, out=small, signals="entropy", max_new_tokens=5, progress=False
        )
    changed = [data.Item(i.dataset, i.id, i.question, "0", i.grader, i.prompt) for i in items]
    with pytest.raises(ValueError, match="differs"):
        detection.run_detection(changed, full, out=small, signals="entropy", progress=False)


def test_scaling_methods_on_a_scripted_run(tmp_path):
    items = _items(6)
    backend = ScriptedBackend(items)
    result = scaling.run_scaling(
        items,
        backend,
        out=tmp_path,
        ns=[1, 2, 4],
        **SCALE,
    )
    s = result.summary
    assert len(result.records[0]["candidates"]) == 4
    assert len(backend.calls) == 12  # 6 prompts sampled once (N_max) + 6 greedy
    methods = s["methods"]
    # candidate j of item i is right unless (i + j) % 3 == 0; confident when right
    for n in ("1", "2", "4"):
        for rows in methods.values():
            assert 0 <= rows[n]["accuracy"]["value"] <= 1
        assert (
            methods["oracle"][n]["accuracy"]["value"] >= methods["majority"][n]["accuracy"]["value"]
        )
    # a confident candidate is always right, so selecting by deepconf is perfect from N = 2
    assert methods["best-of-N deepconf:deepconf_lowest_group"]["4"]["accuracy"]["value"] == 1.0
    assert methods["greedy"]["1"]["accuracy"]["value"] == pytest.approx(4 / 6)
    assert methods["majority"]["4"]["tokens"] == pytest.approx(
        np.mean([sum(c["n_tokens"] for c in r["candidates"]) for r in result.records])
    )
    assert s["primary"] == ["greedy", "majority", "deepconf-offline-vote"]


def test_recipe_methods_follow_the_recipes():
    methods = {
        m.name: m for m in scaling_methods.recipe_methods(["tokur-best-of-n", "deepconf-online"])
    }
    tokur = methods["tokur-best-of-n"]
    assert (tokur.score, tokur.reducer, tokur.higher_is_better, tokur.method) == (
        "tokur_epistemic",
        "mean",
        False,
        "argmax",
    )
    assert "best-of-N tokur_epistemic:mean" not in methods  # equal to the recipe
    online = methods["deepconf-online"]
    assert (online.kind, online.warmup, online.keep, online.window) == (
        "deepconf-online",
        4,
        90.0,
        16,
    )
    with pytest.raises(ValueError, match="sweeps"):
        scaling_methods.recipe_methods(["logtoku-abstain"])
    with pytest.raises(ValueError, match="temperature"):
        scaling_methods.recipes_temperature(
            [
                "deepconf-online",
                {
                    "name": "hot",
                    "action": {"type": "best-of-n", "score": "entropy", "temperature": 1.3},
                },
            ]
        )


def test_deepconf_online_simulation_cuts_where_the_online_stop_would():
    """Two warm-up traces set the threshold; of two later ones, the one whose window
    confidence dips below it is cut at the first such token and leaves the vote."""
    window = 2
    method = scaling_methods.Method(
        "dc",
        "deepconf-online",
        "deepconf",
        "deepconf_lowest_group",
        method="majority",
        warmup=2,
        keep=50.0,
        window=window,
    )

    def cand(values, answer, correct):
        return {
            "values": {"deepconf": values},
            "n_tokens": len(values),
            "prediction": answer,
            "correct": correct,
            "scores": {},
        }

    cands = [
        cand([5.0, 5.0, 5.0, 5.0], "a", True),  # warm-up, lowest group 5
        cand([4.0, 4.0, 4.0], "a", True),  # warm-up, lowest group 4 -> threshold 4.5
        cand([5.0, 5.0, 1.0, 1.0, 1.0, 1.0], "b", False),  # window mean 3 < 4.5 at step 2
        cand([6.0, 6.0, 6.0], "b", False),  # never below: votes
    ]
    conf = scaling_simulation._confidences(cands, method)
    correct, tokens = scaling_simulation._deepconf_online(
        cands, conf, np.array([[0, 1, 2, 3]]), method
    )
    # votes: a, a, b -> "a" (right); tokens: 4 + 3 + (cut after step 2: 3) + 3
    assert correct.tolist() == [1.0] and tokens.tolist() == [13.0]
    # the same cut as the policy's calibrated trigger computes on the traces
    from tokur_decode.core.policy import Trigger, calibrate_from_traces

    warm = Trace(
        {"deepconf": torch.tensor([[5.0, 5, 5, 5], [4, 4, 4, 0]])},
        torch.zeros(2, 4, dtype=torch.long),
        torch.tensor([4, 3]),
    )
    base = Trigger("deepconf", direction="below", window=window, min_tokens=window)
    assert calibrate_from_traces(base, warm, 50).threshold == 4.5
    # with N <= warmup nothing is cut: the plain vote of all
    correct, tokens = scaling_simulation._deepconf_online(cands, conf, np.array([[2, 3]]), method)
    assert correct.tolist() == [0.0] and tokens.tolist() == [9.0]


def test_reports_write_every_file(tmp_path):
    items = _items(9)
    backend = ScriptedBackend(items)
    res = detection.run_detection(
        items, backend, out=tmp_path / "d", signals="entropy", n_resamples=20, progress=False
    )
    for r in res.records:  # a backend with verbalized confidence: one more score, no runner change
        r["extra"]["verbalized_confidence"] = 0.9 if r["correct"] else 0.3
    summary = detection.summarize(res.records, n_resamples=20)
    assert summary["ece"]["verbalized_confidence"]["value"] == pytest.approx(
        (6 * 0.1 + 3 * 0.3) / 9
    )
    assert any(h["score"] == "verbalized_confidence" for h in summary["headline"])
    files = report.write_detection(tmp_path / "d", res.records, summary, "tokur-decode eval ...")
    names = {f.name for f in files}
    assert names == {
        "metrics.json",
        "report.md",
        "roc.png",
        "risk_coverage.png",
        "heatmap.png",
        "reliability.png",
    }
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    text = (tmp_path / "d" / "report.md").read_text()
    assert "tokur-decode eval ..." in text and "verbalized_confidence" in text
    json.loads((tmp_path / "d" / "metrics.json").read_text())  # strict JSON (no NaN)


@pytest.mark.slow
def test_end_to_end_on_the_embedded_model_through_the_cli(embedded, tmp_path, monkeypatch, capsys):
    from tokur_decode import cli

    monkeypatch.setattr(cli, "load", lambda args: embedded)
    calls = []
    original = HFBackend.decode
    monkeypatch.setattr(
        HFBackend,
        "decode",
        lambda self, prompts, request: (
            calls.append(list(prompts)) or original(self, prompts, request)
        ),
    )
    common = [
        "--data",
        "tasks:capitals,tasks:arithmetic",
        "--max-new-tokens",
        "8",
        "--bootstrap",
        "30",
        "--no-progress",
    ]
    out = tmp_path / "detect"
    assert cli.main(["eval", *common, "--limit", "1", "--out", str(out)]) == 0
    first = (out / "results.jsonl").read_text().splitlines()
    assert cli.main(["eval", *common, "--limit", "3", "--out", str(out)]) == 0
    assert len(calls) == 2 and len(calls[0]) == 2 and len(calls[1]) == 4  # resumed
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[:2] == first and len(lines) == 6
    for name in ("metrics.json", "report.md", "roc.png", "risk_coverage.png", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["datasets"]["all"]["accuracy"]["value"] <= 1
    scores = {h["score"] for h in metrics["headline"]}
    assert {
        "chosen_logprob:mean",
        "tokur_epistemic:sum",
        "logtoku_unreliability:topk_mean",
    } <= scores
    record = json.loads(lines[0])
    assert len(record["tokens"]) == record["n_tokens"] == len(record["values"]["tokur_total"])
    if 0 < sum(json.loads(x)["correct"] for x in lines) < 6:
        assert all(math.isfinite(v["all"]) for v in metrics["auroc"].values())
    assert "Wrong-answer detection" in capsys.readouterr().out

    out = tmp_path / "scale"
    assert (
        cli.main(
            ["scale", *common, "--limit", "1", "--n", "1,2", "--repeats", "3", "--out", str(out)]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for method in (
        "greedy",
        "majority",
        "tokur-best-of-n",
        "deepconf-online",
        "self-certainty-best-of-n",
    ):
        assert 0 <= metrics["methods"][method]["2"]["accuracy"]["value"] <= 1
    assert metrics["methods"]["majority"]["2"]["tokens"] > 0
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    assert len(record["candidates"]) == 2 and "tokur_epistemic" in record["candidates"][0]["values"]
    for name in ("accuracy_vs_n.png", "accuracy_vs_tokens.png", "report.md"):
        assert (out / name).stat().st_size > 0


class VerbalizingBackend(ScriptedBackend):
    """The scripted answers with a stated confidence: high when right, low when wrong,
    missing for every fourth response (as an unavailable expected confidence would be)."""

    def decode(self, prompts, request):
        out = super().decode(prompts, request)
        out.scores = [  # j: the response's number among its prompt's
            {}
            if j % request.n % 4 == 3
            else {"verbalized_confidence": 0.9 if "-1" not in text else 0.2}
            for j, text in enumerate(out.texts)
        ]
        return out


def test_extra_scores_are_selectable_and_calibrated(tmp_path):
    items = _items(6)
    result = scaling.run_scaling(
        items,
        VerbalizingBackend(items),
        out=tmp_path / "scale",
        ns=[1, 4],
        **SCALE,
    )
    methods = result.summary["methods"]
    names = [m.name for m in scaling_methods.extra_methods(["verbalized_confidence"])]
    assert set(names) <= set(methods)
    # At N = 4 every item has a right candidate with its confidence stated (j = 0..2),
    # and candidates without one rank last: the argmax is always right.
    assert methods["best-of-N verbalized_confidence"]["4"]["accuracy"]["value"] == 1.0
    assert methods["best-of-N verbalized_confidence"]["1"]["accuracy"]["value"] < 1.0

    detected = detection.run_detection(
        items, VerbalizingBackend(items), out=tmp_path / "eval", signals="entropy",
        n_resamples=30, progress=False,
    )  # fmt: skip
    # Item i's greedy answer is right unless i % 3 == 0, and j = 0 states a confidence.
    correct = [r["correct"] for r in detected.records]
    stated = [0.9 if c else 0.2 for c in correct]
    expected_ece = metrics.ece(correct, stated)
    assert detected.summary["ece"]["verbalized_confidence"]["value"] == pytest.approx(expected_ece)
    assert detected.summary["auroc"]["verbalized_confidence"]["all"] == 1.0


def test_a_run_folder_is_refused_for_other_data_or_when_unwritable(tmp_path):
    items = _items(6)
    run = dict(signals="entropy", n_resamples=10, progress=False)
    detection.run_detection(items, ScriptedBackend(items), out=tmp_path / "d", **run)
    other = data.load("tasks:legs", limit=6)
    with pytest.raises(ValueError, match=r"out: .* another configuration.*data: "):
        detection.run_detection(other, ScriptedBackend(other), out=tmp_path / "d", **run)
    detection.run_detection(items, ScriptedBackend(items), out=tmp_path / "d", **run)  # control
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="out: cannot write to"):
        detection.run_detection(items, ScriptedBackend(items), out=blocker / "d", **run)


def test_one_class_runs_say_why_detection_is_undefined_and_intervals_show_progress(
    tmp_path, capsys
):
    items = [i for i in _items(12) if int(i.id) % 3 != 0]  # the scripted backend: all right
    run = dict(out=tmp_path, signals="entropy", n_resamples=10, progress=False)
    res = detection.run_detection(items, ScriptedBackend(items), **run)
    assert res.summary["one_class"] == (
        "every answer is right: detection metrics (AUROC, ...) are undefined"
    )
    files = report.write_detection(tmp_path, res.records, res.summary, "tokur-decode eval")
    assert "n/a below: every answer is right" in (tmp_path / "report.md").read_text()
    assert files
    mixed = detection.summarize(_scripted_records(), n_resamples=10, progress=True)
    assert mixed["one_class"] is None  # control: both classes
    assert "bootstrap intervals" in capsys.readouterr().err


def _scripted_records():
    items = _items(6)
    return [
        detection.record(item, gen)
        for item, gen in zip(
            items,
            ScriptedBackend(items).generate([i.prompt for i in items], signals=["entropy"]),
            strict=True,
        )
    ]
