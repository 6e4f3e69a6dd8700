#!/usr/bin/env python3
"""Generates a flow project with N intents and flows (each flow calls a
service and replies with fields of its response), for timing `check`.
With --examples K, each intent has K examples (varied sentences over its own
topic words and words shared by all, some with a typo), for timing the
training of the intent model.

usage: bench/generate-project.py N OUTPUT_DIR [--examples K]
"""
import json
import os
import random
import sys

FILLERS = [
    "can you", "i want to", "please", "tell me about", "what about", "i need",
    "could you help with", "show me", "is there", "how do i", "quick question on",
    "hey", "thanks", "i would like", "any news on", "what is",
]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def topic_words(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 9))) for _ in range(count)]


def examples(intent: int, count: int) -> list[str]:
    rng = random.Random(intent)
    topics = topic_words(rng, 6)
    texts = []
    while len(texts) < count:
        words = rng.sample(topics, rng.randint(1, 3))
        if rng.random() < 0.2:
            index = rng.randrange(len(words))
            word = words[index]
            cut = rng.randrange(len(word))
            words[index] = word[:cut] + word[cut + 1:]
        text = " ".join([rng.choice(FILLERS)] + words + ([rng.choice(FILLERS)] if rng.random() < 0.3 else []))
        if text not in texts:
            texts.append(text)
    return texts


def main() -> None:
    count, out = int(sys.argv[1]), sys.argv[2]
    per_intent = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--examples" else 0
    os.makedirs(os.path.join(out, "flows"), exist_ok=True)
    os.makedirs(os.path.join(out, "schemas"), exist_ok=True)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["order_id", "status"],
        "properties": {
            "order_id": {"type": "string"},
            "status": {"type": "string"},
            "eta_minutes": {"type": "integer"},
        },
    }
    with open(os.path.join(out, "schemas", "order.schema.json"), "w") as f:
        json.dump(schema, f, indent=2)
    per_file = 100
    for start in range(0, count, per_file):
        lines = ["intents:"]
        for i in range(start, min(count, start + per_file)):
            lines += [
                f"  intent_{i}:",
                f"    description: The user asks about topic {i}",
                "    examples: " + json.dumps(examples(i, per_intent) if per_intent else [f"tell me about topic {i}"]),
                f"    keywords: [\"topic {i}\", \"subject {i}\"]",
            ]
        lines.append("services:")
        for i in range(start, min(count, start + per_file)):
            lines += [
                f"  service_{i}:",
                f"    url: \"${{SERVICE_{i}_URL:-http://127.0.0.1:9/s{i}}}\"",
                "    timeout: 2s",
                "    retry: { attempts: 2, backoff: 50ms }",
                "    response: { unwrap: first, schema: order.schema.json }",
            ]
        lines.append("flows:")
        for i in range(start, min(count, start + per_file)):
            lines += [
                f"  flow_{i}:",
                f"    intent: intent_{i}",
                "    steps:",
                "      - if: \"not input.items\"",
                "        reply: \"Which items, {{ user_id }}?\"",
                f"        route: flow_{i}_missing",
                "      - id: placed",
                f"        call: service_{i}",
                "        body:",
                "          user_id: \"{{ user_id }}\"",
                "          items: \"{{ input.items }}\"",
                "          trace_id: \"{{ trace_id }}\"",
                "        on_error:",
                "          reply: \"Sorry, {{ error.code }}\"",
                f"          route: flow_{i}_error",
                "      - set: { last_order_id: \"{{ placed.order_id }}\" }",
                "      - reply: |",
                "          Order {{ placed.order_id }} is {{ placed.status }}.",
                "          {%- if placed.eta_minutes %} ETA {{ placed.eta_minutes }} min.{% endif %}",
                f"        route: flow_{i}",
            ]
        with open(os.path.join(out, "flows", f"part_{start // per_file:04}.yaml"), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "flows", "classifier.yaml"), "w") as f:
        f.write("classifier:\n  fallback: intent_0\n")


if __name__ == "__main__":
    main()
