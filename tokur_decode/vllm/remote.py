"""A server started with ``tokur-decode serve`` as a strategy-layer backend.

:class:`RemoteBackend` is :class:`~tokur_decode.vllm.VLLMBackend` with HTTP in place
of the engine: prompts are encoded by the server (``POST /tokenize``, the chat template
applied there, so the token ids are the ones an in-process engine gets), each request
is a ``POST /v1/completions`` with the prompt's token ids, the same sampling settings
and seeds, and the same ``tokur_`` settings as ``vllm_xargs``; the traces come back in
the responses (:mod:`tokur_decode.vllm.server`). Best-of-N and DeepConf online run
through the shared strategy layer as on an in-process engine; branching (which reads
vLLM's top-``k`` log-probabilities as token ids) and roll-back are not offered.

Requests run ``concurrency`` at a time; a transient failure (connection error,
timeout, HTTP 429 / 502 / 503 / 504) is retried with exponential backoff up to
``retries`` times; a rejected request (another 4xx) raises ``ValueError`` with the
server's message. Works with any server running our plugins: local, remote, data- or
tensor-parallel, behind a load balancer. The client needs httpx, not vLLM: this module
imports where vLLM is not installed (``tokur_decode.RemoteBackend``).

Example:
    >>> from tokur_decode.strategies.backend import Request
    >>> backend = RemoteBackend("http://127.0.0.1:8000", api_key="...")     # doctest: +SKIP
    >>> out = backend.decode(["What is 2 + 2?"], Request(("entropy",)))      # doctest: +SKIP
    >>> out.trace.signals["entropy"].shape                                   # doctest: +SKIP
    torch.Size([1, 9])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..strategies import backend as acts
from .backend import VLLMBackend
from .client import trace_of

__all__ = ["RemoteBackend", "ServerError"]

#: HTTP statuses worth retrying (the server is busy or restarting).
#: Statuses retried: overload, a gateway's, and an internal error (a server restarting
#: answers 500 for a moment; one that stays down fails after the retries, not at once).
TRANSIENT = frozenset({429, 500, 502, 503, 504})


class ServerError(ConnectionError):
    """The server could not be reached, or kept failing, after every retry (the command
    line prints its message as one line)."""


@dataclass
class _Answer:
    """What :meth:`RemoteBackend.send` returns per request (the fields of vLLM's
    ``RequestOutput`` that the strategy layer reads)."""

    request_id: str
    texts: list[str]


class RemoteBackend(VLLMBackend):
    """A served model (``tokur-decode serve``) as a
    :class:`~tokur_decode.strategies.Backend`.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: the server's ``--api-key`` (sent as a bearer token), if any.
        model: the served model's name (default: the first of ``/v1/models``).
        model_name: how :meth:`describe` names the model (default: the served name).
        chat: chat template use (``None``: the server decides, as the tokenizer's).
        concurrency: requests in flight at once (>= 1).
        retries: retries of a transient failure (>= 0); backoff 0.5 s, doubling, at
            most 8 s.
        timeout: seconds to wait for one response.
        signal_params: processor options (``logtoku_k``, ``deepconf_k``, ...).

    Raises:
        ValueError: naming a bad parameter.
    """

    acts = (acts.StopAct, acts.ResampleAct)
    name = "openai"
    TOKUR_HOW = "start the server with tokur-decode serve --tokur"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        model_name: str | None = None,
        chat: bool | None = None,
        concurrency: int = 8,
        retries: int = 4,
        timeout: float = 600.0,
        **signal_params,
    ) -> None:
        try:
            import httpx
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                "RemoteBackend needs httpx: pip install 'tokur-decode[experiments]' (vLLM "
                "is not needed on the client)"
            ) from exc

        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url: an http:// or https:// URL, got {base_url!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency: an integer >= 1, got {concurrency!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries: an integer >= 0, got {retries!r}")
        super().__init__(None, chat=chat, model_name=model_name, **signal_params)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=str(base_url).rstrip("/"),
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency),
        )
        self.concurrency, self.retries = concurrency, retries
        served = self.call("GET", "/v1/models")["data"]
        card = next((m for m in served if m["id"] == model), served[0]) if model else served[0]
        self.model = model or card["id"]
        self._context = card.get("max_model_len")
        self._tokur: bool | None = None

    def close(self) -> None:
        self.http.close()

    def describe(self) -> dict:
        return acts.description(
            self.name,
            self.model_name or self.model,
            "the server's",
            self.chat,
            self.signal_params,
            served_model=self.model,
        )

    # ------------------------------------------------------------------ HTTP

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request, retried on transient failures; the decoded JSON answer."""
        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TransportError as exc:
                if last:
                    raise ServerError(
                        f"server: cannot reach {self.http.base_url}{path} after "
                        f"{self.retries} retries ({type(exc).__name__}: {exc}); is tokur-decode "
                        "serve running there?"
                    ) from exc
            else:
                if response.status_code == 200:
                    return response.json()
                if response.status_code not in TRANSIENT:
                    raise ValueError(f"server: HTTP {response.status_code}: {_message(response)}")
                if last:
                    raise ServerError(
                        f"server: {self.http.base_url}{path}: HTTP {response.status_code} "
                        f"after {self.retries} retries: {_message(response)} (the server's "
                        "log has the cause)"
                    )
            time.sleep(delay)
            delay = min(2 * delay, 8.0)
        raise AssertionError("unreachable")

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # ------------------------------------------------------------------ the backend

    def has_tokur(self) -> bool:
        if self._tokur is None:
            workers = self.call("GET", "/v1/tokur/stats")["workers"]
            self._tokur = bool(workers) and all(w["tokur"] for w in workers)
        return self._tokur

    def context(self) -> int | None:
        """The served model's ``max_model_len`` (from ``/v1/models``)."""
        return self._context

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        def encode(prompt) -> list[int]:
            if self.chat is False:
                if not isinstance(prompt, str):
                    raise ValueError("prompts: chat messages need the chat template")
                body = {"model": self.model, "prompt": prompt}
            else:
                messages = (
                    [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
                )
                body = {"model": self.model, "messages": messages, "add_generation_prompt": True}
            return self.call("POST", "/tokenize", body)["tokens"]

        return self._map(encode, list(prompts))

    def params(self, signals, sampling: acts.Sampling, *, n=1, seed=None, settings=None, **kw):
        """One request's sampling fields (:meth:`VLLMBackend.request_fields`), as a
        dict: the client needs no vLLM."""
        return self.request_fields(signals, sampling, n, seed, settings, **kw)

    def send(self, inputs: list[list[int]], params: list[dict]) -> tuple[list, list]:
        """Token-id prompts with their sampling fields (:meth:`params`), sent
        ``concurrency`` at a time: the answers and their traces."""

        def one(pair) -> tuple[_Answer, object]:
            ids, fields = pair
            body = {"model": self.model, "prompt": ids, **fields}
            body["vllm_xargs"] = dict(body.pop("extra_args") or {})
            if body["seed"] is None:
                del body["seed"]
            answer = self.call("POST", "/v1/completions", body)
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            items = [c.get("tokur") for c in choices]
            if any(item is None for item in items):
                raise ValueError(
                    "server: no trace in the response (start it with tokur-decode serve)"
                )
            texts = [c["text"] for c in choices]
            trace = trace_of(items, texts, [item["tokens"] for item in items], answer["id"])
            return _Answer(answer["id"], texts), trace

        done = self._map(one, list(zip(inputs, params, strict=True)))
        return [a for a, _ in done], [t for _, t in done]


def _message(response) -> str:
    """The server's error message (vLLM's ``{"error": {"message": ...}}``) or its text."""
    try:
        error = response.json().get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        return response.text[:500]
