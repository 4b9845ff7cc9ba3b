"""Metrics against hand-computed values.

The capture is written by the real Writer (parser, provider decoder, per-stream precomputation, Parquet
segments) from messages with chosen timestamps, so every number below is computed by hand from the
timeline in the comments.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mitm_sse import analysis, metrics
from mitm_sse.capture import open_capture
from mitm_sse.store import CaptureDir
from mitm_sse.writer import CHUNK, END, OPEN, Writer

MS = 1_000_000
T0 = 1_700_000_000_000 * MS  # an epoch ns origin; every time below is T0 + n ms


def _row(
    sid: str, session: str, host: str, path: str, body: dict | None, t_req_ms: int, t_head_ms: int
) -> dict:
    return {
        "stream_id": sid,
        "session": session,
        "kind": "sse",
        "method": "POST",
        "scheme": "https",
        "url": f"https://{host}{path}",
        "host": host,
        "port": 443,
        "path": path,
        "query": "",
        "status": 200,
        "request_headers_json": "{}",
        "request_body": json.dumps(body) if body else None,
        "request_body_raw": None,
        "response_headers_json": "{}",
        "content_type": "text/event-stream",
        "content_encoding": None,
        "http_version": "HTTP/1.1",
        "t_request_ns": T0 + t_req_ms * MS,
        "t_headers_ns": T0 + t_head_ms * MS,
        "model": body.get("model") if body else None,
    }


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def _chat(content: str | None = None, role: str | None = None) -> dict:
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "model": "m1", "choices": [{"index": 0, "delta": delta}]}


# (ms offset, payload) per stream.
STREAM_A = [  # OpenAI chat, session s1, usage reports 5 output tokens
    (200, _chat(role="assistant", content="")),  # role-only: lifecycle, not the first token
    (300, _chat("Hel")),
    (350, _chat("lo")),
    (450, _chat(" wor")),
    (460, _chat("ld")),
    (
        480,
        {
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 5},
        },
    ),
    (490, "[DONE]"),
]
STREAM_B = [  # OpenAI chat, session s2, no usage: output tokens = 3 content events
    (1120, _chat(role="assistant")),
    (1400, _chat("a")),
    (1600, _chat("b")),
    (1700, _chat("c")),
    (1710, "[DONE]"),
]


def write_known_capture(path: Path) -> CaptureDir:
    """Streams A (t 0..500 ms) and B (t 1000..1800 ms) and a generic one C, written by the real Writer."""
    cap = CaptureDir(path)
    cap.ensure()
    w = Writer(cap, "test01", flush_interval=0.05)
    w.start()
    try:
        q = w.q
        body = {"model": "m1", "stream": True, "messages": []}
        q.put((OPEN, _row("a" * 24, "s1", "api.openai.com", "/v1/chat/completions", body, 0, 100)))
        for ms, p in STREAM_A:
            q.put((CHUNK, "a" * 24, T0 + ms * MS, _sse(p)))
        q.put((END, "a" * 24, T0 + 500 * MS, "complete", None))

        q.put((OPEN, _row("b" * 24, "s2", "api.openai.com", "/v1/chat/completions", body, 1000, 1100)))
        for ms, p in STREAM_B:
            q.put((CHUNK, "b" * 24, T0 + ms * MS, _sse(p)))
        q.put((END, "b" * 24, T0 + 1800 * MS, "complete", None))

        # C: an unknown SSE feed with no generated content: TTFT falls back to the first event (2100 ms).
        q.put((OPEN, _row("c" * 24, "s2", "feed.example", "/events", None, 2000, 2050)))
        q.put((CHUNK, "c" * 24, T0 + 2100 * MS, b"event: tick\ndata: 1\n\n"))
        q.put((CHUNK, "c" * 24, T0 + 2300 * MS, b"event: tick\ndata: 2\n\n"))
        q.put((END, "c" * 24, T0 + 2400 * MS, "client_disconnected", "Client disconnected."))
        assert w.sync(10)
    finally:
        w.stop()
    return cap


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("known")
    write_known_capture(path)
    return path


def _latency(con, sid: str) -> dict:
    cur = con.execute("SELECT * FROM stream_latency WHERE stream_id = ?", [sid])
    return dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))


def test_stream_a_openai_with_usage(known: Path) -> None:
    d = _latency(open_capture(known), "a" * 24)
    assert d["ttfb_ms"] == pytest.approx(100.0)  # headers 100 - request 0
    assert d["ttft_ms"] == pytest.approx(300.0)  # the role-only chunk at 200 ms does not count
    assert d["e2e_ms"] == pytest.approx(500.0)
    # content at 300, 350, 450, 460: gaps 50, 100, 10 -> sorted 10, 50, 100
    assert d["itl_p50_ms"] == pytest.approx(50.0)
    assert d["itl_p95_ms"] == pytest.approx(95.0)  # 50 + 0.9 * (100 - 50), linear interpolation
    assert d["itl_p99_ms"] == pytest.approx(99.0)
    assert d["itl_max_ms"] == pytest.approx(100.0)
    assert d["output_tokens"] == 5 and d["output_tokens_source"] == "usage"
    assert d["input_tokens"] == 7
    assert d["tpot_ms"] == pytest.approx((500 - 300) / (5 - 1))  # 50 ms
    assert d["tokens_per_s"] == pytest.approx(5 / 0.5)  # 10 tokens/s
    assert d["provider"] == "openai" and d["model"] == "m1"


def test_stream_b_tokens_from_events(known: Path) -> None:
    d = _latency(open_capture(known), "b" * 24)
    assert d["ttfb_ms"] == pytest.approx(100.0)
    assert d["ttft_ms"] == pytest.approx(400.0)  # 1400 - 1000
    assert d["e2e_ms"] == pytest.approx(800.0)
    assert d["itl_p50_ms"] == pytest.approx(150.0)  # gaps 200, 100 -> median 150
    assert d["output_tokens"] == 3 and d["output_tokens_source"] == "events"
    assert d["tpot_ms"] == pytest.approx((1800 - 1400) / 2)  # 200 ms
    assert d["tokens_per_s"] == pytest.approx(3 / 0.8)


def test_generic_stream_falls_back_to_first_event(known: Path) -> None:
    d = _latency(open_capture(known), "c" * 24)
    assert d["provider"] == "generic"
    assert d["ttft_ms"] == pytest.approx(100.0)  # first event 2100 - request 2000
    assert d["tpot_ms"] is None and d["itl_p50_ms"] is None
    assert d["end_reason"] == "client_disconnected"


def test_itl_gaps_view_pooled(known: Path) -> None:
    con = open_capture(known)
    gaps = con.execute("SELECT stream_id, itl_ms FROM itl_gaps ORDER BY stream_id, seq").fetchall()
    assert [(s[0], round(g, 6)) for s, g in gaps] == [
        ("a", 50.0),
        ("a", 100.0),
        ("a", 10.0),
        ("b", 200.0),
        ("b", 100.0),
    ]


def test_summary_sql_by_session(known: Path) -> None:
    con = open_capture(known)
    cur = con.execute(metrics.summary_sql(["session"]))
    rows = {r[0]: dict(zip([d[0] for d in cur.description], r, strict=True)) for r in cur.fetchall()}
    s2 = rows["s2"]  # streams B (ttft 400) and C (ttft 100, disconnected)
    assert s2["streams"] == 2 and s2["errors"] == 1
    assert s2["ttft_p50"] == pytest.approx(250.0)
    assert s2["ttft_p90"] == pytest.approx(100 + 0.9 * 300)
    assert s2["e2e_p99"] == pytest.approx(400 + 0.99 * 400)  # e2e 400 (C) and 800 (B)
    assert rows["s1"]["tpot_p50"] == pytest.approx(50.0)
    # one overall row, and the default grouping still works
    (overall,) = con.execute(metrics.summary_sql([])).fetchall()
    assert overall[0] == 3
    assert con.execute(metrics.summary_sql()).fetchall()


def test_summary_sql_rejects_unknown_group() -> None:
    with pytest.raises(ValueError, match="cannot group by colour"):
        metrics.summary_sql(["colour"])


def test_pooled_itl_sql(known: Path) -> None:
    con = open_capture(known)
    cur = con.execute(metrics.pooled_itl_sql(["host"]))
    (row,) = cur.fetchall()
    d = dict(zip([c[0] for c in cur.description], row, strict=True))
    assert d["gaps"] == 5
    assert d["itl_p50"] == pytest.approx(100.0)  # 10, 50, 100, 100, 200
    assert d["itl_mean"] == pytest.approx(92.0)


def test_analysis_percentiles_match_sql(known: Path) -> None:
    df = analysis.load_latency(known)
    assert len(df) == 3
    table = analysis.percentiles(df, by="session", metrics=["ttft_ms", "e2e_ms"])
    s2 = table[table["session"] == "s2"].iloc[0]
    assert s2["ttft_p50"] == pytest.approx(250.0)
    assert s2["e2e_p99"] == pytest.approx(400 + 0.99 * 400)


def test_slo_check(known: Path) -> None:
    df = analysis.load_latency(known)
    # TTFT < 350: A (300) and C (100) pass; ITL p95 < 100: A (95) passes, B (195) fails, C has none (fails)
    out = analysis.slo_check(df, ttft_ms=350, itl_ms=100)
    assert out.loc[0, "streams"] == 3 and out.loc[0, "met"] == 1
    assert out.loc[0, "attainment"] == pytest.approx(1 / 3)
    assert out.loc[0, "ttft_ok"] == pytest.approx(2 / 3)
    by = analysis.slo_check(df, ttft_ms=350, itl_ms=None, by="session").set_index("session")
    assert by.loc["s1", "attainment"] == 1.0 and by.loc["s2", "attainment"] == 0.5


def test_bootstrap_median_diff() -> None:
    a = [10.0, 11, 12, 13, 14] * 20
    b = [20.0, 21, 22, 23, 24] * 20
    r = analysis.bootstrap_median_diff(a, b, n_boot=2000, seed=1)
    assert r.diff == pytest.approx(10.0)
    assert r.lo <= 10.0 <= r.hi and r.significant
    same = analysis.bootstrap_median_diff(a, a, n_boot=2000, seed=1)
    assert same.lo <= 0 <= same.hi and not same.significant
    # reproducible with a seed
    assert analysis.bootstrap_median_diff(a, b, seed=3) == analysis.bootstrap_median_diff(a, b, seed=3)
    with pytest.raises(ValueError):
        analysis.bootstrap_median_diff([], b)
    assert math.isfinite(analysis.bootstrap_median_diff([1.0], [2.0]).hi)


def test_text_timeline() -> None:
    assert analysis.text_timeline([0, 0, 50, 99], 100, 4) == "█ ▄▄"
    assert analysis.text_timeline([], 100, 3) == "   "


def test_stream_timeline(known: Path) -> None:
    tl = analysis.stream_timeline(known, "a" * 24)
    assert list(tl["chunks"]["offset_ms"]) == pytest.approx([200, 300, 350, 450, 460, 480, 490])
    assert list(tl["content"]["offset_ms"]) == pytest.approx([300, 350, 450, 460])
