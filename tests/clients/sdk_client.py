"""A client application for the end-to-end tests: the official SDK, streaming, configured only by environment.

Run with the client venv's Python (scripts/install-clients.sh), never the test venv's:
    HTTPS_PROXY=http://127.0.0.1:PORT SSL_CERT_FILE=ca.pem OPENAI_API_KEY=sk-… python sdk_client.py openai [--tools]
Prints one JSON object: {"sdk": version, "text": str, "tool_calls": [{"name", "arguments"}], "chunks": n}.
"""

from __future__ import annotations

import argparse
import json
import sys

TOOL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
PROMPT = "What is the weather like in Lisbon? Answer briefly."


def run_openai(tools: bool) -> dict:
    import openai

    client = openai.OpenAI(max_retries=0, timeout=30)
    kw = {}
    if tools:
        kw["tools"] = [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather", "parameters": TOOL_SCHEMA},
            }
        ]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        **kw,
    )
    text, calls, n = [], {}, 0
    for chunk in stream:
        n += 1
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                text.append(d.content)
            for tc in d.tool_calls or ():
                slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    slot["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
    tool_calls = [
        {"name": c["name"], "arguments": json.loads(c["arguments"])} for _, c in sorted(calls.items())
    ]
    return {"sdk": openai.__version__, "text": "".join(text), "tool_calls": tool_calls, "chunks": n}


def run_anthropic(tools: bool) -> dict:
    import anthropic

    client = anthropic.Anthropic(max_retries=0, timeout=30)
    kw = {}
    if tools:
        kw["tools"] = [{"name": "get_weather", "description": "Weather", "input_schema": TOOL_SCHEMA}]
    text, n = [], 0
    with client.messages.stream(
        model="claude-haiku-4-5",
        max_tokens=512,
        messages=[{"role": "user", "content": PROMPT}],
        **kw,
    ) as stream:
        for event in stream:
            n += 1
            if event.type == "text":
                text.append(event.text)
        final = stream.get_final_message()
    tool_calls = [{"name": b.name, "arguments": b.input} for b in final.content if b.type == "tool_use"]
    final_text = "".join(b.text for b in final.content if b.type == "text")
    assert final_text == "".join(text), "streamed text differs from the SDK's final message"
    return {"sdk": anthropic.__version__, "text": final_text, "tool_calls": tool_calls, "chunks": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("provider", choices=["openai", "anthropic"])
    ap.add_argument("--tools", action="store_true")
    a = ap.parse_args()
    out = run_openai(a.tools) if a.provider == "openai" else run_anthropic(a.tools)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
