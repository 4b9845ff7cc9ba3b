"""The recorder end to end: real mitmdump, real upstreams, real clients, real capture files."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
import zlib

import duckdb
import httpx
import pytest

from tests.proxy import Mitmdump, free_port
from tests.servers import ScriptedServer

# Chunk boundaries chosen to hit the parser's edge cases: an event split across chunks, several events in one
# chunk, a CRLF split between chunks, a multi-byte UTF-8 character split, a comment, id/retry fields.
SCRIPT = [
    (0.0, b"\xef\xbb\xbfretry: 3000\r\nid: 1\r\nevent: greet\r\ndata: hel"),
    (0.05, b"lo\r\n\r"),
    (0.05, b"\ndata: one\n\ndata: two\n\n: comment\ndata: three\n\n"),
    (0.1, b"data: caf\xc3"),
    (0.05, b"\xa9 \xe2\x82"),
    (0.05, b"\xac\n\nid: 2\ndata: last\n\n"),
]
EXPECTED_EVENTS = [
    ("greet", "hello", "1", 3000),
    ("message", "one", "1", None),
    ("message", "two", "1", None),
    ("message", "three", "1", None),
    ("message", "café €", "1", None),
    ("message", "last", "2", None),
]
BODY = b"".join(d for _, d in SCRIPT)


def _client(proxy: Mitmdump, http2: bool = False) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.ca, http2=http2, timeout=20, trust_env=False)


def _stream(client: httpx.Client, url: str, **kw) -> tuple[bytes, list[float]]:
    out, times = bytearray(), []
    with client.stream("GET", url, **kw) as r:
        for part in r.iter_raw():
            out += part
            times.append(time.monotonic())
    return bytes(out), times


def _check_stored(proxy: Mitmdump, body: bytes, n_steps: int) -> str:
    rows = proxy.wait_for("SELECT stream_id FROM streams WHERE end_reason IS NOT NULL")
    assert len(rows) == 1
    sid = rows[0][0]
    con = proxy.capture()
    chunks = con.execute(
        "SELECT seq, delta_ns, size, data FROM chunks WHERE stream_id = ? ORDER BY seq", [sid]
    ).fetchall()
    assert b"".join(c[3] for c in chunks) == body
    assert [c[0] for c in chunks] == list(range(len(chunks)))
    assert all(c[2] == len(c[3]) for c in chunks)
    assert len(chunks) == n_steps  # each timed write arrived as its own chunk
    events = con.execute(
        "SELECT event, data, id, retry FROM events WHERE stream_id = ? ORDER BY seq", [sid]
    ).fetchall()
    assert events == EXPECTED_EVENTS
    s = con.execute("SELECT end_reason, n_chunks, n_bytes, n_events, status FROM streams").fetchone()
    assert s == ("complete", n_steps, len(body), len(EXPECTED_EVENTS), 200)
    return sid


@pytest.mark.parametrize("mode", ["h1-chunked", "h1-close", "h1-tls", "h2-tls"])
def test_record_byte_identical(tmp_path, mode):
    with ScriptedServer(mode, SCRIPT) as srv, Mitmdump(tmp_path) as proxy:
        scheme = "https" if "tls" in mode else "http"
        url = f"{scheme}://127.0.0.1:{srv.port}/v1/stream"
        with _client(proxy, http2=mode == "h2-tls") as c:
            got, _ = _stream(c, url)
        assert got == BODY == srv.wait_responses(1)[0].body
        sid = _check_stored(proxy, BODY, len(SCRIPT))
        con = proxy.capture()
        deltas = [
            d
            for (d,) in con.execute(
                "SELECT delta_ns FROM chunks WHERE stream_id=? ORDER BY seq", [sid]
            ).fetchall()
        ]
        # Stored deltas follow the server's sleeps (loose bounds: shared, noisy machine).
        for (sleep, _), d in zip(SCRIPT[1:], deltas[1:], strict=True):
            assert sleep * 1e9 * 0.6 < d < sleep * 1e9 + 150e6, (sleep, d)
        expected_version = "HTTP/2.0" if mode == "h2-tls" else "HTTP/1.1"
        assert con.execute("SELECT http_version FROM streams").fetchone()[0] == expected_version


def test_ndjson_gzip_and_other_responses(tmp_path):
    nd = [
        (0, b'{"response":"a","done":false}\n{"resp'),
        (0.05, b'onse":"b","done":false}\n'),
        (0.05, b'{"done":true,"eval_count":2}\n'),
    ]
    gz = gzip.compress(b"data: zipped one\n\ndata: zipped two\n\n")
    routes = {
        "/api/generate": (200, {"Content-Type": "application/x-ndjson"}, nd),
        "/gz": (200, {"Content-Encoding": "gzip"}, [(0, gz[:10]), (0.05, gz[10:])]),
        "/plain": (200, {"Content-Type": "application/json"}, [(0, b'{"not":"a stream"}')]),
        "/upper": (200, {"Content-Type": "Text/Event-Stream; Charset=UTF-8"}, [(0, b"data: x\n\n")]),
    }
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            for path in routes:
                r = c.get(f"http://127.0.0.1:{srv.port}{path}", headers={"Accept-Encoding": "gzip"})
                assert r.status_code == 200
        rows = proxy.wait_for(
            "SELECT path, kind, n_events FROM streams WHERE end_reason IS NOT NULL ORDER BY path",
            lambda r: len(r) == 3,
        )
        assert rows == [("/api/generate", "ndjson", 3), ("/gz", "sse", 2), ("/upper", "sse", 1)]
        con = proxy.capture()
        raw = b"".join(
            r[0]
            for r in con.execute(
                "SELECT c.data FROM chunks c JOIN streams s USING (stream_id) WHERE s.path='/gz' ORDER BY seq"
            ).fetchall()
        )
        assert raw == gz  # stored before content-decoding
        assert [
            r[0]
            for r in con.execute(
                "SELECT e.data FROM events e JOIN streams s USING (stream_id) WHERE s.path='/gz' ORDER BY e.seq"
            ).fetchall()
        ] == ["zipped one", "zipped two"]
        nd_ev = con.execute(
            "SELECT e.data FROM events e JOIN streams s USING (stream_id) "
            "WHERE s.path='/api/generate' ORDER BY e.seq"
        ).fetchall()
        assert json.loads(nd_ev[1][0]) == {"response": "b", "done": False}


def test_deflate_and_corrupt_encoding_keep_raw(tmp_path):
    co = zlib.compressobj(wbits=-15)
    deflated = co.compress(b"data: d\n\n") + co.flush()
    routes = {
        "/deflate": (200, {"Content-Encoding": "deflate"}, [(0, deflated)]),
        "/corrupt": (200, {"Content-Encoding": "gzip"}, [(0, b"\x1f\x8b\x08\x00garbage-not-gzip" * 3)]),
    }
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            for path, (_, _, script) in routes.items():
                got, _ = _stream(c, f"http://127.0.0.1:{srv.port}{path}")
                assert got == script[0][1]
        rows = proxy.wait_for(
            "SELECT path, n_events, n_bytes, parse_error IS NOT NULL FROM streams "
            "WHERE end_reason='complete' ORDER BY path",
            lambda r: len(r) == 2,
        )
        assert rows[0][0] == "/corrupt" and rows[0][1] == 0 and rows[0][3] is True
        assert rows[1] == ("/deflate", 1, len(deflated), False)


def test_client_and_upstream_abort(tmp_path):
    long = [(0, b"data: a\n\n")] + [(0.1, b"data: more\n\n")] * 50
    routes = {
        "/long": (200, None, long),
        "/reset": (200, None, [(0, b"data: a\n\n"), (0.1, b"data: b\n\n"), ("abort",)]),
    }
    with ScriptedServer("h1-chunked", routes=routes, script=None) as srv, Mitmdump(tmp_path) as proxy:
        with _client(proxy) as c:
            with c.stream("GET", f"http://127.0.0.1:{srv.port}/long") as r:
                it = r.iter_raw()
                next(it)
                next(it)
            with pytest.raises(httpx.HTTPError):
                _stream(c, f"http://127.0.0.1:{srv.port}/reset")
        rows = proxy.wait_for(
            "SELECT path, end_reason, error, n_chunks FROM streams WHERE end_reason IS NOT NULL "
            "ORDER BY path",
            lambda r: len(r) == 2,
        )
        by = {r[0]: r for r in rows}
        assert by["/long"][1] == "client_disconnected"
        assert by["/long"][3] >= 2
        assert by["/reset"][1] == "server_error" and by["/reset"][2]
        con = proxy.capture()
        data = con.execute(
            "SELECT string_agg(decode(c.data), '' ORDER BY seq) FROM chunks c JOIN streams s "
            "USING (stream_id) WHERE s.path = '/reset'"
        ).fetchone()[0]
        assert data == "data: a\n\ndata: b\n\n"  # kept whole up to the fault


def test_concurrent_streams(tmp_path):
    script = [(0.02, f"data: {i}\n\n".encode()) for i in range(20)]
    with ScriptedServer("h1-chunked", script) as srv, Mitmdump(tmp_path) as proxy:
        results: dict[int, bytes] = {}

        def run(i: int) -> None:
            with _client(proxy) as c:
                results[i], _ = _stream(c, f"http://127.0.0.1:{srv.port}/s{i}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        body = b"".join(d for _, d in script)
        assert len(results) == 20 and all(v == body for v in results.values())
        rows = proxy.wait_for(
            "SELECT count(*), sum(n_events), count(DISTINCT stream_id) FROM streams "
            "WHERE end_reason='complete'",
            lambda r: r[0][0] == 20,
        )
        assert rows[0] == (20, 400, 20)
        con = proxy.capture()
        assert (
            con.execute(
                "SELECT count(*) FROM (SELECT stream_id, seq FROM chunks GROUP BY ALL HAVING count(*)>1)"
            ).fetchone()[0]
            == 0
        )


READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print(con.execute("SELECT count(*), max(n_chunks) FROM streams").fetchone()[0])
print(con.execute("SELECT count(*) FROM chunks").fetchone()[0])
"""


