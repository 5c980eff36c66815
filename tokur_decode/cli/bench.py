"""``tokur-decode bench ...``: the benchmarks (:mod:`tokur_decode.bench`), each printing
ratios against a baseline measured in the same run."""

from __future__ import annotations

import json

from ..core.limits import MAX_BATCH, MAX_VOCAB
from ..core.recording import Recording
from .common import (
    SEED,
    flags,
    int_options,
    integers,
    integers_from,
    load,
    model_args,
    signal_list,
)

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (ratios against a baseline of the same run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (text, description, options, _) in _BENCHES.items():
        parser = bench_sub.add_parser(name, help=text, description=description)
        options(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    return _BENCHES[args.bench][3](args)


def _overhead_options(p) -> None:
    model_args(p)
    _batch_sizes(p, "1,8")
    int_options(
        p,
        ("--max-new-tokens", 32, "tokens per run"),
        ("--repeats", 15, "timed pairs per batch size"),
    )
    p.add_argument("--signals", default="all")
    Recording.add_flags(p)


def _signals_options(p) -> None:
    p.add_argument(
        "--rows",
        type=integers_from(1, MAX_BATCH),
        default=[1, 8, 64, 256],
        help="comma-separated row counts (default 1,8,64,256)",
    )
    p.add_argument(
        "--vocabs",
        type=integers_from(2, MAX_VOCAB),
        default=[49152, 151936],
        help="comma-separated vocabulary sizes (default 49152,151936: SmolLM2, Qwen)",
    )
    int_options(
        p,
        ("--repeats", 30, "timed rounds per shape"),
        ("--threads", 1, "torch threads (the issue's measure: one)"),
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _serving_options(p) -> None:
    p.add_argument("--base-url", required=True, help="a running tokur-decode serve")
    p.add_argument("--api-key", default=None, help="its --api-key")
    p.add_argument("--model", default=None, help="the served model (default: its only one)")
    p.add_argument(
        "--concurrency",
        type=integers_from(1, MAX_BATCH),
        default=[1, 16, 64],
        help="comma-separated client concurrencies (default 1,16,64)",
    )
    int_options(
        p,
        ("--requests", 64, "requests per case and concurrency"),
        ("--max-tokens", 64, "tokens per request"),
    )


def _tokur_options(p) -> None:
    model_args(p)
    _batch_sizes(p, "1")
    int_options(
        p,
        ("--samples", 10, "M"),
        ("--max-new-tokens", 16, "tokens per run"),
        ("--repeats", 3, "timed rounds"),
    )


def _actions_options(p) -> None:
    model_args(p)
    p.add_argument("--strategies", default=None, help="comma-separated recipes (default: all)")
    int_options(p, ("--max-new-tokens", 32, "tokens per answer"))
    p.add_argument("--seed", type=SEED, default=0)


def _vllm_options(p) -> None:
    _vllm_model(p)
    int_options(
        p,
        ("--prompts", 64, "requests per round"),
        ("--max-tokens", 64, "tokens per request"),
        ("--rounds", 5, "timed rounds"),
    )
    p.add_argument("--dtype", default="bfloat16", help="both engines' dtype")


def _vllm_tokur_options(p) -> None:
    _vllm_model(p)
    _batch_sizes(p, "1,4,16")
    int_options(
        p,
        ("--max-tokens", 16, "tokens per request"),
        ("--rounds", 3, "timed rounds"),
        ("--samples", 10, "TokUR's M"),
    )
    p.add_argument("--dtype", default="bfloat16", help="every engine's and transformers' dtype")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers run")


def _calibration_options(p) -> None:
    p.add_argument("run", help="an eval run folder")
    p.add_argument("--risk", type=float, required=True, help="error rate allowed among kept")
    p.add_argument("--delta", type=float, default=0.1, help="the guarantee's delta (0.1)")
    int_options(p, ("--splits", 20, "random splits"))
    p.add_argument("--test-fraction", type=float, default=0.4, help="test items per split")
    p.add_argument("--score", help="calibrate on this score (default: chosen per split)")
    p.add_argument("--seed", type=SEED, default=0)


def _vllm_model(p) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the embedded one)")


def _batch_sizes(parser, default: str) -> None:
    parser.add_argument(
        "--batch-sizes",
        type=integers,
        default=integers(default),
        help=f"comma-separated batch sizes (default {default})",
    )


def _cmd_bench_overhead(args) -> int:
    from ..bench.hf import monitor_overhead

    model, tokenizer = load(args)
    rows = []
    for batch in args.batch_sizes:
        res = monitor_overhead(
            model,
            tokenizer,
            signals=signal_list(args.signals),
            batch_size=batch,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            **Recording.from_flags(args),
        )
        rows.append(
            {
                "batch_size": batch,
                "tokens": args.max_new_tokens,
                "baseline_ms_per_token": 1e3 * res.median_baseline,
                "monitored_ms_per_token": 1e3 * res.median_monitored,
                "median_ratio": res.median_ratio,
                "ratios": res.ratios,
                "monitor_ms_per_step": 1e3 * res.monitor_step,
                "step_ratio": res.step_ratio,
            }
        )
    if args.json:
        print(json.dumps({"signals": list(res.signals), "results": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Monitor overhead ({len(res.signals)} signal outputs, greedy, {args.repeats} pairs)"
    )
    heads = (
        "batch",
        "plain ms/token",
        "monitored ms/token",
        "median ratio",
        "min-max ratio",
        "monitor ms/step",
        "1 + step/plain",
    )
    for head in heads:
        table.add_column(head, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            f"{r['baseline_ms_per_token']:.2f}",
            f"{r['monitored_ms_per_token']:.2f}",
            f"{r['median_ratio']:.3f}",
            f"{min(r['ratios']):.3f}-{max(r['ratios']):.3f}",
            f"{r['monitor_ms_per_step']:.3f}",
            f"{r['step_ratio']:.3f}",
        )
    Console().print(table)
    return 0


def _cmd_bench_tokur(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..bench.hf import tokur_cost

    model, tokenizer = load(args)
    results = [
        tokur_cost(
            model,
            tokenizer,
            batch_size=batch,
            **flags(args, "samples", "max_new_tokens", "repeats"),
        )
        for batch in args.batch_sizes
    ]
    rows = [
        {
            "batch_size": r.batch_size,
            "mode": mode,
            "ms_per_token": 1e3 * r.seconds[mode],
            "ratio_to_plain": r.ratios[mode],
            "peak_extra_mib": r.peak_bytes[mode] / 2**20,
        }
        for r in results
        for mode in r.seconds
    ]
    if args.json:
        print(
            json.dumps(
                {"samples": args.samples, "memory": results[0].memory_kind, "results": rows},
                indent=2,
            )
        )
        return 0
    memory = results[0].memory_kind
    table = Table(title=f"TokUR cost, M = {args.samples} ({model.device.type}; memory: {memory})")
    for head in ("batch", "decoding", "ms/token", "x plain", "peak extra MiB"):
        table.add_column(head, justify="right")
    names = {
        "plain": "plain greedy",
        "batched": "TokUR, one forward",
        "sequential": "TokUR, M passes",
    }
    for r in rows:
        table.add_row(
            str(r["batch_size"]),
            names[r["mode"]],
            f"{r['ms_per_token']:.1f}",
            f"{r['ratio_to_plain']:.2f}",
            f"{r['peak_extra_mib']:.1f}",
        )
    Console().print(table)
    return 0


def _cmd_bench_actions(args) -> int:
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from ..bench.hf import actions_cost
    from ..strategies.recipe import available

    names = (
        [s.strip() for s in args.strategies.split(",") if s.strip()]
        if args.strategies
        else list(available())
    )
    model, tokenizer = load(args)
    rows = actions_cost(model, tokenizer, names, max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    table = Table(
        title=f"Strategies on {rows[0].questions} questions ({model.device.type}, "
        f"max {args.max_new_tokens} new tokens)"
    )
    for head in ("strategy", "seconds", "x greedy time", "tokens", "x greedy tokens", "right"):
        table.add_column(head, justify="right")
    for r in rows:
        table.add_row(
            r.strategy,
            f"{r.seconds:.1f}",
            f"{r.time_ratio:.2f}",
            str(r.tokens),
            f"{r.token_ratio:.2f}",
            f"{r.correct}/{r.questions}",
        )
    Console().print(table)
    return 0


def _cmd_bench_signals(args) -> int:
    import os

    import torch

    from ..bench.signals import signal_pass_cost
    from ..core.limits import check_logits_fit

    if args.device not in ("cpu", "cuda") or (
        args.device == "cuda" and not torch.cuda.is_available()
    ):
        raise ValueError(f"--device: cpu or cuda (when one is present), got {args.device!r}")
    for vocab in args.vocabs:
        check_logits_fit(max(args.rows), vocab, what="--rows / --vocabs", device=args.device)
    torch.set_num_threads(min(args.threads, os.cpu_count() or 1))
    timings = signal_pass_cost(args.rows, args.vocabs, device=args.device, repeats=args.repeats)
    load = os.getloadavg()[0]
    if args.json:
        rows = [
            {**vars(t), "compiled_ratio": t.compiled_ratio, "op_by_op_ratio": t.op_by_op_ratio}
            for t in timings
        ]
        print(json.dumps({"threads": torch.get_num_threads(), "load": load, "results": rows}))
        return 0
    print(
        f"Signal pass, all 11 outputs ({args.device}, {torch.get_num_threads()} thread(s), "
        f"load {load:.2f}), median of {args.repeats} rounds; x = over one log_softmax"
    )
    print(
        f"{'vocab':>7} {'rows':>5} {'log_softmax ms':>15} {'compiled ms':>12} {'x':>6} "
        f"{'op by op ms':>12} {'x':>6}"
    )
    for t in timings:
        print(
            f"{t.vocab:>7} {t.rows:>5} {t.log_softmax_ms:>15.3f} {t.compiled_ms:>12.3f} "
            f"{t.compiled_ratio:>6.2f} {t.op_by_op_ms:>12.3f} {t.op_by_op_ratio:>6.2f}"
        )
    return 0


def _cmd_bench_serving(args) -> int:
    import httpx

    from ..bench.serving import serving_cost

    model = args.model
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if model is None:
        listed = httpx.get(f"{args.base_url}/v1/models", headers=headers, timeout=60)
        listed.raise_for_status()
        model = listed.json()["data"][0]["id"]
    timings = serving_cost(
        args.base_url,
        model,
        api_key=args.api_key,
        concurrency=tuple(args.concurrency),
        requests=args.requests,
        max_tokens=args.max_tokens,
    )
    if args.json:
        print(json.dumps([vars(t) for t in timings]))
        return 0
    plain = {t.concurrency: t.tokens_per_s for t in timings if t.case == "plain"}
    print(f"Serving, {args.requests} requests x {args.max_tokens} tokens per case")
    print(f"{'concurrency':>11} {'case':<28} {'tokens/s':>9} {'x plain':>8} {'bytes/response':>15}")
    for t in timings:
        ratio = t.tokens_per_s / plain[t.concurrency]
        print(
            f"{t.concurrency:>11} {t.case:<28} {t.tokens_per_s:>9.1f} {ratio:>8.3f} "
            f"{t.bytes_per_response:>15.0f}"
        )
    return 0


def _cmd_bench_vllm(args) -> int:
    from dataclasses import asdict

    from ..bench.vllm import vllm_overhead

    r = vllm_overhead(
        args.model,
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        dtype=args.dtype,
    )
    ratios = {
        "attached_ratio": r.attached_ratio,
        "monitored_ratio": r.monitored_ratio,
        "typical_ratio": r.typical_ratio,
        "same_engine_ratios": r.same_engine_ratios,
    }
    if args.json:
        print(json.dumps({**asdict(r), **ratios}, indent=2))
        return 0
    print(
        f"vLLM ({args.dtype}), {r.prompts} prompts x {r.max_tokens} tokens, median of "
        f"{r.rounds} rounds"
    )
    rows = [
        ("plain engine", "plain", r.plain_tps, 1.0),
        ("attached, none opted in", "attached", r.attached_tps, r.attached_ratio),
        ("attached, all signals", "monitored", r.monitored_tps, r.monitored_ratio),
        ("entropy + logtoku", "typical", r.typical_tps, r.typical_ratio),
    ]
    for label, key, tps, ratio in rows:
        low, high = min(r.runs[key]), max(r.runs[key])
        print(f"  {label:24s} {tps:7.1f} tokens/s ({low:.0f}-{high:.0f})   {ratio:.3f}")
    same_all, same_typical = r.same_engine_ratios
    print(f"  same engine, over none opted in: all {same_all:.3f}, entropy + logtoku ", end="")
    print(f"{same_typical:.3f}")
    return 0


def _cmd_bench_vllm_tokur(args) -> int:
    from dataclasses import asdict

    from ..bench.vllm_tokur import ASKING, tokur_overhead

    def show(r, b):
        if b == args.batch_sizes[0]:
            print(
                f"vLLM + TokUR (M = {r.samples}, {r.dtype}), {r.max_tokens} tokens per "
                f"request, median of {r.rounds} rounds; cost = plain tokens/s over the run's"
            )
        print(f"batch {b}: plain {r.tps[b]['plain']:.1f} tokens/s")
        for mode in ("batched", "sequential"):
            cells = "  ".join(
                f"{asking} asks {r.tps[b][f'{mode}/{asking}']:6.1f} tok/s "
                f"({r.cost(b, f'{mode}/{asking}'):.2f}x)"
                for asking in ASKING
            )
            print(f"  {mode:<10} {cells}")
        line = f"  batched over M passes (all ask): {r.speedup(b):.2f}x faster"
        if r.hf_cost:
            line += (
                f"; transformers' TokUR cost {r.hf_cost[b]:.2f}x plain, batched vLLM's "
                f"{r.cost(b, 'batched/all'):.2f}x ({r.vs_transformers(b):.2f}x of it)"
            )
        print(line, flush=True)

    r = tokur_overhead(
        args.model,
        transformers=not args.no_transformers,
        on_batch=None if args.json else show,
        **flags(args, "batch_sizes", "max_tokens", "rounds", "samples", "dtype"),
    )
    if args.json:
        summary = {
            b: {
                "speedup_vs_passes": r.speedup(b),
                **({"vs_transformers": r.vs_transformers(b)} if r.hf_cost else {}),
            }
            for b in args.batch_sizes
        }
        print(json.dumps({**asdict(r), "summary": summary}, indent=2))
    return 0


def _cmd_bench_calibration(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..experiments.validity import validity

    settings = flags(args, "risk", "delta", "splits", "test_fraction", "score", "seed")
    result = validity(args.run, **settings)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    title = (
        f"Calibrated abstention, {result['splits']} splits of {result['n']} items "
        f"({result['test_fraction']:.0%} test): risk {result['risk']:g}, delta "
        f"{result['delta']:g} (valid in at least {1 - result['delta']:.0%} of splits)"
    )
    table = Table(title=title, title_justify="left")
    for head in ("method", "splits valid", "coverage", "accuracy kept"):
        table.add_column(head, justify="left" if head == "method" else "right")
    for name, m in result["methods"].items():
        acc = m["accuracy_kept"]
        table.add_row(
            name,
            f"{m['valid_fraction']:.0%}",
            f"{m['coverage']:.2f}",
            "n/a" if acc is None else f"{acc:.3f}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"scores chosen: {result['scores_chosen']}; splits with no certified threshold "
        f"(abstain on all): {result['methods']['calibrated']['uncertified_splits']}"
    )
    return 0


#: Each benchmark: its help, its description, its options and what runs it.
_BENCHES = {
    "overhead": (
        "generate with the monitor (all signals) over generate without it",
        "Time greedy generation with and without the uncertainty monitor on the same prompts "
        "in the same run; print seconds per token and the median ratio.",
        _overhead_options,
        _cmd_bench_overhead,
    ),
    "signals": (
        "the signal pass alone: compiled and op by op, over one log_softmax",
        "Time one decoding step's signal pass (every single-pass signal, a kept copy for the "
        "chosen-token ones, the top-20) compiled and op by op, and one torch.log_softmax over "
        "the same random logits, interleaved, at each row count and vocabulary size.",
        _signals_options,
        _cmd_bench_signals,
    ),
    "tokur": (
        "TokUR: plain greedy vs M samples in one forward vs M sequential passes",
        "Time per generated token and peak extra memory of plain greedy decoding, of TokUR "
        "with M samples per step computed in one forward (ours), and of M sequential passes "
        "per step (the official implementation's cost), as ratios to plain greedy.",
        _tokur_options,
        _cmd_bench_tokur,
    ),
    "actions": (
        "each strategy recipe vs plain greedy: time, tokens decoded, answers right",
        "Run every shipped recipe (or --strategies) on a fixed set of questions with known "
        "answers, batched, and plain greedy decoding in the same run; print time and tokens "
        "decoded as ratios to greedy, and how many answers mention the right one.",
        _actions_options,
        _cmd_bench_actions,
    ),
    "vllm": (
        "vLLM throughput: plain vs processor attached vs every request monitored",
        "Two vLLM engines (plain, and with the UncertaintyProcessor); greedy, ignore_eos; "
        "median tokens/s over rounds in rotating order (none opted in, all signals, entropy "
        "+ logtoku); starts not timed.",
        _vllm_options,
        _cmd_bench_vllm,
    ),
    "vllm-tokur": (
        "vLLM throughput with TokUR: plain, batched mode, M passes, and transformers",
        "A plain vLLM engine and two TokUR ones (batched mode: one forward; sequential: M "
        "passes), greedy, ignore_eos, at each batch size: median tokens/s with nobody, every "
        "other request and every request asking for 'tokur'; and the transformers path's "
        "TokUR cost at the same batch. Starts not timed.",
        _vllm_tokur_options,
        _cmd_bench_vllm_tokur,
    ),
    "serving": (
        "a server's cost of traces: bytes per response and tokens/s, JSON vs packed",
        "Against a running tokur-decode serve: completions of --max-tokens tokens (greedy, "
        "ignore_eos), at each concurrency, for plain requests, vLLM's logprobs=5, JSON "
        "traces and packed traces of every signal; tokens/s and bytes per response.",
        _serving_options,
        _cmd_bench_serving,
    ),
    "calibration": (
        "calibrated abstention over repeated splits of an eval run: is the guarantee kept?",
        "Split a labelled eval run at random into calibration and test items --splits times; "
        "calibrate on the first, test on the second. Prints, per method (calibrated, "
        "answering everything, each shipped abstaining recipe), the fraction of splits whose "
        "test error among kept answers is at most --risk (the guarantee: at least 1 - delta), "
        "the coverage and the accuracy among kept answers.",
        _calibration_options,
        _cmd_bench_calibration,
    ),
}
