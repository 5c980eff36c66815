"""Traces in the responses of vLLM's OpenAI-compatible server, without its dev mode.

:class:`TraceEndpoints` is a vLLM endpoint plugin (entry point ``tokur_traces`` in the
``vllm.endpoint_plugins`` group; vLLM loads it only when ``VLLM_PLUGINS`` names it, and
then loads only the general plugins it names too: ``VLLM_PLUGINS=tokur_decode,
tokur_traces``; ``tokur-decode serve`` sets that). It adds no route that reaches the
engine: it wraps ``POST /v1/completions`` and ``POST /v1/chat/completions`` in
:class:`TraceMiddleware`, which, for a request whose ``vllm_xargs`` carry ``tokur_``
settings,

* gives the request a fresh id (the ``X-Request-Id`` header vLLM builds its id from:
  two clients cannot share one, so a trace can only go to the response it belongs to),
* lets vLLM serve it unchanged (vLLM's API key check runs first: a rejected request
  gets vLLM's answer and nothing else),
* then takes the request's traces from every engine (each data-parallel rank is asked,
  :func:`rpc_all`; the one that served it answers) and puts them in the response:
  ``choices[i]["tokur"] = {"token_ids", "tokens", "signals", "events"}`` for each
  choice, ``n > 1`` included. **Streaming**: the chunks pass through as vLLM sends them
  and one more chunk, just before ``data: [DONE]``, carries every choice's trace (its
  choices have an empty delta or text and ``finish_reason`` null).

A trace is taken from the engine as its response is sent, so the engine keeps none for
long: a client that disconnects mid-stream has its request's trace taken and dropped;
traces nobody took (a failure between the engine and the server) are bounded by the
processor (:attr:`~tokur_decode.vllm.processor_core.ProcessorCore.max_finished`).
``GET /v1/tokur/stats`` (behind the same API key as the other ``/v1`` routes) gives, per
worker, how many opted-in requests it has seen, how many it tracks now and how many
finished traces wait, and whether it has TokUR's model: counts only, no request's
content.

Example (what ``tokur-decode serve`` runs):
    >>> server_env({})["VLLM_PLUGINS"]
    'tokur_decode,tokur_traces'
    >>> server_env({"VLLM_PLUGINS": "lora_resolver"})["VLLM_PLUGINS"]
    'lora_resolver,tokur_decode,tokur_traces'
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping

from ..core.packing import pack_trace
from ..core.signals import OUTPUTS
from .metrics import record_response
from .openai_shape import add_to_logprobs, summary_of

__all__ = [
    "PLUGINS",
    "TraceEndpoints",
    "TraceMiddleware",
    "engine_ids",
    "rpc_all",
    "server_env",
]

logger = logging.getLogger(__name__)

#: The plugins a server with traces needs: ours (TokUR's model classes) and this one.
PLUGINS = ("tokur_decode", "tokur_traces")
#: The routes whose responses carry traces, and the prefix of vLLM's id for each.
ROUTES = {"/v1/completions": "cmpl-", "/v1/chat/completions": "chatcmpl-"}
#: The fields of a stream's first chunk that the trace chunk repeats.
_CHUNK_META = ("id", "object", "created", "model")


def server_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with :data:`PLUGINS` added to ``VLLM_PLUGINS`` (other entries kept)."""
    listed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    return {**env, "VLLM_PLUGINS": ",".join(listed + [p for p in PLUGINS if p not in listed])}


async def rpc_all(engine_client, method: str, args: tuple = ()) -> list:
    """Call worker-extension ``method`` on every engine of ``engine_client`` (every
    data-parallel rank: vLLM's own ``collective_rpc`` returns the first engine's answer
    only); one answer per worker, all engines' workers together."""
    core = engine_client.engine_core
    if hasattr(core, "call_utility_all_async"):
        per_engine = await core.call_utility_all_async("collective_rpc", method, None, args, None)
    else:  # an engine in the server's process
        per_engine = [await engine_client.collective_rpc(method, args=args)]
    return [answer for workers in per_engine for answer in workers]


