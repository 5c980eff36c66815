"""Monitor a plain `model.generate` call and print every token's uncertainty.

python examples/monitor_generate.py [--max-new-tokens N]
"""

import argparse

import torch

from tokur_decode.hf import UncertaintyMonitor
from tokur_decode.models import load_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_default()
    tokenizer.padding_side = "left"
    questions = ["What is the capital of France?", "How many legs does a spider have?"]
    messages = [[{"role": "user", "content": q}] for q in questions]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )

    # Place the monitor first: it then measures the model's raw distribution.
    monitor = UncertaintyMonitor(
        ["max_prob", "chosen_prob", "entropy", "logtoku"], eos_token_id=tokenizer.eos_token_id
    )
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            logits_processor=[monitor],
            return_dict_in_generate=True,
        )
    trace = monitor.trace(out, tokenizer)

    for question, row, summary in zip(questions, trace, trace.summary(), strict=True):
        print(f"Q: {question}\nA: {row.texts[0]}")
        for token, p, h, eu in zip(
            row.tokens[0],
            row.values("chosen_prob")[0],
            row.values("entropy")[0],
            row.values("logtoku_epistemic")[0],
            strict=True,
        ):
            print(f"  {token!r:>14}  p={p:.3f}  H={h:.3f}  EU={eu:.3f}")
        print(
            f"  naive={summary['naive']:.3f}  mean entropy={summary['mean_entropy']:.3f}  "
            f"LogTokU top-k={summary['logtoku_topk_mean']:.4f}\n"
        )


if __name__ == "__main__":
    main()
