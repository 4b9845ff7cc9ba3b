"""Request matching (pure): canonical JSON, ignore syntax, redacted values, replay order, miss explanations."""

from __future__ import annotations

import pytest

from mitm_sse.matching import Index, MatchConfig, Recording, RequestView, parse_ignore
from mitm_sse.mocker import parse_loop, parse_speed


def _rec(sid: str, req: RequestView, t: int = 0) -> Recording:
    return Recording(sid, "", "sse", req, 200, [], None, t, t, t, "complete", None, 1)


def _req(body: bytes = b'{"a": 1, "m": {"u": "x", "k": 2}}', query: str = "", **kw) -> RequestView:
    d = dict(
        method="POST", host="api.example.com", port=443, path="/v1/chat", query=query, body=body, headers={}
    )
    d.update(kw)
    return RequestView(**d)


def test_parse_ignore():
    spec = parse_ignore("metadata.user_id, body:messages.*.id, query:ts, header:X-Request-Id")
    assert spec.body_paths == (("metadata", "user_id"), ("messages", "*", "id"))
    assert spec.query == {"ts"} and spec.headers == {"x-request-id"}
    for bad in ("nope:x", "a..b", "query:"):
        with pytest.raises(ValueError):
            parse_ignore(bad)


def test_options_parse():
    assert parse_speed("0") == 0 and parse_speed("0.5") == 0.5 and parse_speed("2") == 2
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(ValueError):
            parse_speed(bad)
    assert parse_loop("off") is None and parse_loop("30") == 30 and parse_loop("forever") == float("inf")


def test_canonical_json_and_ignores():
    cfg = MatchConfig(parse_ignore("m.u,query:ts"), frozenset({"key"}))
    idx = Index(cfg)
    idx.add(_rec("r1", _req(query="ts=1&key=[REDACTED]&b=2")))
    live = _req(body=b'{\n "m": {"k": 2, "u": "other"},\n "a": 1}', query="b=2&key=secret&ts=99")
    assert idx.lookup(live) is not None
    assert idx.lookup(_req(body=b'{"a": 2, "m": {"k": 2}}')) is None
    assert idx.lookup(_req(method="GET")) is None
    ((rec, diffs),) = idx.closest(_req(body=b'{"a": 2, "m": {"k": 2}}', query="b=3"))
    assert rec.stream_id == "r1"
    assert "body a: 2 (recorded 1)" in diffs and any(d.startswith("query b") for d in diffs)


def test_wildcard_path_and_raw_bodies():
    cfg = MatchConfig(parse_ignore("messages.*.id"))
    idx = Index(cfg)
    idx.add(_rec("r", _req(body=b'{"messages": [{"id": 1, "c": "hi"}, {"id": 2, "c": "yo"}]}')))
    assert idx.lookup(_req(body=b'{"messages": [{"id": 7, "c": "hi"}, {"id": 8, "c": "yo"}]}'))
    idx.add(_rec("raw", _req(body=b"not json", path="/raw")))
    assert idx.lookup(_req(body=b"not json", path="/raw")) and not idx.lookup(
        _req(body=b"not json!", path="/raw")
    )


def test_order_then_last_or_cycle():
    for cycle, want in ((False, ["a", "b", "c", "c"]), (True, ["a", "b", "c", "a"])):
        idx = Index(MatchConfig(), cycle=cycle)
        for sid, t in (("c", 3), ("a", 1), ("b", 2)):
            idx.add(_rec(sid, _req(), t))
        key = idx.lookup(_req())
        assert [idx.take(key).stream_id for _ in range(4)] == want


def test_match_headers_with_redacted_value():
    cfg = MatchConfig(
        match_headers=frozenset({"anthropic-version", "x-api-key"}), redact_headers=frozenset({"x-api-key"})
    )
    idx = Index(cfg)
    idx.add(_rec("r", _req(headers={"anthropic-version": "2023-06-01", "x-api-key": "[REDACTED]"})))
    assert idx.lookup(_req(headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-live"}))
    assert not idx.lookup(_req(headers={"anthropic-version": "2024-01-01", "x-api-key": "sk-live"}))
