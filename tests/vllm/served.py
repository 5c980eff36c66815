"""A ``tokur-decode serve`` subprocess for the server tests, and small HTTP helpers."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from ..conftest import worker_core

#: Seconds a server may take to become healthy: a data-parallel TokUR server starts two
#: engines; alone it takes about 90 s here, beside another test worker's engine it once
#: took over 240 s (a wait, not a bound on what is measured).
STARTUP_TIMEOUT = 480
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(log_path, *vllm_args: str, port: int | None = None):
    """The base URL of ``tokur-decode serve`` (embedded model, float32, seed 0, eager,
    32-token KV blocks as ``plain_engine``'s, an API key) with ``vllm_args``, from a
    clean environment (no dev mode; a single engine on this xdist worker's core);
    stopped and waited for at the end. Yields ``(base_url, process)``."""
    port = port or free_port()
    command = [sys.executable, "-m", "tokur_decode.cli", "serve"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY]
    command += ["--enforce-eager", "--max-model-len", "1024", "--dtype", "float32", "--seed", "0"]
    command += ["--block-size", "32", *vllm_args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    if "--data-parallel-size" not in vllm_args:  # one core would not bind two engines
        env |= worker_core()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy in {STARTUP_TIMEOUT} s:\n{_tail(log_path)}")
            time.sleep(1)
        yield base, proc
    finally:
        stop(proc)


def stop(proc, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tail(path) -> str:
    return open(path, encoding="utf-8", errors="replace").read()[-3000:]


def post(base: str, path: str, body, *, key: str | None = API_KEY) -> tuple[int, dict]:
    """POST ``body`` (JSON, or raw bytes) with the API key; the status and the answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, data, headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def get(base: str, path: str, *, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def stream(base: str, path: str, body: dict) -> list[dict | str]:
    """POST a streaming request; its events (decoded JSON chunks, and ``"[DONE]"``)."""
    data = json.dumps({**body, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    req = urllib.request.Request(base + path, data, headers)
    with urllib.request.urlopen(req, timeout=300) as resp:
        text = resp.read().decode()
    events = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            payload = event.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