def test_query_while_recording_from_another_process(tmp_path):
    script = [(0, b"data: first\n\n")] + [(0.1, b"data: tick\n\n")] * 60
    with ScriptedServer("h1-chunked", script) as srv, Mitmdump(tmp_path) as proxy:
        done = threading.Event()

        def run() -> None:
            with _client(proxy) as c:
                _stream(c, f"http://127.0.0.1:{srv.port}/feed")
            done.set()

        t = threading.Thread(target=run)
        t.start()
        t0 = time.monotonic()
        # Visible (provisional row) within 2 s of its headers, while it is still open.
        rows = proxy.wait_for("SELECT end_reason FROM streams", lambda r: len(r) == 1, timeout=2.5)
        assert rows == [(None,)] and time.monotonic() - t0 < 3
        # The duckdb file in the capture folder, from another process, while the proxy writes.
        out = subprocess.run(
            [sys.executable, "-c", READER, str(proxy.sse_dir / "capture.duckdb")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        n_streams, n_chunks = (int(x) for x in out.stdout.split())
        assert n_streams == 1 and n_chunks >= 1
        assert not done.is_set()
        t.join(30)
        proxy.wait_for("SELECT n_chunks FROM streams", lambda r: r == [(61,)])


def test_sigterm_flushes_and_marks_open_streams(tmp_path):
    script = [(0, b"data: a\n\n")] + [(0.05, b"data: b\n\n")] * 400
    with ScriptedServer("h1-chunked", script) as srv:
        proxy = Mitmdump(tmp_path).start()
        got = []

        def run() -> None:
            try:
                with _client(proxy) as c, c.stream("GET", f"http://127.0.0.1:{srv.port}/x") as r:
                    for part in r.iter_raw():
                        got.append(part)
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=run)
        t.start()
        proxy.wait_for("SELECT count(*) FROM chunks", lambda r: r[0][0] >= 10)
        assert proxy.stop() == 0
        t.join(10)
        con = proxy.capture()
        end_reason, n_chunks = con.execute("SELECT end_reason, n_chunks FROM streams").fetchone()
        assert end_reason == "proxy_shutdown"
        stored = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert stored == n_chunks >= 10
        assert b"".join(got).startswith(
            b"".join(r[0] for r in con.execute("SELECT data FROM chunks ORDER BY seq").fetchall())
        )


def test_sigkill_loses_at_most_last_second_and_restart_recovers(tmp_path):
    script = [(0, b"data: a\n\n")] + [(0.02, b"data: b\n\n")] * 1000
    with ScriptedServer("h1-chunked", script) as srv:
        proxy = Mitmdump(tmp_path).start()
        received = []

        def run() -> None:
            try:
                with _client(proxy) as c, c.stream("GET", f"http://127.0.0.1:{srv.port}/x") as r:
                    for _ in r.iter_raw():
                        received.append(time.monotonic())
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=run)
        t.start()
        time.sleep(2.0)
        t_kill = time.monotonic()
        proxy.kill()
        t.join(10)
        before_last_second = sum(1 for x in received if x < t_kill - 1.0)
        # Every file is readable at any moment after the kill.
        con = duckdb.connect()
        for f in proxy.sse_dir.rglob("*.parquet"):
            con.execute("SELECT count(*) FROM read_parquet(?)", [str(f)]).fetchone()
        # The writer process outlives the proxy just long enough to store what it was sent, and closes the
        # stream as proxy_crashed.
        rows = proxy.wait_for("SELECT end_reason, n_chunks FROM streams", lambda r: r and r[0][0] is not None)
        stored = proxy.capture().execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert rows == [("proxy_crashed", stored)]
        assert stored >= before_last_second > 10


