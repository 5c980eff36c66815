"""The command line on the embedded model: JSON fields, the rich table, options, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokur_decode.cli import main

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_generate_json_carries_every_field(capsys, embedded):
    assert main(["generate", "--json", "--max-new-tokens", "24", QUESTION]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "Paris" in report["answer"]
    assert report["question"] == QUESTION
    for key in ("max_new_tokens", "temperature", "top_p", "seed", "chat"):
        assert key in report["settings"]
    used = report["settings"]  # what ran, not what was asked (temperature was null)
    assert (used["temperature"], used["top_p"], used["max_new_tokens"]) == (0.0, 1.0, 24)
    assert report["dtype"] == "float32"  # the model's, on CPU
    assert report["tokens"], "no tokens"
    for tok in report["tokens"]:
        for key in (
            "index",
            "token",
            "token_id",
            "chosen_prob",
            "entropy",
            "logtoku_aleatoric",
            "logtoku_epistemic",
            "logtoku_unreliability",
        ):
            assert key in tok, key
        assert 0 < tok["chosen_prob"] <= 1 and tok["logtoku_aleatoric"] >= 0
    for key in ("naive", "vanilla", "mean_entropy", "logtoku_topk_mean", "n_tokens"):
        assert key in report["summary"], key
    assert report["summary"]["n_tokens"] == len(report["tokens"])


@pytest.mark.slow
def test_generate_table_sampling_and_model_path(capsys, monkeypatch, embedded):
    from tokur_decode.models import default_model_path

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps headers on narrow terminals

    args = [
        "generate",
        "--model",
        str(default_model_path()),
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--max-new-tokens",
        "8",
        "--no-chat",
        "--signals",
        "all",
        QUESTION,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for header in ("p(token)", "entropy", "LogTokU", "naive", "vanilla", "deepconf"):
        assert header in out, header
    assert main(args) == 0
    assert capsys.readouterr().out == out  # same seed, same sampled answer


@pytest.mark.slow
def test_the_token_table_fits_80_columns_with_every_value_readable(capsys, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "80")
    args = ["generate", "--max-new-tokens", "6", "--signals", "all,tokur", QUESTION]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out  # nothing cut
    tables = out.split("Response-level scores")[0]
    values = re.findall(r"-?\d+\.\d{4}", tables)
    assert len(values) == len(report["tokens"]) * len(report["signals"])  # every cell
    assert "grows with the answer's length" in " ".join(out.split())  # naive explained


def test_printed_text_cannot_drive_the_terminal(capsys, monkeypatch):
    """A question with an OSC title sequence and a colour code, and rich markup: shown
    escaped, never sent raw (they set the terminal's title and colours); the JSON keeps
    the text as given (the control)."""
    from tokur_decode.cli.render import print_report

    monkeypatch.setenv("COLUMNS", "120")
    hostile = "Say hi\x1b]0;pwned\x07\x1b[31m [bold]x[/bold]"
    report = {"question": hostile, "answer": "hi\x1b[2J", "signals": [], "tokens": [],
              "actions": [], "summary": {"answer": "\x9b31m"}}  # fmt: skip
    print_report(report)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "\\x1b]0;pwned\\x07" in out and "[bold]x[/bold]" in out and "\\x1b[2J" in out


def test_bad_arguments_exit_with_a_clear_error(capsys, embedded):
    assert main(["generate", "--signals", "bogus", QUESTION]) == 2
    assert "signals" in capsys.readouterr().err
    assert main(["generate", "--max-new-tokens", "0", QUESTION]) == 2
    assert "argument --max-new-tokens: an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["generate", "--signals", "all,bogus", QUESTION]) == 2
    assert "unknown 'bogus'" in capsys.readouterr().err
    assert main(["generate", "--device", "tpu", QUESTION]) == 2
    assert "device: 'tpu'" in capsys.readouterr().err
    assert main(["generate", "--model", "/no/such/folder", QUESTION]) == 2
    assert "model: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [  # sizes no flag may ask for, refused when parsed (they ran out of memory or time)
        (["generate", "--verbalized", "--answer-chars", "100000", "q"], "from 1 to 1000"),
        (["generate", "--tokur-samples", "1000000", "q"], "--tokur-samples: an integer from 1"),
        (["generate", "--seed", str(2**64), "q"], "--seed: an integer from 0 to 4294967295"),
        (["generate", "--kv-cache-gib", "nan", "q"], "--kv-cache-gib: a finite number > 0"),
        (["generate", "--kv-cache-gib", "-1", "q"], "--kv-cache-gib: a finite number > 0"),
        (["generate", "--topk", "-1", "q"], "--topk: an integer >= 1"),
        (["scale", "--data", "d", "--out", "o", "--n", "100000"], "--n: comma-separated"),
        (["scale", "--data", "d", "--out", "o", "--repeats", "0"], "--repeats: an integer from 1"),
        (["eval", "--data", "d", "--out", "o", "--bootstrap", "0"], "--bootstrap: an integer"),
        (["eval", "--data", "d", "--out", "o", "--tokur-seeds", ""], "--tokur-seeds: comma-sep"),
        # a negative list is the flag's value (argparse alone says "expected one argument")
        (["eval", "--data", "d", "--out", "o", "--tokur-seeds", "-1,2"], "from 0 to 4294967295"),
        (["score", "--data", "d", "--out", "o", "--bootstrap", "0"], "--bootstrap: an integer"),
        (["serve", "--dry-run", "--kv-cache-gib", "0"], "--kv-cache-gib: a finite number > 0"),
    ],
)
def test_sizes_are_bounded_when_parsed(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1  # argparse's usage block (19 lines) is not
    assert err.strip().endswith("--help lists the options)")  # printed, the way to it is


def test_console_script_help_documents_the_options():
    exe = [sys.executable, "-m", "tokur_decode.cli"]
    out = subprocess.run(
        [*exe, "generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--json",
        "--model",
        "--device",
        "--dtype",
        "--max-new-tokens",
        "--temperature",
        "--seed",
        "--chat",
        "--no-chat",
        "--trust-remote-code",
        "--signals",
    ):
        assert option in out, option
    top = subprocess.run([*exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in top and "bench" in top


def test_remote_code_is_not_trusted_by_default(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokur_decode import cli

    seen = {}

    def record(name, **kwargs):
        seen.setdefault(name, []).append(kwargs.get("trust_remote_code"))
        raise ValueError("stop here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda path, **kw: record("tok", **kw))
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda path, **kw: record("model", **kw)
    )
    # a name (not a missing folder, which is refused before any loading)
    assert cli.main(["generate", "--model", "some-model", "hi"]) == 2
    assert cli.main(["generate", "--model", "some-model", "--trust-remote-code", "hi"]) == 2
    assert seen["tok"] == [False, True]


def test_a_selection_says_which_way_it_chose():
    from tokur_decode.cli.render import _choice

    event = {"reducer": "mean", "score": "tokur_epistemic", "method": "argmax", "eta": 1.0}
    assert _choice({**event, "higher_is_better": False}) == "the lowest mean of tokur_epistemic"
    assert _choice({**event, "higher_is_better": True}) == "the highest mean of tokur_epistemic"
    vote = {**event, "method": "weighted", "eta": 0.9, "higher_is_better": True}
    assert _choice(vote) == "weighted vote by mean of tokur_epistemic, top 90% kept"


def test_an_unreachable_server_is_one_line(capsys):
    """eval against a port nobody listens on: one line naming the URL after the retries
    (it was an 84-line traceback)."""
    import socket

    pytest.importorskip("httpx")  # the server backend needs httpx (not vLLM)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    argv = ["eval", "--data", "tasks:capitals", "--limit", "1", "--backend", "openai"]
    argv += ["--base-url", f"http://127.0.0.1:{port}", "--no-progress"]
    assert main([*argv, "--out", "never-written"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach http://127.0.0.1:{port}" in err


def test_an_interrupt_says_the_run_resumes(capsys, monkeypatch):
    """Ctrl-C: a line saying the run resumes, status 130 (a 100-line traceback before)."""
    from tokur_decode.experiments import detection

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(detection, "run_detection", interrupted)
    assert main(["eval", "--data", "tasks:capitals", "--out", "o", "--no-progress"]) == 130
    assert "interrupted (a run folder keeps every finished item" in capsys.readouterr().err
