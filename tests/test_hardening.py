"""Faults and hostile input through a real recording proxy: traffic is never altered, raw bytes always kept."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.proxy import Mitmdump
from tests.servers import ScriptedServer


def _client(proxy: Mitmdump) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.ca, timeout=120, trust_env=False)


def _get_raw(client: httpx.Client, url: str, **kw) -> bytes:
    out = bytearray()
    with client.stream("GET", url, **kw) as r:
        for part in r.iter_raw():
            out += part
    return bytes(out)


def _stored_body(proxy: Mitmdump, path: str) -> bytes:
    con = proxy.capture()
    rows = con.execute(
        "SELECT c.data FROM chunks c JOIN streams s USING (stream_id) WHERE s.path = ? ORDER BY c.seq", [path]
    ).fetchall()
    return b"".join(r[0] for r in rows)


BIG_LINE = b"data: " + b"x" * (10 * 1024 * 1024) + b"\n\n"
MANY = b"".join(b"data: %d\n\n" % i for i in range(100_000))
HOSTILE = {
    "/malformed": [
        (0, b"data\nevent\nid: \x00\nretry: -1\n:\n\n\n\r\r\ndata: ok\r\n\r\n"),
        (0, b"\r"),
        (0, b"\n"),
    ],
    "/badutf8": [(0, b"data: \xff\xfe\xc3\n\ndata: \xed\xa0\x80 surrogate\n\n")],
    "/nul": [(0, b"data: a\x00b\n\n\x00\x00\x00")],
    "/bigline": [(0, BIG_LINE[i : i + 65536]) for i in range(0, len(BIG_LINE), 65536)],
    "/many": [(0, MANY)],
    "/corruptbr": [(0, b"\x8b\x02\x80garbage that is not brotli")],
    "/binary": [(0, bytes(range(256)) * 64)],
}
EXPECTED_EVENTS = {
    "/malformed": 2,
    "/badutf8": 2,
    "/nul": 1,
    "/bigline": 1,
    "/many": 100_000,
    "/corruptbr": 0,
}


def test_hostile_streams_pass_unaltered_and_are_kept_raw(tmp_path):
    routes = {
        p: (200, {"Content-Encoding": "br"} if p == "/corruptbr" else None, s) for p, s in HOSTILE.items()
    }
    routes["/wrongtype"] = (200, {"Content-Type": "text/plain"}, [(0, b"data: sse under text/plain\n\n")])
    routes["/weird-headers"] = (
        200,
        [("X-Bin", "caf\xe9 \x7f"), ("X-Huge", "h" * 60_000)],
        [(0, b"data: fine\n\n")],
    )
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            for path, (_, _, script) in routes.items():
                got = _get_raw(c, f"http://127.0.0.1:{srv.port}{path}")
                assert got == b"".join(d for _, d in script), path
            # The proxy still serves normally afterwards.
            assert _get_raw(c, f"http://127.0.0.1:{srv.port}/nul") == HOSTILE["/nul"][0][1]
        n_recorded = len(HOSTILE) + 2  # + /weird-headers + the second /nul; /wrongtype is not an SSE type
        rows = proxy.wait_for(
            "SELECT path, n_events, parse_error FROM streams WHERE end_reason = 'complete'",
            lambda r: len(r) == n_recorded,
            timeout=60,
        )
        by_path = {r[0]: r for r in rows}
        assert "/wrongtype" not in by_path
        for path, n in EXPECTED_EVENTS.items():
            assert by_path[path][1] == n, path
        assert by_path["/corruptbr"][2]  # a decode error is recorded, not raised
        for path in ("/bigline", "/many", "/binary", "/malformed"):
            assert _stored_body(proxy, path) == b"".join(d for _, d in HOSTILE[path])
        con = proxy.capture()
        data = con.execute(
            "SELECT e.data FROM events e JOIN streams s USING (stream_id) WHERE s.path='/badutf8' ORDER BY e.seq"
        ).fetchall()
        assert data == [("\ufffd\ufffd\ufffd",), ("\ufffd\ufffd\ufffd surrogate",)]
    assert "Traceback" not in proxy.log()


def test_upstream_stall_then_resume_and_other_flows_unaffected(tmp_path):
    stall = float(os.environ.get("MITM_SSE_TEST_STALL", "60"))
    script = [(0, b"data: before\n\n"), ("stall", stall), (0, b"data: after\n\n")]
    quick = [(0, b"data: quick\n\n")]
    routes = {"/stall": (200, None, script), "/quick": (200, None, quick)}
    with ScriptedServer("h1-chunked", routes=routes, script=None, response_timeout=stall + 60) as srv, \
            Mitmdump(tmp_path) as proxy:  # fmt: skip
        result: dict[str, bytes] = {}

        def run() -> None:
            with _client(proxy) as c:
                result["stall"] = _get_raw(c, f"http://127.0.0.1:{srv.port}/stall")

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1)
        with _client(proxy) as c:  # other traffic flows while one stream stalls
            for _ in range(3):
                assert _get_raw(c, f"http://127.0.0.1:{srv.port}/quick") == quick[0][1]
        t.join(stall + 30)
        assert result["stall"] == b"data: before\n\ndata: after\n\n"
        rows = proxy.wait_for(
            "SELECT max(c.delta_ns) FROM chunks c JOIN streams s USING (stream_id) "
            "WHERE s.path='/stall' AND s.end_reason='complete'",
            lambda r: r[0][0] is not None,
        )
        assert rows[0][0] >= stall * 1e9 * 0.95


def test_tls_upstream_closing_right_after_body(tmp_path):
    """mitmproxy issue 8364: SSE tails cut when a TLS HTTP/1.1 upstream closes right after the body."""
    script = [(0, b"data: one\n\n"), (0.02, b"data: two\n\n"), (0, b"data: tail\n\n")]
    with ScriptedServer("h1-close-tls", script) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            got = _get_raw(c, f"https://127.0.0.1:{srv.port}/close")
        proxy.wait_for("SELECT end_reason FROM streams", lambda r: r and r[0][0] is not None)
        assert _stored_body(proxy, "/close") == got


def _block(part):
    """Put a file where the writer wants the partition folder (racing the writer, so retry)."""
    for i in range(100):
        try:
            if part.is_dir():  # move written segments aside; they stay readable (the views glob */*.parquet)
                os.rename(part, part.with_name(f"{part.name}-moved{i}"))
            os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return part
        except OSError:
            time.sleep(0.01)
    raise AssertionError(f"could not block {part}")


def test_capture_folder_unwritable_then_recovers(tmp_path):
    """Writes fail (the day partition is replaced by a file): traffic flows, errors are loud, nothing lost."""
    script = [(0, b"data: a\n\n")] + [(0.05, b"data: b\n\n")] * 60
    with ScriptedServer("h1-chunked", script) as srv, Mitmdump(tmp_path) as proxy:
        day = time.strftime("day=%Y-%m-%d", time.gmtime())
        blocked = [_block(proxy.sse_dir / table / day) for table in ("streams", "chunks", "events")]
        got = {}

        def run() -> None:
            with _client(proxy) as c:
                got["body"] = _get_raw(c, f"http://127.0.0.1:{srv.port}/feed")

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.5)
        for part in blocked:
            part.unlink()
        t.join(30)
        assert got["body"] == b"".join(d for _, d in script)  # traffic never noticed
        proxy.wait_for("SELECT n_chunks FROM streams WHERE end_reason='complete'", lambda r: r == [(61,)])
        assert _stored_body(proxy, "/feed") == got["body"]  # kept in memory and written when possible
        assert "CANNOT WRITE" in proxy.log()
        assert "recording resumed" in proxy.log()


def test_writer_process_dies_traffic_unaffected_and_restarts(tmp_path):
    script = [(0, b"data: a\n\n")] + [(0.05, b"data: b\n\n")] * 30
    with ScriptedServer("h1-chunked", script) as srv, Mitmdump(tmp_path) as proxy:
        got = {}

        def run() -> None:
            with _client(proxy) as c:
                got["body"] = _get_raw(c, f"http://127.0.0.1:{srv.port}/first")

        t = threading.Thread(target=run)
        t.start()
        proxy.wait_for("SELECT count(*) FROM chunks", lambda r: r[0][0] >= 3)
        pids = subprocess.run(
            ["pgrep", "-f", f"mitm_sse.writer_proc {proxy.sse_dir}"], capture_output=True, text=True
        ).stdout.split()
        assert len(pids) == 1
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        t.join(30)
        assert got["body"] == b"".join(d for _, d in script)
        with _client(proxy) as c:
            # The first SSE response after the death starts a new writer (off the event loop) ...
            assert _get_raw(c, f"http://127.0.0.1:{srv.port}/trigger").startswith(b"data: a")
            time.sleep(6)
            # ... and streams after that are recorded again.
            assert _get_raw(c, f"http://127.0.0.1:{srv.port}/after").startswith(b"data: a")
        rows = proxy.wait_for(
            "SELECT path, end_reason FROM streams ORDER BY path",
            lambda r: ("/after", "complete") in r,
            timeout=30,
        )
        assert ("/first", "proxy_crashed") in rows  # closed by the new writer's recovery
        assert "UNRECORDED" in proxy.log()


def test_redacted_secrets_never_reach_any_file(tmp_path):
    secret = "sk-ant-api03-VERYSECRETVALUE"
    routes = {
        "/v1/messages": (200, [("Set-Cookie", f"session={secret}")], [(0, b"event: ping\ndata: {}\n\n")]),
        "/models/gemini:streamGenerateContent": (200, None, [(0, b'data: {"candidates":[]}\n\n')]),
    }
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            c.post(f"http://127.0.0.1:{srv.port}/v1/messages",
                   headers={"x-api-key": secret, "Authorization": f"Bearer {secret}", "Cookie": f"a={secret}",
                            "Proxy-Authorization": f"Basic {secret}", "api-key": secret},
                   json={"stream": True})  # fmt: skip
            c.get(f"http://127.0.0.1:{srv.port}/models/gemini:streamGenerateContent?alt=sse&key={secret}",
                  headers={"x-goog-api-key": secret})  # fmt: skip
        proxy.wait_for("SELECT count(*) FROM streams WHERE end_reason IS NOT NULL", lambda r: r[0][0] == 2)
    for f in proxy.sse_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
            if f.suffix == ".parquet":
                assert secret.encode() not in gzip.decompress(gzip.compress(f.read_bytes()))


def test_non_sse_traffic_is_left_alone(tmp_path):
    """Non-streaming responses are not streamed, not recorded, and other addons can still modify them."""
    routes = {"/json": (200, {"Content-Type": "application/json"}, [(0, b'{"a":'), (0.01, b"1}")])}
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, \
            Mitmdump(tmp_path, args=["--modify-body", "/~u json/1}/2}"]) as proxy:  # fmt: skip
        with _client(proxy) as c:
            assert c.get(f"http://127.0.0.1:{srv.port}/json").content == b'{"a":2}'
        time.sleep(1.5)
        assert proxy.capture().execute("SELECT count(*) FROM streams").fetchone()[0] == 0


def test_many_connections_dropped_mid_stream(tmp_path):
    """Clients that vanish with RST mid-stream, many at once: the proxy keeps working and closes every stream."""
    script = [(0, b"data: a\n\n")] + [(0.02, b"data: b\n\n")] * 200
    with ScriptedServer("h1-chunked", script) as srv, Mitmdump(tmp_path) as proxy:
        socks = []
        for i in range(30):
            s = socket.create_connection(("127.0.0.1", proxy.port))
            s.sendall(f"GET http://127.0.0.1:{srv.port}/d{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            socks.append(s)
        for s in socks:
            s.recv(100)
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        rows = proxy.wait_for(
            "SELECT end_reason, count(*) FROM streams GROUP BY 1",
            lambda r: r == [("client_disconnected", 30)],
        )
        assert rows
        with _client(proxy) as c:
            assert _get_raw(c, f"http://127.0.0.1:{srv.port}/ok").startswith(b"data: a")


@pytest.mark.parametrize("bad", ["sse_filter=~h(", "sse_record=everything"])
def test_bad_option_message_is_clear(tmp_path, bad):
    key, value = bad.split("=", 1)
    p = Mitmdump(tmp_path, options={key: value})
    p.confdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(p.command(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert key in out.stdout + out.stderr