def test_restart_after_total_crash_marks_orphans(tmp_path):
    """Proxy and writer both killed (power loss): the next start closes the orphaned stream."""
    script = [(0, b"data: a\n\n")] + [(0.02, b"data: b\n\n")] * 1000
    with ScriptedServer("h1-chunked", script) as srv:
        proxy = Mitmdump(tmp_path).start()

        def run() -> None:
            try:
                with _client(proxy) as c, c.stream("GET", f"http://127.0.0.1:{srv.port}/x") as r:
                    for _ in r.iter_raw():
                        pass
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=run)
        t.start()
        proxy.wait_for("SELECT count(*) FROM chunks", lambda r: r[0][0] > 10)
        writer_pids = subprocess.run(
            ["pgrep", "-f", f"mitm_sse.writer_proc {proxy.sse_dir}"], capture_output=True, text=True
        ).stdout.split()
        assert writer_pids
        for pid in writer_pids:
            os.kill(int(pid), 9)
        proxy.kill()
        t.join(10)
        stored = proxy.capture().execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert proxy.capture().execute("SELECT end_reason FROM streams").fetchall() == [(None,)]
        proxy2 = Mitmdump(tmp_path, sse_dir=proxy.sse_dir, confdir=proxy.confdir).start()
        try:
            rows = proxy2.wait_for(
                "SELECT end_reason, n_chunks FROM streams", lambda r: r and r[0][0] is not None
            )
            assert rows == [("proxy_crashed", stored)]
            assert not list(proxy.sse_dir.rglob("*.tmp"))
        finally:
            proxy2.stop()


