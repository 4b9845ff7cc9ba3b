"""`mitm-sse replay --validate`: record through a real proxy, then compare with a (changed) live upstream."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from mitm_sse.validate import compare, fill_secrets, replay_cmd, shape_of
from tests.proxy import Mitmdump
from tests.servers import ScriptedServer, sse_event

pytestmark = pytest.mark.timeout(60)


def _chat(texts: list[str], extra: dict | None = None) -> list[tuple[float, bytes]]:
    out = [
        (
            0.0,
            sse_event(
                json.dumps({"type": "message_start", "message": {"id": "m1", "model": "x"}}), "message_start"
            ),
        )
    ]
    for t in texts:
        delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}, **(extra or {})}
        out.append((0.005, sse_event(json.dumps(delta), "content_block_delta")))
    out.append((0.005, sse_event(json.dumps({"type": "message_stop"}), "message_stop")))
    return out


RECORDED = {
    "/v1/chat": (200, None, _chat(["Hel", "lo"])),
    "/v1/other": (200, None, _chat(["a"])),
    "/v1/json": (200, {"content-type": "application/json"}, [(0, b'{"id": "x", "items": [1, 2]}')]),
}
LIVE = {
    "/v1/chat": (200, None, _chat(["Good", "bye", " now"])),  # other text, more deltas: same shape
    "/v1/other": (200, None, _chat(["a"], {"index": 0})),  # a new field
    "/v1/json": (500, {"content-type": "application/json"}, [(0, b'{"error": "gone"}')]),
}


def test_shape_compare_unit():
    a = shape_of(200, [("m", '{"a": 1, "b": null}'), ("m", '{"a": 2, "b": "x"}'), ("done", "[DONE]")])
    b = shape_of(200, [("m", '{"a": 5, "b": "y"}'), ("done", "[DONE]")])
    assert a.events == ["m", "done"] and compare(a, b) == []
    c = shape_of(200, [("m", '{"a": "str"}'), ("x", "{}")])
    diffs = compare(a, c)
    assert any("event types" in d for d in diffs) and any("a is string" in d for d in diffs)
    assert any("fields gone: b" in d for d in diffs)


def test_secrets_never_sent_redacted():
    url, h = fill_secrets(
        "http://h/p?key=[REDACTED]&q=1",
        {"authorization": "[REDACTED]", "accept": "text/event-stream", "content-length": "3"},
        {},
        {"key": "K"},
        {"MITM_SSE_HEADER_AUTHORIZATION": "Bearer env"},
    )
    assert url == "http://h/p?key=K&q=1" and h == {
        "authorization": "Bearer env",
        "accept": "text/event-stream",
    }
    with pytest.raises(Exception, match="MITM_SSE_HEADER_X_API_KEY"):
        fill_secrets("http://h/", {"x-api-key": "[REDACTED]"}, {}, {}, {})
    url, h = fill_secrets(
        "http://h/?key=[REDACTED]", {"x-api-key": "[REDACTED]"}, {}, {}, {}, drop_redacted=True
    )
    assert url == "http://h/" and h == {}


def test_validate_against_live_upstream(tmp_path, monkeypatch):
    with ScriptedServer("h1-chunked", routes=RECORDED, script=None) as old:
        with Mitmdump(tmp_path, script="record", options={"sse_record": "all"}) as proxy:
            with httpx.Client(proxy=proxy.url, trust_env=False, timeout=10) as c:
                auth = {"authorization": "Bearer sk-recorded"}
                c.post(f"{old.url}/v1/chat?key=SECRET", json={"model": "x", "stream": True}, headers=auth)
                c.get(f"{old.url}/v1/other")
                c.get(f"{old.url}/v1/json")
            proxy.wait_for(
                "SELECT count(*) FROM streams WHERE end_reason IS NOT NULL", lambda r: r[0][0] == 3
            )
        old_base = old.url
    with ScriptedServer("h1-chunked", routes=LIVE, script=None) as live:
        args = ["--validate", "--dir", str(proxy.sse_dir), "--map-url", f"{old_base}={live.url}", "--json"]
        # No secret given: the chat stream is skipped, never sent with "[REDACTED]".
        monkeypatch.delenv("MITM_SSE_HEADER_AUTHORIZATION", raising=False)
        res = CliRunner().invoke(replay_cmd, args)
        assert res.exit_code == 1, res.output
        by = {r["url"].split("?")[0].rsplit("/", 1)[1]: r for r in json.loads(res.output)}
        assert (
            by["chat"]["verdict"] == "skipped"
            and "MITM_SSE_HEADER_AUTHORIZATION" in by["chat"]["differences"][0]
        )
        assert all(r.path.split("?")[0] != "/v1/chat" for r in live.requests)

        monkeypatch.setenv("MITM_SSE_HEADER_AUTHORIZATION", "Bearer sk-live")
        res = CliRunner().invoke(replay_cmd, [*args, "--param", "key=K2"])
        results = json.loads(res.output)
        by = {r["url"].split("?")[0].rsplit("/", 1)[1]: r for r in results}
        assert by["chat"]["verdict"] == "same", by["chat"]
        assert by["other"]["verdict"] == "changed"
        assert any("new fields: index" in d for d in by["other"]["differences"])
        assert by["json"]["verdict"] == "changed" and "status 500 (recorded 200)" in by["json"]["differences"]
        assert "K2" not in json.dumps(results)  # secrets are not echoed in the report
        chat_req = next(r for r in live.requests if r.path.startswith("/v1/chat"))
        assert chat_req.header("authorization") == "Bearer sk-live" and chat_req.path == "/v1/chat?key=K2"
        assert json.loads(chat_req.body) == {"model": "x", "stream": True}
        for r in live.requests:
            assert "REDACTED" not in r.path and all("REDACTED" not in v for _, v in r.headers)
        # the human-readable table
        res = CliRunner().invoke(replay_cmd, [*args[:-1], "--param", "key=K2"])
        assert "1 same" in res.output and "2 changed" in res.output
