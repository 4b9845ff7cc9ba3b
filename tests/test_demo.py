"""`mitm-sse demo` end to end: fake LLM, a real recording mitmdump, httpx through the proxy, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mitm_sse.capture import open_capture


def test_demo_end_to_end(tmp_path: Path, run_demo) -> None:
    cap = tmp_path / "demo"
    p = run_demo(
        cap,
        requests=8,
        concurrency=4,
        speed=8,
        seed=1,
        env={**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"},
    )
    assert "8/8 streams completed, 8 recorded" in p.stdout
    for model in ("fake-gpt-fast", "fake-gpt", "fake-claude", "fake-claude-fast"):
        assert model in p.stdout
    assert f"mitm-sse ls --dir {cap}" in p.stdout and "capture.duckdb" in p.stdout

    con = open_capture(cap)
    rows = con.execute(
        """SELECT provider, model, status, end_reason, ttft_ms, ttfb_ms, output_tokens, tpot_ms, session
           FROM stream_latency ORDER BY model"""
    ).fetchall()
    assert len(rows) == 8
    assert {r[0] for r in rows} >= {"anthropic"} and all(r[2] == 200 and r[3] == "complete" for r in rows)
    for r in rows:
        assert r[5] > 0 and r[4] > r[5], r  # first token after the headers
        assert r[6] > 0 and r[8] == "demo"
    # secrets sent by the demo clients are redacted before they reach disk
    headers = [json.loads(h) for (h,) in con.execute("SELECT request_headers_json FROM streams").fetchall()]
    assert all(h.get("authorization", "[REDACTED]") == "[REDACTED]" for h in headers)
    assert all(h.get("x-api-key", "[REDACTED]") == "[REDACTED]" for h in headers)
    # a tool call was streamed and is reconstructed by `show`
    sid = con.execute(
        "SELECT stream_id FROM streams WHERE request_body LIKE '%get_weather%' LIMIT 1"
    ).fetchone()[0]
    show = subprocess.run(
        [sys.executable, "-m", "mitm_sse.cli", "show", "--dir", str(cap), sid, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert show.returncode == 0, show.stderr
    rec = json.loads(show.stdout)["reconstruction"]
    assert rec["tool_calls"] and rec["tool_calls"][0]["name"] == "get_weather"
    json.loads(rec["tool_calls"][0]["arguments"])
    # both formats' tool calls (OpenAI at i=2, Anthropic at i=5)
    n_tools = con.execute("SELECT count(*) FROM streams WHERE request_body LIKE '%get_weather%'").fetchone()[
        0
    ]
    assert n_tools == 2
