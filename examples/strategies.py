"""Act on uncertainty: abstain when LogTokU's epistemic uncertainty stays high, and pick
the most self-certain of N sampled answers.

    python examples/strategies.py [--max-new-tokens N]
"""

import argparse

from tokur_decode import generate, load_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    model, tokenizer = load_default()
    questions = ["What is the capital of France?", "Who won the 1937 Tour de France?"]

    result = generate(
        model, tokenizer, questions, strategy="logtoku-abstain", max_new_tokens=args.max_new_tokens
    )
    for question, text, actions in zip(questions, result.texts, result.actions, strict=True):
        print(f"Q: {question}\nA: {text}")
        for event in actions:
            print(
                f"   {event['action']} at token {event['step']}: {event['signal']} "
                f"{event['value']:.3f} > {event['threshold']}"
            )

    best = generate(
        model,
        tokenizer,
        "What is 17 + 25?",
        strategy={
            "name": "small-best-of-n",
            "signals": ["self_certainty"],
            "action": {"type": "best-of-n", "n": 4, "temperature": 0.7, "score": "self_certainty"},
        },
        max_new_tokens=args.max_new_tokens,
    )
    event = best.actions[0][0]
    print(f"\nbest of {event['n']} by mean self-certainty: candidate {event['chosen']}:")
    print(f"   {best.texts[0]}")
    print("   scores:", ", ".join(f"{s:.2f}" for s in event["scores"]))


if __name__ == "__main__":
    main()
