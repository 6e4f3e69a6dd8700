#!/usr/bin/env python3
"""Generates a flow project with N intents and flows (each flow calls a
service and replies with fields of its response), for timing `check`.

usage: bench/generate-project.py N OUTPUT_DIR
"""
import json
import os
import sys


def main() -> None:
    count, out = int(sys.argv[1]), sys.argv[2]
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
                f"    examples: [\"tell me about topic {i}\"]",
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