def test_options_session_redaction_and_filter(tmp_path):
    secret = "sk-test-SECRET-1234567890"
    with (
        ScriptedServer("h1-chunked", [(0, b"data: x\n\n")], headers={"Set-Cookie": f"s={secret}"}) as srv,
        Mitmdump(tmp_path, options={"sse_session": "base", "sse_filter": "!~u /skip"}) as proxy,
    ):
        with _client(proxy) as c:
            base = f"http://127.0.0.1:{srv.port}"
            c.get(
                f"{base}/a?key={secret}&q=1",
                headers={"Authorization": f"Bearer {secret}", "x-api-key": secret},
            )
            c.get(f"{base}/b", headers={"x-mitm-sse-session": "run-7", "Cookie": f"c={secret}"})
            c.get(f"{base}/skip")
        rows = proxy.wait_for(
            "SELECT path, session, url FROM streams WHERE end_reason IS NOT NULL ORDER BY path",
            lambda r: len(r) == 2,
        )
        assert [(r[0], r[1]) for r in rows] == [("/a", "base"), ("/b", "run-7")]
        assert "q=1" in rows[0][2] and secret not in rows[0][2]
        # The session header never reached the upstream.
        assert all(r.header("x-mitm-sse-session") is None for r in srv.wait_requests(3))
        hdrs = json.loads(
            proxy.capture().execute("SELECT request_headers_json FROM streams WHERE path='/a'").fetchone()[0]
        )
        assert hdrs["authorization"] == "[REDACTED]"
    for f in proxy.sse_dir.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
            assert f.stat().st_mode & 0o777 == 0o600, f
        elif f.is_dir():
            assert f.stat().st_mode & 0o777 == 0o700, f


