"""A local LLM-like streaming server for the demo, the tests and the benchmarks (stdlib only).

It speaks the two wire formats most streaming clients use, shaped like the real APIs:

* OpenAI Chat Completions: ``POST /v1/chat/completions`` (``stream: true`` gives ``chat.completion.chunk`` SSE
  ending with ``data: [DONE]``; usage chunk with ``stream_options.include_usage``; tool calls when ``tools``
  are given and the last message is not a tool result).
* Anthropic Messages: ``POST /v1/messages`` (``message_start`` … ``message_stop``; a text block, then a
  ``tool_use`` block with ``input_json_delta`` fragments when ``tools`` are given).

Non-streaming requests get the JSON body after the whole simulated generation time. ``GET /v1/models`` lists
the models. Timing is realistic (time to headers, time to first token, per-token gaps with jitter and rare
hiccups) and deterministic: the same seed gives the same text, ids and schedule. Seed per request: header
``x-fakellm-seed``, else the OpenAI ``seed`` field, else derived from the server seed and a request counter.
Other per-request headers: ``x-fakellm-speed`` (scale delays), ``x-fakellm-abort-after: N`` (TCP reset after
N SSE events, to simulate an upstream fault).

    python -m mitm_sse.fakellm --port 8765 [--speed 1] [--seed 0]

    with FakeLLMServer(speed=50) as srv:          # or: port = srv.start(); …; srv.stop()
        httpx.post(srv.url + "/v1/chat/completions", json={...})
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import math
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODELS",
    "FakeLLMServer",
    "ModelProfile",
    "Reply",
    "build_reply",
    "main",
    "serve",
]


# --------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelProfile:
    """Timing and size of a fake model. Ranges are (low, high), sampled uniformly per request/token."""

    name: str
    provider: str  # "openai" | "anthropic": the format used when the model is asked for by name
    head_ms: tuple[float, float]  # request -> response headers (and lifecycle events)
    ttft_ms: tuple[float, float]  # request -> first content token
    itl_ms: tuple[float, float]  # gap between content deltas
    tokens: tuple[int, int]  # output length when max_tokens does not cut it
    tokens_per_delta: tuple[int, int] = (1, 1)  # Anthropic batches a few tokens per text_delta
    hiccup_p: float = 0.02  # chance that a gap is 3-6x longer: real streams have a tail
    description: str = ""


MODELS: dict[str, ModelProfile] = {
    m.name: m
    for m in [
        ModelProfile(
            "fake-gpt-fast", "openai", (40, 120), (150, 350), (8, 25), (40, 90), description="small, fast"
        ),
        ModelProfile("fake-gpt", "openai", (80, 200), (200, 600), (20, 60), (40, 120), description="default"),
        ModelProfile(
            "fake-gpt-slow", "openai", (150, 400), (600, 1500), (50, 120), (30, 80), description="big, slow"
        ),
        ModelProfile(
            "fake-claude",
            "anthropic",
            (100, 250),
            (300, 700),
            (25, 60),
            (40, 120),
            (1, 4),
            description="default",
        ),
        ModelProfile(
            "fake-claude-fast",
            "anthropic",
            (60, 150),
            (150, 400),
            (10, 30),
            (30, 90),
            (1, 3),
            description="fast",
        ),
    ]
}
_DEFAULT_MODEL = {"openai": "fake-gpt", "anthropic": "fake-claude"}


def _profile(model: str, provider: str) -> ModelProfile:
    # Unknown names (e.g. "gpt-4o" routed here by a mapping) get the endpoint's default timing, echoing the name.
    return MODELS.get(model) or MODELS[_DEFAULT_MODEL[provider]]


WORDS = (
    "the stream of events arrives in order and each token carries a small piece of text while the proxy "
    "records timing latency bytes model server client request response signal river mountain light window "
    "garden quiet bright simple careful measure parse buffer chunk packet network socket thread loop queue "
    "data record replay capture history future answer question reason example detail summary moment value "
    "system memory cache layer format schema table column query result metric sample window token output "
    "input prompt message context first next final steady gentle rapid clear useful exact honest"
).split()


def _json(obj: Any) -> str:
    # Both providers send compact JSON on the wire.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _ident(
    rng: random.Random,
    n: int,
    alphabet: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _tokens(rng: random.Random, n: int) -> list[str]:
    """n word-piece tokens like a BPE stream: leading spaces, capitalised sentence starts, commas, periods."""
    out: list[str] = []
    start = True
    while len(out) < n:  # every pass appends at least one token
        left = n - len(out)
        if not start and (left == 1 or (left > 2 and rng.random() < 0.08)):
            out.append(".")
            start = True
            continue
        w = rng.choice(WORDS)
        out.append((w.capitalize() if start else w) if not out else " " + (w.capitalize() if start else w))
        start = False
        if left > 3 and rng.random() < 0.04:
            out.append(",")
    return out


def _group(rng: random.Random, toks: list[str], per: tuple[int, int]) -> list[str]:
    out, i = [], 0
    while i < len(toks):
        k = rng.randint(per[0], per[1])
        out.append("".join(toks[i : i + k]))
        i += k
    return out


def _json_fragments(rng: random.Random, s: str) -> list[str]:
    """Split a JSON string into token-sized fragments, as tool-call arguments stream."""
    pieces = re.findall(r"[A-Za-z0-9_]+|\s+|[^A-Za-z0-9_\s]{1,2}", s)
    return _group(rng, pieces, (1, 2))


def _fake_value(rng: random.Random, schema: Any, depth: int = 0) -> Any:
    if not isinstance(schema, dict):
        return rng.choice(WORDS)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    if t == "integer":
        return rng.randint(1, 100)
    if t == "number":
        return round(rng.uniform(0, 100), 1)
    if t == "boolean":
        return rng.random() < 0.5
    if t == "array":
        return [_fake_value(rng, schema.get("items"), depth + 1) for _ in range(rng.randint(1, 2))]
    if t == "object" or "properties" in schema:
        if depth > 3:
            return {}
        props = schema.get("properties") or {}
        return {k: _fake_value(rng, v, depth + 1) for k, v in list(props.items())[:8]}
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))


def _count_tokens(obj: Any) -> int:
    # ~4 characters per token, like the usual rule of thumb; only has to be stable and plausible.
    return max(1, len(_json(obj)) // 4)


# --------------------------------------------------------------------------------------------- replies


@dataclass
class Reply:
    """A planned response. Offsets are seconds after the request arrived, already divided by `speed`."""

    status: int
    headers: list[tuple[str, str]]
    head_at: float = 0.0
    events: list[tuple[float, bytes]] = field(default_factory=list)  # streaming: SSE blocks
    body: bytes | None = None  # non-streaming: sent whole at head_at
    abort_after: int | None = None
    seed: int = 0


class _Clock:
    """Accumulates the sampled schedule and scales it by `speed` (inf = no delays)."""

    def __init__(self, rng: random.Random, prof: ModelProfile, speed: float) -> None:
        self.rng, self.prof, self.speed = rng, prof, speed
        self.head = rng.uniform(*prof.head_ms) / 1000
        self.t = max(self.head, rng.uniform(*prof.ttft_ms) / 1000)

    def scaled(self, t: float) -> float:
        return 0.0 if math.isinf(self.speed) else t / self.speed

    def next_gap(self) -> float:
        gap = self.rng.uniform(*self.prof.itl_ms) / 1000
        if self.rng.random() < self.prof.hiccup_p:
            gap *= self.rng.uniform(3, 6)
        self.t += gap
        return self.t


def _error(provider: str, status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    if provider == "anthropic":
        body = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return Reply(status, [("content-type", "application/json")], body=_json(body).encode())


def _max_tokens(req: dict, *keys: str) -> int | None:
    for k in keys:
        v = req.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _openai(req: dict, rng: random.Random, seed: int, speed: float) -> Reply:
    model = str(req.get("model") or "fake-gpt")
    prof = _profile(model, "openai")
    clock = _Clock(rng, prof, speed)
    cid = "chatcmpl-" + _ident(rng, 29)
    fingerprint = "fp_" + _ident(rng, 10, "0123456789abcdef")
    created = int(time.time())
    messages = req.get("messages") if isinstance(req.get("messages"), list) else []
    prompt_tokens = _count_tokens(messages) + _count_tokens(req.get("tools") or [])

    tools = [
        t for t in (req.get("tools") or []) if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    choice = req.get("tool_choice")
    last_role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
    call = None
    if tools and choice != "none" and last_role != "tool":
        tool = tools[0]
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            tool = next((t for t in tools if t["function"].get("name") == wanted), tool)
        fn = tool["function"]
        args = _json(_fake_value(rng, fn.get("parameters") or {"type": "object", "properties": {}}))
        call = {"id": "call_" + _ident(rng, 24), "name": str(fn.get("name", "tool")), "args": args}

    limit = _max_tokens(req, "max_completion_tokens", "max_tokens")
    if call is not None:
        frags = _json_fragments(rng, call["args"])
        deltas: list[str] = frags
        completion_tokens = len(frags) + 6
        finish = "tool_calls"
    else:
        n = rng.randint(*prof.tokens)
        finish = "stop"
        if limit is not None and limit < n:
            n, finish = limit, "length"
        deltas = _tokens(rng, n)
        completion_tokens = len(deltas)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    headers = [("x-request-id", "req_" + _ident(rng, 32, "0123456789abcdef")), ("openai-model", model)]

    if not req.get("stream"):
        times = [clock.t] + [clock.next_gap() for _ in deltas[1:]]
        message: dict[str, Any] = {"role": "assistant", "content": None if call else "".join(deltas)}
        if call:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["args"]},
                }
            ]
        message["refusal"] = None
        message["annotations"] = []
        body = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
        }
        return Reply(
            200,
            [("content-type", "application/json"), *headers],
            head_at=clock.scaled(times[-1]),
            body=_json(body).encode(),
            seed=seed,
        )

    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            obj["usage"] = None  # present (null) on every chunk but the last when usage is asked for
        return f"data: {_json(obj)}\n\n".encode()

    events: list[tuple[float, bytes]] = []
    if call is None:
        # The role-only delta leaves with the headers, before any text: a client timing the first chunk
        # instead of the first content gets a near-zero "TTFT" (the gateway bug the metrics avoid).
        events.append((clock.head, chunk({"role": "assistant", "content": "", "refusal": None})))
        for i, d in enumerate(deltas):
            events.append((clock.t if i == 0 else clock.next_gap(), chunk({"content": d})))
    else:
        head = {
            "index": 0,
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        events.append(
            (clock.t, chunk({"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}))
        )
        for d in deltas:
            events.append(
                (clock.next_gap(), chunk({"tool_calls": [{"index": 0, "function": {"arguments": d}}]}))
            )
    end = events[-1][0]
    events.append((end, chunk({}, finish)))
    if include_usage:
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": fingerprint,
            "choices": [],
            "usage": usage,
        }
        events.append((end, f"data: {_json(obj)}\n\n".encode()))
    events.append((end, b"data: [DONE]\n\n"))
    return Reply(
        200,
        [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"), *headers],
        head_at=clock.scaled(clock.head),
        events=[(clock.scaled(t), b) for t, b in events],
        seed=seed,
    )


def _has_tool_result(msg: Any) -> bool:
    content = msg.get("content") if isinstance(msg, dict) else None
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


def _anthropic(req: dict, rng: random.Random, seed: int, speed: float) -> Reply:
    model = str(req.get("model") or "fake-claude")
    prof = _profile(model, "anthropic")
    if not isinstance(req.get("messages"), list) or not req["messages"]:
        return _error("anthropic", 400, "messages: field required")
    max_tokens = _max_tokens(req, "max_tokens")
    if max_tokens is None:
        return _error("anthropic", 400, "max_tokens: field required")
    clock = _Clock(rng, prof, speed)
    mid = "msg_01" + _ident(rng, 22)
    messages = req["messages"]
    input_tokens = (
        _count_tokens(messages)
        + _count_tokens(req.get("system") or "")
        + _count_tokens(req.get("tools") or [])
    )

    tools = [t for t in (req.get("tools") or []) if isinstance(t, dict) and t.get("name")]
    choice = req.get("tool_choice") if isinstance(req.get("tool_choice"), dict) else {}
    call = None
    if tools and choice.get("type") != "none" and not _has_tool_result(messages[-1]):
        tool = next((t for t in tools if t["name"] == choice.get("name")), tools[0])
        args = _json(_fake_value(rng, tool.get("input_schema") or {"type": "object", "properties": {}}))
        call = {"id": "toolu_01" + _ident(rng, 22), "name": str(tool["name"]), "args": args}

    # Claude usually says a few words before a tool call: a text block at index 0, tool_use at index 1.
    n = rng.randint(4, 10) if call else rng.randint(*prof.tokens)
    stop_reason = "tool_use" if call else "end_turn"
    if max_tokens < n:
        n, stop_reason, call = max_tokens, "max_tokens", None
    toks = _tokens(rng, n)
    text_deltas = _group(rng, toks, prof.tokens_per_delta)
    frags = _json_fragments(rng, call["args"]) if call else []
    output_tokens = len(toks) + (len(frags) + 6 if call else 0)
    headers = [("request-id", "req_01" + _ident(rng, 22)), ("anthropic-organization-id", "fake-org")]
    base_usage = {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }

    if not req.get("stream"):
        t_end = clock.t
        for _ in range(len(text_deltas) + len(frags) - 1):
            t_end = clock.next_gap()
        content: list[dict[str, Any]] = [{"type": "text", "text": "".join(toks)}]
        if call:
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": call["name"],
                    "input": json.loads(call["args"]),
                }
            )
        body = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**base_usage, "output_tokens": output_tokens},
        }
        return Reply(
            200,
            [("content-type", "application/json"), *headers],
            head_at=clock.scaled(t_end),
            body=_json(body).encode(),
            seed=seed,
        )

    def ev(name: str, data: dict | str) -> bytes:
        return f"event: {name}\ndata: {data if isinstance(data, str) else _json(data)}\n\n".encode()

    message = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**base_usage, "output_tokens": 1},
    }
    h = clock.head
    events: list[tuple[float, bytes]] = [
        (h, ev("message_start", {"type": "message_start", "message": message})),
        (
            h,
            ev(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ),
        # The API writes its ping with a space after the colon, unlike every other event.
        (h, ev("ping", '{"type": "ping"}')),
    ]
    for i, d in enumerate(text_deltas):
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": d}}
        events.append((clock.t if i == 0 else clock.next_gap(), ev("content_block_delta", delta)))
    t = events[-1][0]
    events.append((t, ev("content_block_stop", {"type": "content_block_stop", "index": 0})))
    if call:
        block = {"type": "tool_use", "id": call["id"], "name": call["name"], "input": {}}
        t = clock.next_gap()
        events.append(
            (
                t,
                ev(
                    "content_block_start", {"type": "content_block_start", "index": 1, "content_block": block}
                ),
            )
        )
        pieces = ["", *frags]  # the API opens with an empty partial_json
        for i, frag in enumerate(pieces):
            delta = {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": frag},
            }
            events.append((t if i == 0 else clock.next_gap(), ev("content_block_delta", delta)))
        t = events[-1][0]
        events.append((t, ev("content_block_stop", {"type": "content_block_stop", "index": 1})))
    md = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }
    events.append((t, ev("message_delta", md)))
    events.append((t, ev("message_stop", {"type": "message_stop"})))
    return Reply(
        200,
        [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"), *headers],
        head_at=clock.scaled(h),
        events=[(clock.scaled(x), b) for x, b in events],
        seed=seed,
    )


def _models() -> Reply:
    data = [
        {"id": m.name, "object": "model", "created": 1700000000, "owned_by": "fakellm"}
        for m in MODELS.values()
    ]
    return Reply(
        200, [("content-type", "application/json")], body=_json({"object": "list", "data": data}).encode()
    )


def build_reply(
    method: str, path: str, headers: Mapping[str, str], body: bytes, *, seed: int, speed: float = 1.0
) -> Reply:
    """Plan the whole response to one request (pure: no I/O, no sleeping).

    `headers` keys must be lower-case. `seed` is the fallback per-request seed; `x-fakellm-seed` and the OpenAI
    `seed` field override it.
    """
    route = path.split("?", 1)[0].rstrip("/")
    if route in ("/v1/chat/completions", "/chat/completions"):
        provider = "openai"
    elif route in ("/v1/messages", "/messages"):
        provider = "anthropic"
    elif route in ("/v1/models", "/models") and method == "GET":
        return _models()
    elif route in ("", "/health") and method == "GET":
        return Reply(200, [("content-type", "text/plain")], body=b"fakellm ok\n")
    else:
        return _error("openai", 404, f"Unknown request URL: {method} {path}.")
    if method != "POST":
        return _error(provider, 405, f"Method {method} not allowed.")
    try:
        req = json.loads(body or b"null")
    except ValueError:
        req = None
    if not isinstance(req, dict):
        return _error(provider, 400, "We could not parse the JSON body of your request.")
    if "x-fakellm-seed" in headers:
        with contextlib.suppress(ValueError):
            seed = int(headers["x-fakellm-seed"])
    elif provider == "openai" and isinstance(req.get("seed"), int):
        seed = req["seed"]
    if "x-fakellm-speed" in headers:
        with contextlib.suppress(ValueError):
            speed = float(headers["x-fakellm-speed"])
    if not speed > 0:
        return _error(provider, 400, "x-fakellm-speed must be > 0")
    rng = random.Random(seed)
    if provider == "openai" and not req.get("messages"):
        return _error(provider, 400, "Missing required parameter: 'messages'.")
    reply = (_openai if provider == "openai" else _anthropic)(req, rng, seed, speed)
    if "x-fakellm-abort-after" in headers:
        with contextlib.suppress(ValueError):
            reply.abort_after = int(headers["x-fakellm-abort-after"])
    reply.headers.append(("x-fakellm-seed", str(seed)))
    return reply


# --------------------------------------------------------------------------------------------- HTTP/1.1


MAX_BODY = 32 * 1024 * 1024
MAX_REQUESTS_PER_CONN = 10_000
IDLE_TIMEOUT = 75.0  # keep-alive idle limit: SDK pools reuse connections for a while


class _Handler:
    def __init__(self, speed: float, seed: int, on_request: Callable[[dict], None] | None) -> None:
        self.speed, self.seed, self.on_request = speed, seed, on_request
        self.counter = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # One SSE event per TCP segment, sent when planned, not when Nagle decides.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for _ in range(MAX_REQUESTS_PER_CONN):
                if not await self._one(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str, dict[str, str], bytes] | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None
        except TimeoutError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            for _ in range(1_000_000):
                size = int(
                    (await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT)).split(b";")[0], 16
                )
                if size == 0:
                    for _ in range(100):  # trailers
                        if await asyncio.wait_for(reader.readuntil(b"\r\n"), IDLE_TIMEOUT) == b"\r\n":
                            break
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                parts.append((await asyncio.wait_for(reader.readexactly(size + 2), IDLE_TIMEOUT))[:-2])
            body = b"".join(parts)
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if n > MAX_BODY:
                raise ValueError("body too large")
            body = await asyncio.wait_for(reader.readexactly(n), IDLE_TIMEOUT)
        return method, path, headers, body

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        got = await self._read_request(reader, writer)
        if got is None:
            return False
        method, path, headers, body = got
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.counter += 1
        # Distinct, reproducible seeds per request: same server seed and request order -> same replies.
        reply = build_reply(
            method, path, headers, body, seed=self.seed * 1_000_003 + self.counter, speed=self.speed
        )
        if self.on_request is not None:
            self.on_request({"method": method, "path": path, "status": reply.status, "seed": reply.seed})
        keep = headers.get("connection", "").lower() != "close"

        async def until(offset: float) -> None:
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # absolute schedule: no drift accumulates over long streams

        await until(reply.head_at)
        hdrs = list(reply.headers)
        if reply.body is not None:
            hdrs.append(("content-length", str(len(reply.body))))
        else:
            hdrs.append(("transfer-encoding", "chunked"))
        if not keep:
            hdrs.append(("connection", "close"))
        try:
            phrase = http.HTTPStatus(reply.status).phrase
        except ValueError:
            phrase = ""
        head = f"HTTP/1.1 {reply.status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
        if reply.body is not None:
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else reply.body))
            await writer.drain()
            return keep
        writer.write(head.encode("latin-1"))
        await writer.drain()
        for i, (offset, data) in enumerate(reply.events):
            if reply.abort_after is not None and i >= reply.abort_after:
                # A reset, not a clean end: what an upstream crash looks like to the proxy.
                if sock := writer.get_extra_info("socket"):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return False
            await until(offset)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    speed: float = 1.0,
    seed: int = 0,
    on_request: Callable[[dict], None] | None = None,
) -> asyncio.Server:
    """Start the fake LLM on the running loop; returns the started `asyncio.Server` (close it when done).

    The bound port is `server.sockets[0].getsockname()[1]`. `on_request` is called (on the loop) once per
    request with {method, path, status, seed}.
    """
    if not speed > 0:
        raise ValueError("speed must be > 0 (use math.inf for no delays)")
    return await asyncio.start_server(_Handler(speed, seed, on_request), host, port)


class FakeLLMServer:
    """The fake LLM on its own asyncio loop in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, speed: float = 1.0, seed: int = 0) -> None:
        if not speed > 0:
            raise ValueError("speed must be > 0 (use math.inf for no delays)")
        self.host, self.port, self.speed, self.seed = host, port, speed, seed
        self.requests: list[dict] = []  # {method, path, status, seed} per request, in arrival order
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 5.0) -> int:
        """Start serving in a background thread; returns the bound port."""
        if self._thread is not None:
            return self.port
        self._thread = threading.Thread(target=self._run, name="FakeLLMServer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("FakeLLMServer did not start in time")
        if self._error is not None:
            raise RuntimeError("FakeLLMServer failed to start") from self._error
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Stop and cut open streams; returns within about `timeout` seconds."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> FakeLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        conns: set[asyncio.Task[Any]] = set()
        handler = _Handler(self.speed, self.seed, self.requests.append)

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            conns.add(task)
            try:
                await handler(reader, writer)
            except asyncio.CancelledError:
                writer.transport.abort()
            finally:
                conns.discard(task)

        server = await asyncio.start_server(tracked, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for t in list(conns):
                t.cancel()
            if conns:
                await asyncio.wait(list(conns), timeout=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mitm_sse.fakellm", description="Local LLM-like SSE server.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (0 = any free port; default 8765)")
    p.add_argument("--speed", type=float, default=1.0, help="divide every delay by this (default 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed for the per-request seeds (default 0)")
    args = p.parse_args(argv)

    async def run() -> None:
        server = await serve(args.host, args.port, speed=args.speed, seed=args.seed)
        port = server.sockets[0].getsockname()[1]
        print(
            f"fakellm listening on http://{args.host}:{port}  (speed {args.speed}, seed {args.seed})",
            flush=True,
        )
        print("  POST /v1/chat/completions   OpenAI format", flush=True)
        print("  POST /v1/messages           Anthropic format", flush=True)
        for m in MODELS.values():
            print(
                f"  {m.name:17} {m.provider:9} ttft {m.ttft_ms[0]:.0f}-{m.ttft_ms[1]:.0f} ms, "
                f"gap {m.itl_ms[0]:.0f}-{m.itl_ms[1]:.0f} ms  {m.description}",
                flush=True,
            )
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
