"""End to end with the official `openai` and `anthropic` Python SDKs, unmodified, configured only by environment.

The proxy routes the real API hostnames to a local fake LLM (map_remote); each SDK script runs in its own venv
(scripts/install-clients.sh) with just HTTPS_PROXY and SSL_CERT_FILE set. Record, then stop the fake upstream and
mock: the SDK must return the same text and tool calls from the replay.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from mitm_sse.fakellm import FakeLLMServer
from tests.clients import HERE, client_env, route_args, sdk_python
from tests.proxy import Mitmdump, free_port

PY, WHY = sdk_python()
pytestmark = pytest.mark.skipif(PY is None, reason=f"SDK client apps not installed: {WHY}")

HOSTS = ("api.openai.com", "api.anthropic.com")
KEYS = {"OPENAI_API_KEY": "sk-test-not-a-key", "ANTHROPIC_API_KEY": "sk-ant-test-not-a-key"}
CASES = [("openai", False), ("openai", True), ("anthropic", False), ("anthropic", True)]


def _run_client(proxy: Mitmdump, tmp_path, provider: str, tools: bool) -> dict:
    cmd = [PY, str(HERE / "sdk_client.py"), provider] + (["--tools"] if tools else [])
    env = client_env(proxy.url, proxy.ca, tmp_path, **KEYS)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, f"{provider} client failed:\n{r.stderr}\nproxy log:\n{proxy.log()}"
    return json.loads(r.stdout)


def _mock_status(proxy: Mitmdump) -> dict:
    with httpx.Client(proxy=proxy.url, trust_env=False, timeout=20) as c:
        return c.get("http://mitm-sse.mock/status").json()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_sdk_record_then_mock(tmp_path, provider):
    cases = [c for c in CASES if c[0] == provider]
    recorded: dict[bool, dict] = {}
    confdir = tmp_path / "confdir"
    with FakeLLMServer(speed=20) as upstream:
        port = int(upstream.url.rsplit(":", 1)[1])
        routes = route_args(dict.fromkeys(HOSTS, port))
        with Mitmdump(tmp_path, script="record", args=routes, confdir=confdir) as proxy:
            for _, tools in cases:
                out = _run_client(proxy, tmp_path, provider, tools)
                assert out["chunks"] > 1
                if tools:
                    assert out["tool_calls"] and out["tool_calls"][0]["name"] == "get_weather"
                    assert isinstance(out["tool_calls"][0]["arguments"], dict)
                else:
                    assert out["text"] and not out["tool_calls"]
                recorded[tools] = out
            path = "/v1/chat/completions" if provider == "openai" else "/v1/messages"
            rows = proxy.wait_for(
                "SELECT path, end_reason, n_events, provider FROM streams WHERE end_reason IS NOT NULL",
                lambda r: len(r) == len(cases),
            )
            assert all(r[0] == path and r[1] == "complete" and r[2] > 1 for r in rows), rows
            con = proxy.capture()
            texts = con.execute(
                "SELECT string_agg(delta_text, '' ORDER BY seq) FROM events "
                "WHERE content_kind = 'text' GROUP BY stream_id"
            ).fetchall()
            con.close()
            assert recorded[False]["text"] in {t for (t,) in texts}  # the decoder saw the text the SDK built

    # The upstream is gone: a request that reached the network would fail to connect.
    dead = route_args(dict.fromkeys(HOSTS, free_port()))
    with Mitmdump(
        tmp_path, script="mock", args=dead, confdir=confdir, options={"sse_mock_miss": "502"}
    ) as proxy:
        assert _mock_status(proxy)["recordings"] == len(cases)
        for _, tools in cases:
            out = _run_client(proxy, tmp_path, provider, tools)
            assert out["text"] == recorded[tools]["text"]
            assert out["tool_calls"] == recorded[tools]["tool_calls"]
            assert out["chunks"] == recorded[tools]["chunks"]
        status = _mock_status(proxy)
        assert status["hits"] == len(cases) and status["misses"] == 0, status
