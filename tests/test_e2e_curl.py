"""End to end with curl, configured only by environment (https_proxy, CURL_CA_BUNDLE): record a streaming
chat completion from "api.openai.com" (routed to the local fake LLM), then replay it with the upstream stopped.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from mitm_sse.fakellm import FakeLLMServer
from tests.clients import client_env, route_args, which
from tests.proxy import Mitmdump, free_port

CURL = which("curl")
pytestmark = pytest.mark.skipif(CURL is None, reason="curl not installed (run scripts/install-clients.sh)")

URL = "https://api.openai.com/v1/chat/completions"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "stream": True, "seed": 3, "messages": [{"role": "user", "content": "hi"}]}
)


def _curl(proxy: Mitmdump, tmp_path, *extra: str) -> bytes:
    cmd = [CURL, "-sS", "-N", "--fail", "--max-time", "60", *extra, URL]
    cmd += [
        "-H",
        "content-type: application/json",
        "-H",
        "authorization: Bearer sk-test",
        "--data-binary",
        BODY,
    ]
    env = client_env(proxy.url, proxy.ca, tmp_path)
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=90)
    assert r.returncode == 0, f"curl failed: {r.stderr.decode(errors='replace')}\nproxy log:\n{proxy.log()}"
    return r.stdout


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_curl_record_then_mock(tmp_path, http):
    confdir = tmp_path / "confdir"
    with FakeLLMServer(speed=20) as upstream:
        port = int(upstream.url.rsplit(":", 1)[1])
        with Mitmdump(
            tmp_path, script="record", args=route_args({"api.openai.com": port}), confdir=confdir
        ) as p:
            recorded = _curl(p, tmp_path, http)
            rows = p.wait_for(
                "SELECT stream_id, host, provider, end_reason FROM streams WHERE end_reason IS NOT NULL"
            )
            assert [r[1:] for r in rows] == [("api.openai.com", "openai", "complete")]
            con = p.capture()
            chunks = con.execute("SELECT data FROM chunks WHERE stream_id = ? ORDER BY seq", [rows[0][0]])
            stored = b"".join(d for (d,) in chunks.fetchall())
            con.close()
    assert recorded.startswith(b"data: ") and recorded.rstrip().endswith(b"data: [DONE]")
    assert stored == recorded  # byte-identical: what curl got is what was stored

    dead = route_args({"api.openai.com": free_port()})
    with Mitmdump(tmp_path, script="mock", args=dead, confdir=confdir, options={"sse_mock_speed": "0"}) as p:
        replayed = _curl(p, tmp_path, http)
    assert replayed == recorded
