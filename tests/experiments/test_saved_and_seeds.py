"""Scoring saved generations equals what generation recorded, and TokUR's multi-seed
evaluation equals a hand computation (the real embedded model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score

from tokur_decode.experiments import data, detection  # noqa: E402
from tokur_decode.experiments.saved import load_generations, run_scoring  # noqa: E402
from tokur_decode.experiments.scoring import uncertainty  # noqa: E402
from tokur_decode.hf import HFBackend  # noqa: E402

pytestmark = pytest.mark.slow

SIGNALS = "entropy,chosen_prob,logtoku,deepconf,tokur"
TOKUR = {"samples": 4, "sigma": 0.1, "rank": 8, "seed": 96}


def _backend(embedded, **tokur) -> HFBackend:
    model, tok = embedded
    return HFBackend(model, tok, model_name="embedded", batch_size=4, tokur={**TOKUR, **tokur})


def _score(embedded, path, out):
    """``score`` of the saved generations at ``path`` into ``out``."""
    run = dict(signals=SIGNALS, batch_size=4, n_resamples=20, progress=False)
    return run_scoring(load_generations(path), _backend(embedded), out=out, **run)


def _eval(embedded, tmp_path, items, **kw):
    return detection.run_detection(
        items,
        _backend(embedded),
        out=tmp_path,
        signals=SIGNALS,
        max_new_tokens=16,
        batch_size=4,
        n_resamples=20,
        progress=False,
        **kw,
    )


def _generations(path, records, ids=True):
    lines = []
    for r in records:
        line = {"id": r["id"], "prompt": r["prompt"], "response": r["response"]}
        line["correct"] = r["correct"]
        if ids:
            line["token_ids"] = r["token_ids"][: r["n_tokens"]]
        lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scoring_saved_generations_equals_the_values_recorded_while_generating(embedded, tmp_path):
    items = data.load("tasks:arithmetic", limit=4)
    generated = _eval(embedded, tmp_path / "eval", items)
    path = _generations(tmp_path / "gens.jsonl", generated.records)
    scored = _score(embedded, path, tmp_path / "scored")
    for a, b in zip(generated.records, scored.records, strict=True):
        assert b["tokens"] == a["tokens"] and b["n_tokens"] == a["n_tokens"]
        assert b["correct"] == a["correct"] and b["response"] == a["response"]
        for name, values in a["values"].items():
            torch.testing.assert_close(
                torch.tensor(b["values"][name]), torch.tensor(values), atol=1e-4, rtol=1e-4
            )
    assert scored.summary["n"] == 4  # graded: the report's summary is there
    # Text only (no ids): its tokens, the saved EOS not among them, score the same.
    text_only = _score(
        embedded,
        _generations(tmp_path / "text.jsonl", generated.records, ids=False),
        tmp_path / "text",
    )
    for a, b in zip(generated.records, text_only.records, strict=True):
        n = b["n_tokens"]
        assert b["tokens"] == a["tokens"][:n] and n >= a["n_tokens"] - 1
        for name in ("entropy", "logtoku_epistemic", "tokur_epistemic"):
            torch.testing.assert_close(
                torch.tensor(b["values"][name]),
                torch.tensor(a["values"][name][:n]),
                atol=1e-4,
                rtol=1e-4,
            )
    # The control: another noise seed gives other TokUR values (the check can fail).
    other = run_scoring(
        load_generations(path),
        _backend(embedded, seed=5),
        out=tmp_path / "other",
        signals="tokur",
        batch_size=4,
        progress=False,
        n_resamples=20,
    )
    a, b = generated.records[0]["values"], other.records[0]["values"]
    assert not np.allclose(a["tokur_epistemic"], b["tokur_epistemic"], atol=1e-4)


def test_ungraded_generations_are_scored_without_metrics(embedded, tmp_path):
    path = tmp_path / "gens.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour.", "response": "Blue."}) + "\n")
    result = run_scoring(
        load_generations(path),
        _backend(embedded),
        out=tmp_path / "out",
        signals="entropy",
        progress=False,
    )
    (rec,) = result.records
    assert rec["correct"] is None and result.summary == {}
    n = len(embedded[1]("Blue.", add_special_tokens=False).input_ids)  # no EOS appended
    assert len(rec["values"]["entropy"]) == rec["n_tokens"] == n
    for bad, message in [
        ('{"response": "x"}', "no prompt"),
        ('{"prompt": "x"}', "no response"),
        ('{"prompt": "x", "response": "y", "correct": 1}', "correct"),
        (  # a label the gold answer contradicts (it used to win silently)
            '{"prompt": "2+2?", "response": "4", "answer": "4", "correct": false}',
            r"gens\.jsonl:1: correct: false, but the numeric grader finds the response right",
        ),
    ]:
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=message):
            load_generations(path)
    path.write_text('{"prompt": "2+2?", "response": "4", "answer": "4", "correct": true}\n')
    assert load_generations(path)[0].correct is True  # the control: they agree


def test_token_ids_must_decode_to_the_response(embedded, tmp_path):
    """The ids are scored and the text graded: ids of another text (or none for a
    non-empty response) are refused before anything is scored."""
    tok = embedded[1]
    path = tmp_path / "gens.jsonl"
    for ids, response in [(tok("Paris", add_special_tokens=False).input_ids, "Lyon"), ([], "4")]:
        line = {"prompt": "Capital of France?", "response": response, "token_ids": ids}
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=r"gens\.jsonl:1: token_ids decode to"):
            run_scoring(
                load_generations(path), _backend(embedded), out=tmp_path / "o", progress=False
            )
        assert not (tmp_path / "o" / "config.json").exists()  # nothing half-done
    ids = tok("Paris", add_special_tokens=False).input_ids + [tok.eos_token_id]
    line = {"prompt": "Capital of France?", "response": " Paris", "token_ids": ids}
    path.write_text(json.dumps(line) + "\n")  # the control: EOS and a space aside, equal
    run_scoring(
        load_generations(path),
        _backend(embedded),
        out=tmp_path / "o",
        signals="entropy",
        progress=False,
    )


def test_multi_seed_tokur_metrics_equal_a_hand_computation(embedded, tmp_path):
    items = data.load_many("tasks:arithmetic,tasks:capitals", limit=6)
    seeds = (96, 89, 64)
    result = _eval(embedded, tmp_path / "seeds", items, tokur_seeds=seeds)
    records = result.records
    assert all(list(r["tokur_seeds"]) == ["96", "89", "64"] for r in records)
    for r in records:  # the first seed is the generation's own measurement
        first = r["tokur_seeds"]["96"]
        assert first == {k: v for k, v in r["scores"].items() if k.startswith("tokur_")}
    name = "tokur_epistemic:sum"
    assert records[0]["tokur_seeds"]["89"][name] != records[0]["tokur_seeds"]["64"][name]
    wrong = np.array([not r["correct"] for r in records])
    assert 0 < wrong.sum() < len(records)
    by_hand = [
        roc_auc_score(wrong, [uncertainty(name, r["tokur_seeds"][str(s)][name]) for r in records])
        for s in seeds
    ]
    stats = result.summary["tokur_seeds"]["scores"][name]["auroc"]
    assert stats["per_seed"] == pytest.approx(by_hand)
    assert stats["mean"] == pytest.approx(np.mean(by_hand))
    assert stats["std"] == pytest.approx(np.std(by_hand))
    assert result.summary["tokur_seeds"]["seeds"] == list(seeds)
    with pytest.raises(ValueError, match="tokur_seeds"):
        _eval(embedded, tmp_path / "bad", items, tokur_seeds=(96,))
