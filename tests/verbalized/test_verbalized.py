"""Verbalized confidence on the real embedded model with real Outlines: the constrained
format always parses, abstention, answer spans, the mask order, the expected confidence
against float64 recomputation, calibration metrics, the combination, errors, the CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from tokur_decode.cli import main
from tokur_decode.core.text import encode_prompts
from tokur_decode.verbalized import (
    CAPITALS,
    SCORES,
    ask,
    build_prompt,
    combined_confidence,
    expected_calibration_error,
    format_regex,
    is_abstention,
    is_correct,
    parse_response,
    reliability_diagram,
    select_best,
    validate_template,
)
from tokur_decode.verbalized.format import char_span_to_tokens, token_offsets

MIXED = [
    "What is 17 times 23?",
    "Write a long poem about the sea.",
    "Who painted the Mona Lisa?",
    "Describe your favourite colour in detail.",
]
SEEDS = (0, 1, 2)
ABSTAIN_TEMPLATE = (
    "Provide your best answer to the question and a confidence score in percent (0 to 100) "
    "that the answer is correct. Reply in exactly this format:\nAnswer: <short answer>\n"
    "Confidence: <number>\nIf you cannot provide an answer, answer with `NO ANSWER`.\n\n"
    "Example:\nQuestion: What is my name?\nAnswer: NO ANSWER\nConfidence: 0\n\n"
    "Question: {question}"
)


@pytest.fixture(scope="module")
def capitals(embedded):
    """Greedy, constrained answers to the built-in capitals set (expected confidence on)."""
    model, tok = embedded
    return ask(model, tok, [q for q, _ in CAPITALS])


@pytest.fixture(scope="module")
def sampled(embedded):
    """Sampled (T = 1) constrained answers to mixed questions, three seeds, 40 characters."""
    model, tok = embedded
    return {
        seed: ask(
            model, tok, MIXED, temperature=1.0, seed=seed, max_answer_chars=40, expected=False
        )
        for seed in SEEDS
    }


def _assert_parses(r, tok, max_answer_chars: int) -> None:
    assert r.parse_error is None, r.text
    assert re.fullmatch(format_regex(max_answer_chars), r.text), r.text
    assert r.answer == r.text.split("\n")[0].removeprefix("Answer: ").strip()
    assert 0 < len(r.answer) <= max_answer_chars
    assert r.confidence == int(r.text.rsplit(" ", 1)[1]) / 100
    ids = r.trace.token_ids[0].tolist()
    assert ids[-1] == tok.eos_token_id, "ended by the budget, not by EOS"
    assert tok.decode(ids, skip_special_tokens=True) == r.text


def _assert_spans(r, tok) -> None:
    """The answer span decodes to the answer (after the format's space when the first
    token carries it); the format tokens and the digits lie outside it."""
    ids = r.trace.token_ids[0].tolist()
    a, c = r.answer_span, r.confidence_span
    before, answer = tok.decode(ids[: a.start]), tok.decode(ids[a.start : a.stop])
    assert (before, answer) in (("Answer:", " " + r.answer), ("Answer: ", r.answer)), r.text
    assert tok.decode(ids[a.stop : c.start]) == "\nConfidence: "
    assert tok.decode(ids[c.start : c.stop]) == str(round(r.confidence * 100))
    assert ids[c.stop :] == [tok.eos_token_id]


# ------------------------------------------------------------------ the constraint


@pytest.mark.slow
def test_constrained_output_always_parses_greedy_and_sampled(embedded, capitals, sampled):
    model, tok = embedded
    for r in capitals:
        _assert_parses(r, tok, 100)
    for results in sampled.values():
        for r in results:
            _assert_parses(r, tok, 40)
    texts = {seed: tuple(r.text for r in results) for seed, results in sampled.items()}
    assert len(set(texts.values())) > 1, "the seeds did not sample different answers"
    tight = ask(model, tok, MIXED[:2], max_answer_chars=3, expected=False)
    for r in tight:
        _assert_parses(r, tok, 3)


@pytest.mark.slow
def test_answer_span_decodes_back_to_the_answer(embedded, capitals, sampled):
    _, tok = embedded
    for r in [*capitals, *sampled[0]]:
        _assert_spans(r, tok)


def test_spans_from_character_offsets():
    class Chars:  # a tokenizer whose tokens are the characters "ab", "c", "de"
        pieces = ["ab", "c", "de"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    offsets = token_offsets(Chars(), [0, 1, 2])
    assert offsets == [(0, 2), (2, 3), (3, 5)]
    assert char_span_to_tokens(offsets, 1, 3) == range(0, 2)
    assert char_span_to_tokens(offsets, 3, 4) == range(2, 3)
    assert char_span_to_tokens(offsets, 5, 5) == range(0)


# ------------------------------------------------------------------ abstention


@pytest.mark.slow
def test_no_answer_is_detected_as_abstention(embedded, capitals):
    model, tok = embedded
    r = ask(
        model, tok, "What did I eat for breakfast yesterday?", template=ABSTAIN_TEMPLATE,
        expected=False,
    )  # fmt: skip
    assert r.parse_error is None
    assert r.answer.lower() == "no answer" and r.abstained
    assert not any(c.abstained for c in capitals)


def test_abstention_parser():
    for text in ("NO ANSWER", "no answer", "`NO ANSWER`", "No answer.", '"NO ANSWER"'):
        assert is_abstention(text), text
    for text in ("No answer found.", "Paris", "", None, "NO ANSWERS"):
        assert not is_abstention(text), text
    parsed = parse_response("Answer: NO ANSWER\nConfidence: 0")
    assert parsed.answer == "NO ANSWER" and parsed.confidence == 0.0


# ------------------------------------------------------------------ mask order


@pytest.mark.slow
def test_mask_order_is_recorded_and_decides_what_is_measured(embedded):
    model, tok = embedded
    question = "What is the capital of Japan?"
    raw = ask(model, tok, question, expected=False)
    masked = ask(model, tok, question, mask_order="mask-first", expected=False)
    assert raw.text == masked.text  # greedy: the mask decides, wherever the monitor sits
    assert raw.trace.meta["mask_order"] == "monitor-first"
    assert masked.trace.meta["mask_order"] == "mask-first"
    assert "raw" in raw.trace.meta["measured_on"] and "after" in masked.trace.meta["measured_on"]
    assert raw.trace.meta["constrained"] and raw.trace.meta["format"] == format_regex(100)

    # monitor-first: the model's raw distribution, recomputed by one teacher-forced forward.
    ids = raw.trace.token_ids[0]
    prompt = encode_prompts(tok, [build_prompt(question)])["input_ids"][0]
    with torch.no_grad():
        logits = model(torch.cat([prompt, ids[:-1]])[None]).logits[0, len(prompt) - 1 :]
    lp = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    chosen = lp.gather(-1, ids[:, None])[:, 0].exp()
    torch.testing.assert_close(raw.trace.signals["entropy"][0].double(), entropy, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        raw.trace.signals["chosen_prob"][0].double(), chosen, atol=1e-4, rtol=0
    )
    # mask-first: renormalised over the allowed tokens, so the chosen token's probability
    # never drops, and where one token is allowed (':' after 'Confidence') it is certain.
    assert torch.all(masked.trace.signals["chosen_prob"][0] >= raw.trace.signals["chosen_prob"][0])
    colon = raw.confidence_span.start - 2
    assert tok.decode(ids[colon - 1 : colon + 1]) == "idence:"
    assert masked.trace.signals["max_prob"][0, colon] == 1.0
    assert masked.trace.signals["entropy"][0, colon] == 0.0
    assert raw.trace.signals["max_prob"][0, colon] < 1.0


# ------------------------------------------------------------------ expected confidence


def _allowed(number: str) -> list[str]:
    """What the format allows after the digits ``number`` ("$" = EOS), from the regex
    ``(100|[1-9]?[0-9])`` read by hand."""
    digits = [str(d) for d in range(10)]
    if number == "":
        return digits
    if number == "10":
        return ["0", "$"]
    if number == "0" or len(number) >= 2:
        return ["$"]
    return [*digits, "$"]


@pytest.mark.slow
def test_expected_confidence_matches_float64_recomputation(embedded, capitals):
    model, tok = embedded
    for r in capitals:
        dist = r.confidence_distribution
        assert dist.shape == (101,) and math.isclose(dist.sum(), 1.0, rel_tol=1e-12)
        assert math.isclose(np.exp(r.confidence_logprobs).sum(), 1.0, rel_tol=1e-9)
        assert 0.0 <= r.expected_confidence <= 1.0
    # The constrained decoder's law, recomputed per number from teacher-forced float64
    # distributions renormalised over what the regex allows at each position.
    r = capitals[0]
    ids = r.trace.token_ids[0].tolist()
    prompt = encode_prompts(tok, [build_prompt(r.question)])["input_ids"][0].tolist()
    prefix = prompt + ids[: r.confidence_span.start]

    def token(ch: str) -> int:
        return tok.eos_token_id if ch == "$" else tok.convert_tokens_to_ids(ch)

    stated = round(r.confidence * 100)
    for n in sorted({0, 7, 10, 42, 99, 100, stated}):
        text = f"{n}$"
        with torch.no_grad():
            logits = model(torch.tensor([prefix + [token(ch) for ch in text[:-1]]])).logits
        lp = torch.log_softmax(logits[0, len(prefix) - 1 :].double(), dim=-1)
        reference = sum(
            float(lp[j, token(ch)] - lp[j, [token(a) for a in _allowed(text[:j])]].logsumexp(0))
            for j, ch in enumerate(text)
        )
        assert r.confidence_logprobs[n] == pytest.approx(reference, abs=1e-3), n
    p = np.exp(r.confidence_logprobs - r.confidence_logprobs.max())
    p /= p.sum()
    assert r.expected_confidence == pytest.approx(float(p @ np.arange(101)) / 100, abs=1e-12)


# ------------------------------------------------------------------ calibration


def test_ece_and_reliability_diagram_hand_computed():
    conf = [0.1, 0.1, 0.55, 0.9, 1.0]
    correct = [False, True, False, True, True]
    # bins of width 0.1: bin 1 {0.1, 0.1} gap 0.4; bin 5 {0.55} gap 0.55; bin 9 {0.9, 1.0} gap 0.05
    assert expected_calibration_error(conf, correct) == pytest.approx((0.8 + 0.55 + 0.1) / 5)
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.07)
    d = reliability_diagram(conf, correct)
    assert d.count.tolist() == [0, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    assert d.accuracy[[1, 5, 9]].tolist() == [0.5, 0.0, 1.0]
    assert d.mean_confidence[[1, 5, 9]] == pytest.approx([0.1, 0.55, 0.95])
    assert np.isnan(d.accuracy[0]) and np.isnan(d.mean_confidence[0])
    assert d.edges == pytest.approx(np.linspace(0, 1, 11))
    for bad, name in (
        (dict(n_bins=0), "n_bins"),
        (dict(correct=[True]), "correct"),
        (dict(confidences=[1.2] * 5), "confidences"),
        (dict(confidences=[math.nan] * 5), "confidences"),
        (dict(confidences=[], correct=[]), "confidences"),
        (dict(correct=[2] * 5), "correct"),
    ):
        args = {"confidences": conf, "correct": correct, **bad}
        with pytest.raises(ValueError, match=name):
            expected_calibration_error(**args)


@pytest.mark.slow
def test_calibration_on_the_builtin_capitals(capitals):
    from sklearn.calibration import calibration_curve

    correct = [is_correct(r.answer, gold) for r, (_, gold) in zip(capitals, CAPITALS, strict=True)]
    assert sum(correct) >= 5, [r.answer for r in capitals]  # Paris, Tokyo, Rome, Berlin, Cairo
    for key in ("verbalized", "expected_verbalized", "combined"):
        conf = [r.scores[key] for r in capitals]
        ece = expected_calibration_error(conf, correct)
        # An independent plain-Python ECE with the documented binning.
        bins: dict[int, list] = {}
        for c, y in zip(conf, correct, strict=True):
            bins.setdefault(min(int(c * 10), 9), []).append((c, y))
        by_hand = sum(
            len(m) * abs(sum(y for _, y in m) / len(m) - sum(c for c, _ in m) / len(m))
            for m in bins.values()
        ) / len(conf)
        assert ece == pytest.approx(by_hand, abs=1e-12)
        d = reliability_diagram(conf, correct)
        assert d.count.sum() == len(CAPITALS)
        true, pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
        full = d.count > 0
        assert d.accuracy[full] == pytest.approx(true) and d.mean_confidence[full] == pytest.approx(
            pred
        )


# ------------------------------------------------------------------ scores, combination


@pytest.mark.slow
def test_scores_and_combined_confidence(capitals, sampled):
    for r in capitals:
        assert set(r.scores) == set(SCORES)
        span = r.answer_span
        logprob = r.trace.signals["chosen_logprob"][0, span.start : span.stop].double().mean()
        max_prob = r.trace.signals["max_prob"][0, span.start : span.stop].double().mean()
        assert r.scores["answer_mean_logprob"] == pytest.approx(float(logprob), abs=1e-6)
        assert r.scores["answer_mean_max_prob"] == pytest.approx(float(max_prob), abs=1e-6)
        geomean = math.exp(float(logprob))
        assert r.scores["combined"] == pytest.approx(
            math.sqrt(r.expected_confidence * geomean), rel=1e-5
        )
        assert combined_confidence(r, weight=1.0) == pytest.approx(r.expected_confidence)
        assert combined_confidence(r, weight=0.0) == pytest.approx(geomean, rel=1e-5)
        assert combined_confidence(r, verbalized="stated", weight=1.0) == r.confidence
        assert 0.0 < r.scores["combined"] <= 1.0
    # best-of-N over one question's sampled candidates (no expected confidence: NaN combined)
    candidates = [results[2] for results in sampled.values()]
    best = select_best(candidates, "answer_geomean_prob")
    values = [c.scores["answer_geomean_prob"] for c in candidates]
    assert best == int(np.argmax(values))
    assert select_best(candidates, "answer_mean_entropy") == int(
        np.argmin([c.scores["answer_mean_entropy"] for c in candidates])
    )
    with pytest.raises(ValueError, match="results"):
        select_best(candidates, "combined")
    r = capitals[0]
    for bad, name in ((dict(weight=2), "weight"), (dict(verbalized="x"), "verbalized")):
        with pytest.raises(ValueError, match=name):
            combined_confidence(r, **bad)
    with pytest.raises(ValueError, match="token"):
        combined_confidence(r, token="margin")
    with pytest.raises(ValueError, match="score"):
        select_best(capitals, "nope")


# ------------------------------------------------------------------ errors, unconstrained


def test_template_validation():
    assert validate_template("Q: {question} {{literal}}") == "Q: {question} {{literal}}"
    for template, message in (
        ("no placeholder", "needs a {question}"),
        ("{question} {answer}", "only {question}"),
        ("{question} {}", "only {question}"),
        ("{question", "not a valid format string"),
        (42, "must be a str"),
    ):
        with pytest.raises(ValueError, match="template") as info:
            validate_template(template)
        assert message in str(info.value)


@pytest.mark.slow
def test_invalid_parameters_raise_naming_them(embedded):
    model, tok = embedded
    q = "What is the capital of France?"
    for kwargs, name in (
        (dict(template="Tell me"), "template"),
        (dict(mask_order="after"), "mask_order"),
        (dict(max_answer_chars=0), "max_answer_chars"),
        (dict(max_answer_chars=100_000), "max_answer_chars: from 1 to 1000"),  # was 19 GB
        (dict(max_new_tokens=10), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(signals=["tokur"]), "signals"),
    ):
        with pytest.raises(ValueError, match=name):
            ask(model, tok, q, **kwargs)
    with pytest.raises(ValueError, match="questions"):
        ask(model, tok, [])
    with pytest.raises(ValueError, match="questions: each question must be a string"):
        ask(model, tok, [q, None])
    with pytest.raises(ValueError, match="question"):
        ask(model, tok, [q, "  "])


@pytest.mark.slow
def test_unconstrained_parse_failure_is_reported_not_raised(embedded):
    model, tok = embedded
    r = ask(
        model, tok, "What is the capital of France?", template="{question}", constrained=False,
        max_new_tokens=12,
    )  # fmt: skip
    assert r.parse_error == "no 'Answer: ...' line followed by 'Confidence: <number>'"
    assert r.answer is None and r.confidence is None and not r.abstained
    assert r.expected_confidence is None and r.answer_span == range(0)
    assert math.isnan(r.scores["combined"]) and math.isnan(r.scores["answer_mean_logprob"])
    assert "Paris" in r.text and len(r.trace.tokens[0]) > 0
    assert r.trace.meta["constrained"] is False and r.trace.meta["mask_order"] is None


def test_parser_is_lenient_and_reports_failures():
    parsed = parse_response("Sure!\nanswer:  Paris \n\nCONFIDENCE: 87.5 %")
    assert (parsed.answer, parsed.confidence) == ("Paris", 0.875)
    text = "Answer: Rome\nConfidence: 90"
    parsed = parse_response(text)
    assert text[slice(*parsed.answer_chars)] == "Rome"
    assert text[slice(*parsed.confidence_chars)] == "90"
    assert parse_response("Answer:  \nConfidence: 50").error == "empty answer"
    assert parse_response("Answer: x\nConfidence: 150").error == "confidence 150 is outside 0..100"
    assert parse_response("Answer: x").answer is None


# ------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_generate_verbalized(capsys, monkeypatch, embedded):
    question = "What is the capital of France?"
    assert main(["generate", "--verbalized", "--json", question]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answer"] == "Paris" and report["parse_error"] is None
    assert 0 <= report["confidence"] <= 1 and 0 <= report["expected_confidence"] <= 1
    assert report["abstained"] is False and report["meta"]["mask_order"] == "monitor-first"
    start, stop = report["answer_span"]
    assert "".join(t["token"] for t in report["tokens"][start:stop]).strip() == "Paris"
    assert set(report["scores"]) == set(SCORES)

    monkeypatch.setenv("COLUMNS", "200")
    assert main(["generate", "--verbalized", "--mask-order", "mask-first", question]) == 0
    out = capsys.readouterr().out
    for text in ("Confidence:", "expected_confidence", "abstained", "mask-first", "p(token)"):
        assert text in out, text
    assert main(["generate", "--verbalized", "--strategy", "monitor", question]) == 2
    assert "--strategy" in capsys.readouterr().err
