"""The fake LLM speaks the OpenAI and Anthropic streaming formats the way the official SDKs read them."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from mitm_sse.fakellm import MODELS, FakeLLMServer, build_reply, serve

pytestmark = pytest.mark.timeout(20)

FAST = 200.0  # speed factor: a ~3 s stream takes ~15 ms

OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer"},
                },
                "required": ["city"],
            },
        },
    }
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": OPENAI_TOOLS[0]["function"]["parameters"],
    }
]


def sse_events(raw: bytes) -> list[tuple[str, str]]:
    """Tiny SSE splitter (LF only, which is what both APIs send): [(event, data)], event defaults to message."""
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), "stream must end at an event boundary"
    out = []
    for block in text.split("\n\n")[:-1]:
        event, data = "message", []
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected line {line!r}")
        out.append((event, "\n".join(data)))
    return out


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(speed=FAST, seed=7) as srv:
        yield srv


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def chat(client: httpx.Client, llm: FakeLLMServer, **body: object) -> httpx.Response:
    body.setdefault("model", "fake-gpt-fast")
    body.setdefault("messages", [{"role": "user", "content": "Say something."}])
    headers = body.pop("headers", None) or {}
    return client.post(llm.url + "/v1/chat/completions", json=body, headers=headers)  # type: ignore[arg-type]


def messages(client: httpx.Client, llm: FakeLLMServer, **body: object) -> httpx.Response:
    body.setdefault("model", "fake-claude")
    body.setdefault("max_tokens", 1024)
    body.setdefault("messages", [{"role": "user", "content": "Say something."}])
    headers = body.pop("headers", None) or {}
    return client.post(llm.url + "/v1/messages", json=body, headers=headers)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ OpenAI


def openai_chunks(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert re.fullmatch(rb"(data: [^\n]+\n\n)+", r.content), "OpenAI sends only data: lines"
    events = sse_events(r.content)
    assert all(e == "message" for e, _ in events)
    assert events[-1][1] == "[DONE]"
    return [json.loads(d) for _, d in events[:-1]]


def test_openai_stream_format(llm: FakeLLMServer, client: httpx.Client) -> None:
    chunks = openai_chunks(chat(client, llm, stream=True))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-") and chunks[0]["model"] == "fake-gpt-fast"
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    first, *content, last = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert content and all(list(c["choices"][0]["delta"]) == ["content"] for c in content)
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    assert text[0].isupper() and text.endswith(".") and "  " not in text


def test_openai_usage_chunk_and_length(llm: FakeLLMServer, client: httpx.Client) -> None:
    r = chat(client, llm, stream=True, stream_options={"include_usage": True}, max_tokens=5)
    chunks = openai_chunks(r)
    *body, usage_chunk = chunks
    assert all("usage" in c and c["usage"] is None for c in body)
    assert usage_chunk["choices"] == []
    u = usage_chunk["usage"]
    content = [c for c in body if c["choices"][0]["delta"].get("content")]
    assert u["completion_tokens"] == len(content) == 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 0
    assert body[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_tool_call_stream(llm: FakeLLMServer, client: httpx.Client) -> None:
    chunks = openai_chunks(chat(client, llm, stream=True, tools=OPENAI_TOOLS))
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    (head,) = first["tool_calls"]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    # Accumulate as the SDK does: by tool-call index, concatenating argument fragments.
    args = ""
    for c in chunks[1:-1]:
        (tc,) = c["choices"][0]["delta"]["tool_calls"]
        assert tc["index"] == 0 and set(tc) == {"index", "function"}
        args += tc["function"]["arguments"]
    assert len(chunks) > 4  # arguments arrive in several fragments
    parsed = json.loads(args)
    assert set(parsed) == {"city", "unit", "days"} and parsed["unit"] in ("celsius", "fahrenheit")
    assert isinstance(parsed["days"], int)
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


def test_openai_answers_text_after_tool_result(llm: FakeLLMServer, client: httpx.Client) -> None:
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    chunks = openai_chunks(chat(client, llm, stream=True, tools=OPENAI_TOOLS, messages=msgs))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    chunks = openai_chunks(chat(client, llm, stream=True, tools=OPENAI_TOOLS, tool_choice="none"))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_non_streaming_matches_stream(llm: FakeLLMServer, client: httpx.Client) -> None:
    seed = {"x-fakellm-seed": "42"}
    streamed = openai_chunks(chat(client, llm, stream=True, headers=seed))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed)
    r = chat(client, llm, headers=seed)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"] == streamed[0]["id"]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == text
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 0
    tool = chat(client, llm, tools=OPENAI_TOOLS).json()["choices"][0]
    assert tool["finish_reason"] == "tool_calls" and tool["message"]["content"] is None
    json.loads(tool["message"]["tool_calls"][0]["function"]["arguments"])


def test_openai_seed_field_is_used(llm: FakeLLMServer, client: httpx.Client) -> None:
    a = chat(client, llm, seed=5)
    b = chat(client, llm, seed=5)
    assert a.headers["x-fakellm-seed"] == "5"
    assert a.json()["choices"] == b.json()["choices"]


# ------------------------------------------------------------------------------------------------ Anthropic


def anthropic_events(r: httpx.Response) -> list[tuple[str, dict]]:
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert re.fullmatch(rb"(event: [a-z_]+\ndata: [^\n]+\n\n)+", r.content)
    out = []
    for name, data in sse_events(r.content):
        obj = json.loads(data)
        assert obj["type"] == name  # the SDK dispatches on the event name, and checks data.type
        out.append((name, obj))
    return out


def test_anthropic_stream_format(llm: FakeLLMServer, client: httpx.Client) -> None:
    events = anthropic_events(messages(client, llm, stream=True))
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    msg = events[0][1]["message"]
    assert msg["id"].startswith("msg_") and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == "fake-claude" and msg["content"] == [] and msg["stop_reason"] is None
    assert msg["usage"]["input_tokens"] > 0 and msg["usage"]["output_tokens"] == 1
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert b'data: {"type": "ping"}\n' in messages(client, llm, stream=True).content
    text = ""
    for _, e in events[3:-3]:
        assert e["index"] == 0 and e["delta"]["type"] == "text_delta"
        text += e["delta"]["text"]
    assert text[0].isupper() and text.endswith(".")
    md = events[-2][1]
    assert md["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert md["usage"]["output_tokens"] >= len(events) - 6  # deltas carry 1-4 tokens each


def test_anthropic_tool_use_stream(llm: FakeLLMServer, client: httpx.Client) -> None:
    events = anthropic_events(messages(client, llm, stream=True, tools=ANTHROPIC_TOOLS))
    blocks: dict[int, dict] = {}
    partial: dict[int, str] = {}
    stop_reason = None
    for name, e in events:  # accumulate as the SDK's MessageStream does
        if name == "content_block_start":
            blocks[e["index"]] = dict(e["content_block"])
            partial[e["index"]] = ""
        elif name == "content_block_delta":
            d = e["delta"]
            if d["type"] == "text_delta":
                blocks[e["index"]]["text"] += d["text"]
            else:
                assert d["type"] == "input_json_delta"
                partial[e["index"]] += d["partial_json"]
        elif name == "content_block_stop" and blocks[e["index"]]["type"] == "tool_use":
            blocks[e["index"]]["input"] = json.loads(partial[e["index"]])
        elif name == "message_delta":
            stop_reason = e["delta"]["stop_reason"]
    assert [b["type"] for b in blocks.values()] == ["text", "tool_use"]
    assert blocks[0]["text"]
    tool = blocks[1]
    assert tool["id"].startswith("toolu_") and tool["name"] == "get_weather"
    assert set(tool["input"]) == {"city", "unit", "days"}
    assert stop_reason == "tool_use"
    # The first input_json_delta is empty, as the API sends it.
    first_json = next(e for n, e in events if n == "content_block_delta" and e["index"] == 1)
    assert first_json["delta"]["partial_json"] == ""

    after = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    events = anthropic_events(messages(client, llm, stream=True, tools=ANTHROPIC_TOOLS, messages=after))
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_anthropic_max_tokens_non_streaming_and_errors(llm: FakeLLMServer, client: httpx.Client) -> None:
    events = anthropic_events(messages(client, llm, stream=True, max_tokens=3))
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 3

    seed = {"x-fakellm-seed": "9"}
    streamed = anthropic_events(messages(client, llm, stream=True, headers=seed))
    text = "".join(e["delta"]["text"] for n, e in streamed if n == "content_block_delta")
    r = messages(client, llm, headers=seed)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["type"] == "message" and body["content"] == [{"type": "text", "text": text}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["output_tokens"] == streamed[-2][1]["usage"]["output_tokens"]

    bad = client.post(llm.url + "/v1/messages", json={"model": "fake-claude", "messages": []})
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    bad = client.post(llm.url + "/v1/chat/completions", content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------------------------------------ timing


def plan(model: str, seed: int, speed: float = 1.0) -> list[float]:
    path = "/v1/messages" if "claude" in model else "/v1/chat/completions"
    body = {
        "model": model,
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    reply = build_reply("POST", path, {}, json.dumps(body).encode(), seed=seed, speed=speed)
    return [t for t, _ in reply.events]


def test_timing_deterministic_and_scaled() -> None:
    assert plan("fake-gpt", 3) == plan("fake-gpt", 3)
    assert plan("fake-gpt", 3) != plan("fake-gpt", 4)
    slow, fast = plan("fake-gpt", 3), plan("fake-gpt", 3, speed=10)
    assert fast == pytest.approx([t / 10 for t in slow])
    assert all(b >= a for a, b in zip(slow, slow[1:], strict=False))  # schedule never goes back


@pytest.mark.parametrize("model", sorted(MODELS))
def test_timing_follows_model_profile(model: str) -> None:
    prof = MODELS[model]
    for seed in range(20):
        t = plan(model, seed)
        n_head, n_tail = (1, 2) if prof.provider == "openai" else (3, 3)  # lifecycle events around the text
        head, first = t[0], t[n_head]
        assert prof.head_ms[0] / 1000 <= head <= prof.head_ms[1] / 1000
        assert prof.ttft_ms[0] / 1000 <= first <= prof.ttft_ms[1] / 1000
        content = t[n_head : len(t) - n_tail]
        gaps = [b - a for a, b in zip(content, content[1:], strict=False)]
        assert min(gaps) >= prof.itl_ms[0] / 1000 - 1e-9
        assert max(gaps) <= prof.itl_ms[1] * 6 / 1000 + 1e-9  # rare hiccups are at most 6x


def test_slow_model_is_slower() -> None:
    def ttft(model: str) -> float:
        return sum(plan(model, s)[1] for s in range(10))

    assert ttft("fake-gpt-slow") > ttft("fake-gpt") > ttft("fake-gpt-fast")


def test_wire_timing_follows_plan(client: httpx.Client) -> None:
    speed = 20.0  # fake-gpt-fast: ~15 ms to first token, ~1 ms gaps: long enough to see, short enough to wait
    with FakeLLMServer(speed=speed) as srv:
        body = {"model": "fake-gpt-fast", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        expected = build_reply(
            "POST", "/v1/chat/completions", {}, json.dumps(body).encode(), seed=11, speed=speed
        ).events
        t0 = time.monotonic()
        arrivals = []
        with client.stream(
            "POST", srv.url + "/v1/chat/completions", json=body, headers={"x-fakellm-seed": "11"}
        ) as r:
            for raw in r.iter_raw():
                arrivals.append((time.monotonic() - t0, raw))
    assert b"".join(a for _, a in arrivals).count(b"data: ") == len(expected)
    first_content = next(t for t, raw in arrivals if b'"content":"' in raw and b'"content":""' not in raw)
    planned = expected[1][0]
    assert planned - 0.002 <= first_content <= planned + 0.25
    assert arrivals[-1][0] >= expected[-1][0] - 0.002


# ------------------------------------------------------------------------------------------------ server


def test_models_health_404_and_keepalive(llm: FakeLLMServer, client: httpx.Client) -> None:
    ids = [m["id"] for m in client.get(llm.url + "/v1/models").json()["data"]]
    assert {"fake-gpt-fast", "fake-gpt-slow", "fake-claude"} <= set(ids)
    assert client.get(llm.url + "/health").status_code == 200
    assert client.post(llm.url + "/v1/nope", json={}).status_code == 404
    assert client.get(llm.url + "/v1/chat/completions").status_code == 405
    assert llm.url.startswith("http://127.0.0.1:")
    assert any(r["path"] == "/v1/models" for r in llm.requests)


def test_unknown_model_name_is_echoed(llm: FakeLLMServer, client: httpx.Client) -> None:
    chunks = openai_chunks(chat(client, llm, model="gpt-4o-mini", stream=True))
    assert chunks[0]["model"] == "gpt-4o-mini"


def test_abort_after(llm: FakeLLMServer) -> None:
    got = b""
    with httpx.Client(timeout=5) as c, pytest.raises(httpx.TransportError):
        with c.stream(
            "POST",
            llm.url + "/v1/chat/completions",
            json={"model": "fake-gpt-fast", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            headers={"x-fakellm-abort-after": "3"},
        ) as r:
            for raw in r.iter_raw():
                got += raw
    assert got.count(b"data: ") == 3


def test_concurrent_streams_run_in_parallel() -> None:
    # ~0.2 s per stream at speed 2: serialised, 10 streams would take ~2 s.
    with FakeLLMServer(speed=2) as srv:
        body = {
            "model": "fake-gpt-fast",
            "stream": True,
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "x"}],
        }
        clients = [httpx.Client(timeout=10) for _ in range(10)]  # built up front: not part of the timing
        start = threading.Barrier(len(clients))
        results: list[float] = []

        def one(c: httpx.Client) -> None:
            start.wait(5)
            t = time.monotonic()
            r = c.post(srv.url + "/v1/chat/completions", json=body)
            assert r.content.endswith(b"data: [DONE]\n\n")
            results.append(time.monotonic() - t)

        threads = [threading.Thread(target=one, args=(c,)) for c in clients]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        wall = time.monotonic() - t0
        for c in clients:
            c.close()
    assert len(results) == 10
    assert wall < sum(results) / 3  # overlapped, not one after another


def test_serve_on_existing_loop() -> None:
    async def run() -> bytes:
        server = await serve(speed=FAST, seed=1)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = json.dumps(
                {
                    "model": "fake-claude",
                    "max_tokens": 5,
                    "stream": True,
                    "messages": [{"role": "user", "content": "x"}],
                }
            ).encode()
            writer.write(
                b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return data
        finally:
            server.close()

    data = asyncio.run(run())
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in data
    assert data.endswith(b"0\r\n\r\n") and b"event: message_stop" in data


def test_cli_runs() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mitm_sse.fakellm", "--port", "0", "--speed", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        r = httpx.post(
            f"http://127.0.0.1:{m.group(1)}/v1/chat/completions",
            json={"model": "fake-gpt-fast", "messages": [{"role": "user", "content": "hi"}]},
            timeout=5,
        )
        assert r.json()["object"] == "chat.completion"
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
