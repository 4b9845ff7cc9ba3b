"""End to end with headless Chromium: a page on https://sse.example.test (routed to a local server) whose
`EventSource` reads a stream through the proxy writes each event into the DOM; `--dump-dom` prints it.
Recorded (page and stream, sse_record=all), then replayed by the mock with the upstream stopped.

Chromium trusts the test CA through `--ignore-certificate-errors-spki-list` (the CA's SPKI SHA-256), and gets the
proxy from `--proxy-server`: nothing else about the proxy is configured.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.clients import route_args, which
from tests.proxy import Mitmdump, free_port
from tests.servers import ScriptedServer

CHROMIUM = which("chromium") or which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (run scripts/install-clients.sh)"
)

HOST = "sse.example.test"
PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>sse</title></head><body>
<pre id="log"></pre><div id="status">waiting</div><script>
const log = document.getElementById('log'), st = document.getElementById('status');
const es = new EventSource('/events');
function add(e) { log.textContent += '[' + e.type + '|' + e.lastEventId + '|' + e.data + ']\\n'; }
es.addEventListener('greet', add);
es.onmessage = e => { add(e); if (e.data === 'done') { es.close(); st.textContent = 'done'; } };
es.onerror = () => { if (st.textContent !== 'done') st.textContent = 'error ' + es.readyState; };
</script></body></html>"""
STREAM = [
    (0.0, b": hi\nretry: 60000\nevent: greet\nid: 1\ndata: hello\n\n"),
    (0.1, b"data: caf\xc3"),
    (0.05, b"\xa9\r\n\r\ndata: two\ndata: lines\n\n"),
    (0.1, b"id: 2\ndata: done\n\n"),
]
EXPECTED = "[greet|1|hello]\n[message|1|café]\n[message|1|two\nlines]\n[message|2|done]\n"
# Everything Chromium asks for besides the page's host (component updates, sign-in, time checks) is refused by
# the proxy itself before any connection or DNS lookup (lazy connections): the test stays on loopback.
BLOCK = f"/!(~d {HOST} | ~d 127.0.0.1 | ~d mitm-sse.mock)/444"


def spki_sha256(ca_pem: str) -> str:
    with open(ca_pem, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def _chromium(proxy: Mitmdump, tmp_path, profile: str) -> str:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / profile}",
        f"--proxy-server={proxy.url}",
        f"--ignore-certificate-errors-spki-list={spki_sha256(proxy.ca)}",
        "--virtual-time-budget=30000",
        "--dump-dom",
        f"https://{HOST}/",
    ]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    dom = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0 and "<pre" in dom, (
        f"chromium failed ({r.returncode}):\n{r.stderr.decode(errors='replace')[-3000:]}\n{proxy.log()}"
    )
    return dom


def _log_of(dom: str) -> tuple[str, str]:
    import html

    log = dom.split('<pre id="log">', 1)[1].split("</pre>", 1)[0]
    status = dom.split('<div id="status">', 1)[1].split("</div>", 1)[0]
    return html.unescape(log), status


def test_chromium_eventsource_record_then_mock(tmp_path):
    confdir = tmp_path / "confdir"
    routes = {
        "/": (200, {"content-type": "text/html; charset=utf-8"}, [(0, PAGE)]),
        "/events": (200, None, STREAM),
    }
    with ScriptedServer("h1-chunked", None, routes=routes) as srv:
        opts = {"sse_record": "all", "block_list": BLOCK}
        with Mitmdump(
            tmp_path, script="record", args=route_args({HOST: srv.port}), confdir=confdir, options=opts
        ) as p:
            dom = _chromium(p, tmp_path, "profile-record")
            assert _log_of(dom) == (EXPECTED, "done"), dom
            rows = p.wait_for(
                "SELECT path, kind, end_reason FROM streams WHERE end_reason IS NOT NULL AND host = 'sse.example.test'"
                " AND path = '/events'"
            )
            assert rows == [("/events", "sse", "complete")]
            con = p.capture()
            events = con.execute(
                "SELECT e.event, e.data, e.id FROM events e JOIN streams s USING (stream_id) "
                "WHERE s.path = '/events' ORDER BY e.seq"
            ).fetchall()
            con.close()
            assert events == [
                ("greet", "hello", "1"),
                ("message", "café", "1"),
                ("message", "two\nlines", "1"),
                ("message", "done", "2"),
            ]
        assert [r.path for r in srv.requests].count("/events") == 1

    dead = route_args({HOST: free_port()})
    opts = {"block_list": BLOCK, "sse_mock_miss": "404"}
    with Mitmdump(tmp_path, script="mock", args=dead, confdir=confdir, options=opts) as p:
        dom = _chromium(p, tmp_path, "profile-mock")
        assert _log_of(dom) == (EXPECTED, "done"), dom