class TraceEndpoints:
    """The ``tokur_traces`` endpoint plugin (see the module docstring)."""

    name = "tokur_traces"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine = None
        self.tokenizer = None
        self.has_tokur = False
        self._dropping: set[asyncio.Task] = set()  # kept alive until done

    def attach_router(self, app) -> None:
        from fastapi import APIRouter

        router = APIRouter()
        router.add_api_route("/v1/tokur/stats", self.stats, methods=["GET"])
        app.include_router(router)
        app.add_middleware(TraceMiddleware, plugin=self)

    async def init_state(self, engine_client, state, args) -> None:
        if engine_client is None:  # vLLM's render-only server: no engine, no traces
            return
        try:
            bound = await rpc_all(engine_client, "tokur_bind")
        except Exception as exc:
            raise RuntimeError(
                "tokur_traces: the workers have no trace extension; start the server with "
                "tokur-decode serve (or --worker-extension-cls "
                "tokur_decode.vllm.worker.TraceExtension)"
            ) from exc
        if not all(bound):
            raise RuntimeError(
                "tokur_traces: no UncertaintyProcessor on the engine; start the server with "
                "tokur-decode serve (or --logits-processors "
                "tokur_decode.vllm.processor:UncertaintyProcessor)"
            )
        self.engine = engine_client
        self.tokenizer = engine_client.get_tokenizer()
        workers = await rpc_all(engine_client, "tokur_stats")
        self.has_tokur = bool(workers) and all(w["tokur"] for w in workers)

    async def stats(self) -> dict:
        """Per worker: opted-in requests seen and tracked, finished traces not yet
        taken, TokUR's model present."""
        if self.engine is None:
            return {"workers": []}
        return {"workers": await rpc_all(self.engine, "tokur_stats")}

    async def take(self, ids: dict[str, int]) -> dict[int, dict]:
        """The traces of the engine requests ``ids`` (engine request id -> index of its
        first choice in the response) by choice index, taken from the engines (which
        forget them)."""
        found = await rpc_all(self.engine, "tokur_collect", (list(ids),))
        traces = {}
        for item in (t for worker in found for t in worker):
            index = ids[item["request_id"]] + item["index"]
            traces[index] = {
                "token_ids": item["token_ids"],
                "tokens": [self.tokenizer.decode([t]) for t in item["token_ids"]],
                "signals": item["signals"],
                "events": item["events"],
            }
            if "alternatives" in item:  # the top-k tokens of each step, with their text
                alt = item["alternatives"]
                alt["tokens"] = [[self.tokenizer.decode([t]) for t in s] for s in alt["ids"]]
                traces[index]["alternatives"] = alt
        return traces

    def drop(self, ids: dict[str, int]) -> None:
        """Take and forget the traces of ``ids`` (in the background: the client is
        gone, the request may still be aborting)."""

        async def _drop() -> None:
            try:
                await self.take(ids)
            except Exception:  # the server is shutting down: its state goes with it
                logger.debug("tokur_traces: could not drop %s", list(ids), exc_info=True)

        task = asyncio.get_running_loop().create_task(_drop())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)


class TraceMiddleware:
    """Pure ASGI middleware that adds traces to opted-in completions (module
    docstring); every other request passes through untouched."""

    def __init__(self, app, plugin: TraceEndpoints) -> None:
        self.app = app
        self.plugin = plugin

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or path not in ROUTES
            or self.plugin.engine is None
        ):
            await self.app(scope, receive, send)
            return
        body, gone = await _read_body(receive)
        if gone:
            return
        replay = _replay(body, receive)
        request = _opted_in(body)
        if request is None:
            await self.app(scope, replay, send)
            return
        refused = _refused(request["vllm_xargs"], self.plugin.has_tokur)
        if refused is not None:
            await _bad_request(refused, send)
            return
        base = f"tokur-{uuid.uuid4().hex}"
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"]
        scope = {**scope, "headers": [*headers, (b"x-request-id", base.encode())]}
        exchange = _Exchange(self.plugin, engine_ids(path, request, base), send, request)
        try:
            await self.app(scope, replay, exchange.send)
        finally:
            if not exchange.done:  # the client left, or vLLM failed mid-way
                self.plugin.drop(exchange.ids)


