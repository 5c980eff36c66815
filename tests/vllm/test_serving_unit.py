"""The server pieces without a server: ``tokur-decode serve``'s command line, and the
trace middleware driven by a fake ASGI app (chunks split anywhere, errors, clients that
leave)."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("vllm")

from tokur_decode.cli import main  # noqa: E402
from tokur_decode.vllm.server import TraceMiddleware, engine_ids  # noqa: E402

TRACE = {"token_ids": [5], "tokens": ["x"], "signals": {"entropy": [0.5]}, "events": []}


def _dry_run(capsys, *args) -> dict:
    assert main(["serve", "--dry-run", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_serve_sets_the_processor_extension_plugins_and_passes_the_rest(capsys, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    out = _dry_run(capsys, "--port", "8123", "--data-parallel-size", "2")
    cmd = out["command"]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "tokur_decode.vllm.processor:UncertaintyProcessor" in cmd
    assert "tokur_decode.vllm.worker.TraceExtension" in cmd
    assert cmd[-4:] == ["--port", "8123", "--data-parallel-size", "2"]
    assert out["env"]["VLLM_PLUGINS"] == "other,tokur_decode,tokur_traces"
    assert float(out["env"]["VLLM_CPU_KVCACHE_SPACE"]) >= 1  # bounded on CPU
    assert "--hf-overrides" not in cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32"  # on CPU, as the docs say
    given = _dry_run(capsys, "--dtype", "bfloat16")["command"]
    assert given.count("--dtype") == 1 and given[-2:] == ["--dtype", "bfloat16"]  # the control


def test_serve_tokur_builds_the_perturbed_model(capsys):
    cmd = _dry_run(capsys, "--tokur", "--tokur-samples", "4")["command"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["TokurLlamaForCausalLM"]
    assert overrides["tokur_perturbation"]["samples"] == 4
    assert overrides["tokur_perturbation"]["rank"] == 8  # not given: the default
    assert "--enforce-eager" in cmd


def test_serve_refuses_tokur_options_without_tokur(capsys):
    assert main(["serve", "--dry-run", "--tokur-samples", "4"]) != 0
    assert "--tokur-*: TokUR's options need --tokur" in capsys.readouterr().err


def test_serve_refuses_what_it_sets_and_other_commands_refuse_unknown_flags(capsys):
    assert main(["serve", "--dry-run", "--logits-processors", "x:Y"]) == 2
    assert "--logits-processors: tokur-decode serve sets it" in capsys.readouterr().err
    assert main(["strategies", "--port", "1"]) == 2
    assert "unrecognized arguments: --port 1" in capsys.readouterr().err


class FakePlugin:
    """What the middleware needs from the plugin: an engine, take and drop."""

    def __init__(self) -> None:
        self.engine, self.taken, self.dropped = object(), [], []
        self.has_tokur = False

    async def take(self, ids):
        self.taken.append(ids)
        return {i: {**TRACE, "index": i} for i in range(2)}

    def drop(self, ids):
        self.dropped.append(ids)


def _run(app, body: dict, path="/v1/completions", leave_after=None, plugin=None):
    """Drive ``TraceMiddleware(app)`` with one request; what it sent, the plugin and
    the scope the app saw."""
    plugin, sent, seen = plugin or FakePlugin(), [], {}

    async def inner(scope, receive, send):
        seen["scope"] = scope
        seen["body"] = (await receive())["body"]
        await app(send)

    async def receive():
        if not seen.get("asked"):
            seen["asked"] = True
            return {"type": "http.request", "body": json.dumps(body).encode()}
        await asyncio.sleep(3600)

    async def send(message):
        if leave_after is not None and len(sent) >= leave_after:
            raise OSError("client gone")
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"x-request-id", b"mine")],
    }
    try:
        asyncio.run(TraceMiddleware(inner, plugin)(scope, receive, send))
    except OSError:
        pass
    return sent, plugin, seen


def _stream_app(pieces):
    async def app(send):
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


XARGS = {"vllm_xargs": {"tokur_signals": "entropy"}}


def test_a_stream_split_anywhere_gets_one_trace_chunk_before_done():
    events = b'data: {"id": "cmpl-a", "object": "text_completion", "choices": []}\n\n'
    events += b'data: {"id": "cmpl-a", "choices": [{"index": 0, "text": "x"}]}\n\ndata: [DONE]\n\n'
    pieces = [events[i : i + 7] for i in range(0, len(events), 7)]  # cut mid-event
    sent, plugin, seen = _run(_stream_app(pieces), {"prompt": "q", "n": 2, **XARGS})
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    chunks = [e.removeprefix(b"data: ") for e in text.split(b"\n\n") if e]
    assert chunks[-1] == b"[DONE]" and len(chunks) == 4
    last = json.loads(chunks[-2])
    assert last["id"] == "cmpl-a" and [c["index"] for c in last["choices"]] == [0, 1]
    assert last["choices"][0]["tokur"]["signals"] == TRACE["signals"]
    assert json.loads(chunks[1])["choices"][0]["text"] == "x"  # vLLM's chunks unchanged
    (ids,) = plugin.taken
    rid = dict(seen["scope"]["headers"])[b"x-request-id"].decode()
    assert rid != "mine" and ids == {f"cmpl-{rid}-0": 0}  # a fresh id, the client's replaced
    assert plugin.dropped == []


def test_an_error_answer_passes_unchanged_and_its_state_is_dropped():
    async def app(send):
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "bad"}'})

    sent, plugin, _ = _run(app, {"prompt": "q", **XARGS})
    assert sent[0]["status"] == 400 and sent[1]["body"] == b'{"error": "bad"}'
    assert plugin.taken == [] and len(plugin.dropped) == 1


def test_a_json_answer_gets_each_choice_its_trace_and_a_right_length():
    async def app(send):
        answer = {"id": "chatcmpl-a", "choices": [{"index": 0}, {"index": 1}]}
        body = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body[:5], "more_body": True})
        await send({"type": "http.response.body", "body": body[5:]})

    sent, plugin, _ = _run(app, {"messages": [], **XARGS}, path="/v1/chat/completions")
    body = sent[1]["body"]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(body)).encode()
    answer = json.loads(body)
    assert [c["tokur"]["token_ids"] for c in answer["choices"]] == [[5], [5]]


def test_a_failing_trace_read_still_delivers_the_answer():
    async def app(send):
        body = json.dumps({"id": "cmpl-a", "choices": [{"index": 0, "text": "4"}]}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def broken(ids):
        raise ConnectionError("engine gone")

    plugin, sent = FakePlugin(), []
    plugin.take = broken

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": json.dumps({"prompt": "q", **XARGS}).encode()}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(TraceMiddleware(app_of(app), plugin)(scope, receive, send))
    answer = json.loads(sent[1]["body"])
    assert answer["choices"][0]["text"] == "4" and answer["choices"][0]["tokur"] is None
    assert "engine gone" in answer["tokur_error"]


def app_of(app):
    async def inner(scope, receive, send):
        await receive()
        await app(send)

    return inner


def test_a_client_that_leaves_mid_stream_has_its_trace_dropped():
    app = _stream_app([b'data: {"id": "cmpl-a", "choices": []}\n\n'] * 5)
    sent, plugin, _ = _run(app, {"prompt": "q", **XARGS}, leave_after=2)
    assert plugin.taken == [] and len(plugin.dropped) == 1


def test_requests_without_tokur_settings_pass_through_untouched():
    async def app(send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent, plugin, seen = _run(app, {"prompt": "q", "vllm_xargs": {"other": 1}})
    assert sent[1]["body"] == b"{}" and plugin.taken == plugin.dropped == []
    assert dict(seen["scope"]["headers"])[b"x-request-id"] == b"mine"


def test_engine_ids_follow_vllms_request_ids():
    assert engine_ids("/v1/completions", {"prompt": [[1, 2], [3]], "n": 3}, "b") == {
        "cmpl-b-0": 0,
        "cmpl-b-1": 3,
    }
    assert engine_ids("/v1/completions", {"prompt": [1, 2, 3]}, "b") == {"cmpl-b-0": 0}


def test_each_tokens_signals_go_beside_its_logprobs_and_alternatives_fill_the_top():
    from tokur_decode.vllm.openai_shape import add_to_logprobs

    trace = {
        "token_ids": [5, 6],
        "tokens": ["a", "b"],
        "signals": {"entropy": [0.5, 1.5]},
        "alternatives": {
            "ids": [[5, 9], [6, 9]],
            "probs": [[0.75, 0.0], [0.5, 0.25]],
            "tokens": [["a", "z"], ["b", "z"]],
        },
    }
    entry = {"token": "a", "logprob": -0.3, "bytes": [97], "top_logprobs": []}
    chat = {"logprobs": {"content": [dict(entry), {**entry, "token": "b"}]}}
    add_to_logprobs(chat, trace, fill_top=True)
    first, second = chat["logprobs"]["content"]
    assert first["tokur"] == {"entropy": 0.5} and second["tokur"] == {"entropy": 1.5}
    assert [t["token"] for t in second["top_logprobs"]] == ["b", "z"]
    assert second["top_logprobs"][1]["logprob"] == pytest.approx(-1.3862944)
    assert first["top_logprobs"][1]["logprob"] == -9999.0  # probability 0, as vLLM writes it
    asked = {"logprobs": {"content": [{**entry, "top_logprobs": [{"token": "q"}]}]}}
    add_to_logprobs(asked, trace, fill_top=True)  # vLLM's own top: kept
    assert asked["logprobs"]["content"][0]["top_logprobs"] == [{"token": "q"}]
    legacy = {"logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.3, -0.7]}}
    add_to_logprobs(legacy, trace, fill_top=False)
    assert legacy["logprobs"]["tokur"] == [{"entropy": 0.5}, {"entropy": 1.5}]
    plain = {"text": "ab", "logprobs": None}  # control: no log-probabilities asked
    add_to_logprobs(plain, trace, fill_top=True)
    assert plain == {"text": "ab", "logprobs": None}


def test_the_summary_is_the_trace_summary_of_the_response():
    import torch

    from tokur_decode.core.trace import Trace
    from tokur_decode.vllm.openai_shape import summary_of

    signals = {"max_prob": [0.5, 0.9, 0.2], "logtoku_unreliability": [0.1, 0.3, 0.2]}
    got = summary_of({"token_ids": [1, 2, 3], "signals": signals})
    want = Trace(
        signals={k: torch.tensor([v]) for k, v in signals.items()},
        token_ids=torch.tensor([[1, 2, 3]]),
        lengths=torch.tensor([3]),
    ).summary()[0]
    assert got == want and got["n_tokens"] == 3 and "logtoku_topk_mean" in got
    assert summary_of({"token_ids": [], "signals": {"max_prob": []}}) == {"n_tokens": 0}


def test_metrics_count_one_response_its_scores_actions_and_bytes():
    from prometheus_client import REGISTRY

    from tokur_decode.core.events import OVERRIDDEN
    from tokur_decode.vllm.metrics import record_response

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"model_name": "unit", **labels}) or 0.0

    def counts():
        return (
            value("tokur:requests_total"),
            value("tokur:response_score_count", score="mean_entropy"),
            value("tokur:actions_total", action="stop", outcome="overridden"),
            value("tokur:trace_bytes_total"),
            value("tokur:tokens_total"),
        )

    before = counts()
    trace = {
        "token_ids": [1, 2],
        "signals": {"entropy": [0.5, 1.0]},
        "events": [{"action": "stop", "blocked": OVERRIDDEN}],
    }
    record_response("unit", trace, {"n_tokens": 2, "mean_entropy": 0.75, "x": float("nan")}, 123)
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 123, 2]
    assert value("tokur:response_score_count", score="x") == 0  # NaN: not observed
    assert value("tokur:tokur_tokens_total") == 0  # no TokUR samples in this trace


def test_the_grafana_dashboard_reads_only_the_families_we_export():
    import re
    from pathlib import Path

    from tokur_decode.vllm.metrics import FAMILIES

    dash = json.loads((Path(__file__).parents[2] / "docs" / "grafana-tokur.json").read_text())
    assert dash["uid"] and dash["schemaVersion"] >= 36 and dash["panels"]
    names = {t["name"] for t in dash["templating"]["list"]}
    assert {"datasource", "model_name", "score"} <= names
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [t["definition"] for t in dash["templating"]["list"] if "definition" in t]
    suffixes = ("_total", "_bucket", "_sum", "_count")
    used = {m for e in exprs for m in re.findall(r"tokur:[a-z_]+", e)}
    assert used and all(any(m == f + s for f in FAMILIES for s in suffixes) for m in used), used - {
        f + s for f in FAMILIES for s in suffixes
    }
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["targets"], p["title"]
        assert all(t["refId"] and "$model_name" in t["expr"] for t in p["targets"]), p["title"]


def test_the_served_format_is_checked_at_the_entry():
    from tokur_decode.vllm.args import parse_settings

    assert parse_settings({"tokur_signals": "entropy", "tokur_format": "packed"}) is not None
    with pytest.raises(ValueError, match=r"tokur_format: one of \['json', 'packed'\], got 'xml'"):
        parse_settings({"tokur_signals": "entropy", "tokur_format": "xml"})


class PeekingEngine:
    """An engine whose record grows by two steps per read (``tokur_peek``): entropy
    (known at its step) and chosen_prob (known one step later)."""

    ENTROPY = [0.1, 0.2, 0.3, 0.4]
    CHOSEN = [0.9, 0.8, 0.7, 0.6]

    def __init__(self) -> None:
        self.steps, self.asked = 0, []
        self.engine_core = object()  # an engine in the server's process (rpc_all)

    async def collective_rpc(self, method, args=()):
        assert method == "tokur_peek"
        (starts,) = args
        self.asked.append(dict(starts))
        self.steps += 2
        (rid,) = starts
        start = starts[rid]
        item = {
            "request_id": rid,
            "index": 0,
            "start": start,
            "final": self.steps - 1,
            "signals": {
                "entropy": self.ENTROPY[start : self.steps],
                "chosen_prob": self.CHOSEN[start : self.steps],
            },
        }
        return [[item]]


def test_streamed_tokens_carry_their_signals_and_the_late_ones_follow():
    """Chat, logprobs asked, two chunks of two tokens: each entry gets its final values;
    the chosen-token value of a chunk's last token comes in the next chunk."""

    def chunk(tokens):
        content = [{"token": t, "logprob": -0.1, "bytes": [], "top_logprobs": []} for t in tokens]
        delta = {
            "index": 0,
            "delta": {"content": "".join(tokens)},
            "logprobs": {"content": content},
        }
        return (
            b"data: "
            + json.dumps(
                {"id": "chatcmpl-a", "object": "chat.completion.chunk", "choices": [delta]}
            ).encode()
            + b"\n\n"
        )

    pieces = [chunk(["a", "b"]), chunk(["c", "d"]), b"data: [DONE]\n\n"]
    plugin = FakePlugin()
    plugin.engine = PeekingEngine()
    body = {"messages": [], "logprobs": True, **XARGS}
    sent, _, _ = _run(_stream_app(pieces), body, path="/v1/chat/completions", plugin=plugin)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    events = [e.removeprefix(b"data: ") for e in text.split(b"\n\n") if e]
    first, second = json.loads(events[0]), json.loads(events[1])
    got = [e["tokur"] for e in first["choices"][0]["logprobs"]["content"]]
    assert got == [{"entropy": 0.1, "chosen_prob": 0.9}, {"entropy": 0.2}]
    assert second["choices"][0]["tokur_late"] == {"step": 1, "chosen_prob": 0.8}
    got = [e["tokur"] for e in second["choices"][0]["logprobs"]["content"]]
    assert got == [{"entropy": 0.3, "chosen_prob": 0.7}, {"entropy": 0.4}]
    rid = next(iter(plugin.engine.asked[0]))
    assert plugin.engine.asked == [{rid: 0}, {rid: 1}]  # from the owed step on
    assert events[-1] == b"[DONE]" and "tokur" in json.loads(events[-2])["choices"][0]


def test_a_stream_without_logprobs_is_not_read_per_chunk():
    plugin = FakePlugin()
    plugin.engine = PeekingEngine()
    events = b'data: {"id": "cmpl-a", "choices": [{"index": 0, "text": "x"}]}\n\ndata: [DONE]\n\n'
    _run(_stream_app([events]), {"prompt": "q", **XARGS}, plugin=plugin)
    assert plugin.engine.asked == []  # control: no logprobs asked, no per-chunk read