def _run_to_exit(proxy: Mitmdump) -> tuple[int, str]:
    proxy.confdir.mkdir(parents=True, exist_ok=True)
    proxy.port = free_port()
    out = subprocess.run(
        proxy.command(), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    return out.returncode, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [("sse_filter=~q(", "sse_filter: invalid filter expression"), ("sse_record=bogus", "sse_record must be")],
)
def test_bad_options_fail_at_start(tmp_path, option, message):
    key, value = option.split("=", 1)
    rc, output = _run_to_exit(Mitmdump(tmp_path, options={key: value}))
    assert rc != 0
    assert message in output


def test_unwritable_sse_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, output = _run_to_exit(Mitmdump(tmp_path, sse_dir=blocker / "capture"))
    assert rc != 0
    assert "sse_dir: capture folder" in output and "is not usable" in output


def test_http2_client_cancel_and_upstream_rst_stream(tmp_path):
    long = [(0, b"data: a\n\n")] + [(0.1, b"data: more\n\n")] * 50
    rst = [(0, b"data: a\n\n"), (0.1, b"data: b\n\n"), ("rst_stream",)]
    routes = {"/long": (200, None, long), "/rst": (200, None, rst)}
    # eager: mitmproxy asks the upstream first, so the client gets HTTP/2 too (lazy takes the client's first ALPN)
    with ScriptedServer("h2-tls", routes=routes, script=None) as srv, \
            Mitmdump(tmp_path, options={"connection_strategy": "eager"}) as proxy:  # fmt: skip
        with _client(proxy, http2=True) as c:
            with c.stream("GET", f"https://127.0.0.1:{srv.port}/long") as r:
                assert r.http_version == "HTTP/2"
                it = r.iter_raw()
                next(it)
            with pytest.raises(httpx.HTTPError):
                _stream(c, f"https://127.0.0.1:{srv.port}/rst")
        rows = proxy.wait_for(
            "SELECT path, end_reason FROM streams WHERE end_reason IS NOT NULL ORDER BY path",
            lambda r: len(r) == 2,
        )
        errs = proxy.capture().execute("SELECT path, error FROM streams ORDER BY path").fetchall()
        assert rows == [("/long", "client_disconnected"), ("/rst", "server_error")], errs