class _Exchange:
    """One opted-in request's response on its way out: buffered (a JSON answer, traces
    added at the end) or passed through (a stream, traces in a chunk before
    ``[DONE]``)."""

    def __init__(self, plugin: TraceEndpoints, ids: dict[str, int], send, request: dict) -> None:
        self.plugin, self.ids, self._send = plugin, ids, send
        self.packed = request["vllm_xargs"].get("tokur_format") == "packed"
        # the client asked for log-probabilities but not for vLLM's top ones: the
        # trace's alternatives (when recorded) fill them
        self.fill_top = bool(request.get("logprobs")) and not request.get("top_logprobs")
        self.streamed = StreamedSignals(plugin, ids) if request.get("logprobs") else None
        self.done = False
        self._start: dict | None = None
        self._stream = False
        self._body = bytearray()
        self._meta: dict = {}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self._stream = content_type.startswith(b"text/event-stream")
            if self._stream or message["status"] != 200:
                await self._send(message)
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        if self._start["status"] != 200:  # vLLM's error answer, as it is
            await self._send(message)
            self.done = not message.get("more_body", False)
            if self.done:
                self.plugin.drop(self.ids)
            return
        self._body += message.get("body", b"")
        if self._stream:
            await self._pass_events(more=message.get("more_body", False))
        elif not message.get("more_body", False):
            await self._answer()

    async def _answer(self) -> None:
        """The buffered JSON answer with each choice's trace."""
        try:
            answer = json.loads(bytes(self._body))
        except ValueError:  # not what vLLM answers; pass it on untouched
            await self._send(self._start)
            await self._send({"type": "http.response.body", "body": bytes(self._body)})
            self.done = True
            self.plugin.drop(self.ids)
            return
        traces, error = await self._take()
        for choice in answer.get("choices", []):
            trace = traces.get(choice.get("index", 0))
            if trace is not None:
                add_to_logprobs(choice, trace, fill_top=self.fill_top)
            choice["tokur"] = self._served(trace, answer.get("model"))
        if error:
            answer["tokur_error"] = error
        body = json.dumps(answer).encode()
        headers = [(k, v) for k, v in self._start.get("headers", []) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
        self.done = True

    async def _pass_events(self, more: bool) -> None:
        """Forward the complete server-sent events; the trace chunk goes before
        ``[DONE]`` (or at the end of a stream without one)."""
        *events, rest = bytes(self._body).split(b"\n\n")
        self._body = bytearray(rest)
        for event in events:
            data = event.removeprefix(b"data: ")
            if data.strip() == b"[DONE]":
                await self._send_traces()
            elif data.startswith(b"{") and (not self._meta or self.streamed is not None):
                chunk = json.loads(data)  # (other chunks pass unparsed)
                if not self._meta:
                    self._meta = {k: chunk[k] for k in _CHUNK_META if k in chunk}
                if self.streamed is not None and await self.streamed.add_to(chunk):
                    event = b"data: " + json.dumps(chunk).encode()
            await self._pass(event + b"\n\n")
        if not more:
            if not self.done:
                await self._send_traces()
            await self._send({"type": "http.response.body", "body": bytes(self._body)})

    async def _send_traces(self) -> None:
        traces, error = await self._take()
        chat = self._meta.get("object", "").startswith("chat")
        empty = {"delta": {}} if chat else {"text": ""}
        model = self._meta.get("model")
        choices = [
            {"index": i, **empty, "finish_reason": None, "tokur": self._served(trace, model)}
            for i, trace in sorted(traces.items())
        ]
        chunk = {**self._meta, "choices": choices, **({"tokur_error": error} if error else {})}
        await self._pass(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.done = True

    def _served(self, trace: dict | None, model: str | None) -> dict | None:
        """A choice's trace as sent: with its response-level scores, packed if asked,
        counted in the metrics."""
        if trace is None:
            return None
        trace = {**trace, "summary": summary_of(trace)}
        served = pack_trace(trace) if self.packed else trace
        record_response(str(model), trace, trace["summary"], len(json.dumps(served)))
        return served

    async def _take(self) -> tuple[dict[int, dict], str | None]:
        """The traces, or none and why: the generated answer goes out either way."""
        try:
            return await self.plugin.take(self.ids), None
        except Exception as exc:  # the engine's side failed; the answer must not be lost
            logger.exception("tokur_traces: could not take the traces of %s", list(self.ids))
            return {}, f"the traces could not be read: {type(exc).__name__}: {exc}"

    async def _pass(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})


class StreamedSignals:
    """Each streamed token's signals in its chunk, beside its log-probability, for a
    streamed request that asked for ``logprobs`` (the shapes:
    :mod:`tokur_decode.vllm.openai_shape`).

    Per chunk that carries tokens, one read of what the engine has recorded so far
    (``tokur_peek``, between engine steps, forgetting nothing). A token's step-time
    signals are final when it is streamed; those that need the emitted token
    (``chosen_prob``, ``chosen_logprob``, ``tokur_reward``) are written at the next step,
    so the last token of a chunk gets them in the next chunk of its choice, as
    ``"tokur_late": {"step": j, name: value, ...}`` (and every value is in the trace
    chunk before ``[DONE]``).
    """

    def __init__(self, plugin: TraceEndpoints, ids: dict[str, int]) -> None:
        self.plugin, self.ids = plugin, ids
        self.sent: dict[int, int] = {}  # choice -> tokens streamed
        self.late: dict[int, int] = {}  # choice -> the step whose late values are owed

    async def add_to(self, chunk: dict) -> bool:
        """Put the signals of the tokens ``chunk`` carries into it; whether it changed."""
        counts = {c.get("index", 0): _token_count(c) for c in chunk.get("choices", [])}
        counts = {i: n for i, n in counts.items() if n or i in self.late}
        if not counts:
            return False
        starts: dict[str, int] = {}
        for i in counts:
            rid, first = self._request_of(i), self.late.get(i, self.sent.get(i, 0))
            starts[rid] = min(starts.get(rid, first), first)
        try:
            found = await rpc_all(self.plugin.engine, "tokur_peek", (starts,))
        except Exception:  # the engine's side failed: the chunk goes out as it is
            logger.debug("tokur_traces: could not read %s", starts, exc_info=True)
            return False
        recorded = {
            self.ids[item["request_id"]] + item["index"]: item
            for item in (t for worker in found for t in worker)
        }
        for choice in chunk.get("choices", []):
            i = choice.get("index", 0)
            if i in counts and i in recorded:
                self._fill(choice, counts[i], recorded[i])
        return True

    def _request_of(self, choice: int) -> str:
        """The engine request of a choice (its prompt's: choices ``first ..`` on)."""
        return max((r for r, first in self.ids.items() if first <= choice), key=self.ids.get)

    def _fill(self, choice: dict, count: int, item: dict) -> None:
        i = choice.get("index", 0)
        first = self.sent.get(i, 0)
        if i in self.late:
            step = self.late.pop(i)
            choice["tokur_late"] = {"step": step, **_recorded(item, step, late=True)}
        if not count:  # a chunk that only ends the choice: the owed values alone
            return
        per_token = [_recorded(item, first + j, late=False) for j in range(count)]
        logprobs = choice["logprobs"]
        if isinstance(logprobs.get("content"), list):  # chat
            for entry, values in zip(logprobs["content"], per_token, strict=True):
                entry["tokur"] = values
        else:  # completion: parallel lists
            logprobs["tokur"] = per_token
        self.sent[i] = first + count
        if any(OUTPUTS[k].needs_token for k in item["signals"]):
            self.late[i] = first + count - 1


def _recorded(item: dict, step: int, *, late: bool) -> dict[str, float]:
    """Step ``step``'s values in a peeked ``item``: the complete ones, or (``late``) only
    those that needed the emitted token."""
    out = {}
    for name, values in item["signals"].items():
        deferred = OUTPUTS[name].needs_token
        if (late and not deferred) or (deferred and step >= item["final"]):
            continue
        if 0 <= step - item["start"] < len(values):
            out[name] = values[step - item["start"]]
    return out


def _token_count(choice: dict) -> int:
    """How many tokens' log-probabilities a streamed choice carries."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return 0
    entries = logprobs.get("content")
    if not isinstance(entries, list):
        entries = logprobs.get("tokens")
    return len(entries) if isinstance(entries, list) else 0


async def _read_body(receive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client left before sending it."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive):
    """A ``receive`` that gives ``body`` once, then waits on the client as before."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _opted_in(body: bytes) -> dict | None:
    """The request, if its body carries ``tokur_`` settings in ``vllm_xargs`` (a body
    that is not a JSON object is vLLM's to reject)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    xargs = request.get("vllm_xargs") if isinstance(request, dict) else None
    if isinstance(xargs, dict) and any(str(k).lower().startswith("tokur_") for k in xargs):
        return request  # a misspelt case (TOKUR_signals) too: refused, not ignored
    return None


def _refused(xargs: dict, has_tokur: bool) -> str | None:
    """Why a request's settings are refused before vLLM sees them (an HTTP 400 naming the
    key, streamed or not): what :func:`~tokur_decode.vllm.args.parse_settings` refuses; a
    ``tokur_strategy`` that is not a shipped recipe's name (it would make the server read
    a file of the client's choosing); ``tokur`` on a server without TokUR's model (its
    values would be NaN)."""
    from ..core.signals import wants_samples
    from ..strategies.recipe import strategies_dir
    from .args import parse_settings

    strategy = xargs.get("tokur_strategy")
    shipped = sorted(p.stem for p in strategies_dir().glob("*.toml"))
    if strategy is not None and strategy not in shipped:
        return (
            f"tokur_strategy: over the server, one of the shipped recipes {shipped} "
            f"(or its settings as tokur_ keys), got {strategy!r}"
        )
    try:
        settings = parse_settings(xargs)
    except ValueError as exc:
        return str(exc)
    if settings is not None and wants_samples(settings.signals) and not has_tokur:
        return "tokur_signals: 'tokur' needs a server started with tokur-decode serve --tokur"
    return None


async def _bad_request(message: str, send) -> None:
    """An HTTP 400 in vLLM's error format."""
    error = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def engine_ids(path: str, request: dict, base: str) -> dict[str, int]:
    """The engine request ids vLLM makes for ``request`` on route ``path`` (response id
    ``prefix + base``), each with the index of its first choice: a chat completion is
    one engine request; a completion is one per prompt (``{id}-{i}``, choices ``i * n``
    on).

    Example:
        >>> engine_ids("/v1/completions", {"prompt": ["a", "b"], "n": 2}, "x")
        {'cmpl-x-0': 0, 'cmpl-x-1': 2}
        >>> engine_ids("/v1/chat/completions", {"messages": []}, "x")
        {'chatcmpl-x': 0}
    """
    response_id = ROUTES[path] + base
    if path != "/v1/completions":
        return {response_id: 0}
    try:  # vLLM validates n; a value it would coerce must not break the mapping here
        n = max(1, int(request.get("n") or 1))
    except (TypeError, ValueError):
        n = 1
    prompt = request.get("prompt")
    several = isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)
    prompts = len(prompt) if several else 1
    return {f"{response_id}-{i}": i * n for i in range(prompts)}
