"""The loopback test servers send exactly what their scripts say, with the framing their mode promises."""

from __future__ import annotations

import gzip
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

try:
    from tests.servers import ScriptedServer, make_tls_files, sse_event
except ImportError:  # pytest run with tests/ (not the repo root) on sys.path
    from servers import ScriptedServer, make_tls_files, sse_event  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(20)

SCRIPT = [
    (0.0, b"data: one\n\n"),
    (0.03, b"event: two\ndata: 2\n\n"),
    (0.03, b"data: three\n\n"),
]
BODY = b"".join(d for _, d in SCRIPT)


def raw_h1(
    port: int, request: bytes, tls: ssl.SSLContext | None = None, timeout: float = 5.0
) -> tuple[list[tuple[float, bytes]], BaseException | None]:
    """Send a raw request; return every recv() as (monotonic time, bytes) until EOF or error."""
    reads: list[tuple[float, bytes]] = []
    err: BaseException | None = None
    s: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if tls:
            # ragged EOFs reported, so a reset is told apart from a clean close_notify
            s = tls.wrap_socket(s, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
        s.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except (ConnectionError, ssl.SSLError) as e:
                err = e
                break
            if not data:
                break
            reads.append((time.monotonic(), data))
    finally:
        s.close()
    return reads, err


GET = b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def h2_get(port: int, ctx: ssl.SSLContext, path: str = "/s", timeout: float = 5.0) -> dict:
    """Minimal HTTP/2 client (h2 library): returns headers, DATA frames payloads, and how the stream ended."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s = ctx.wrap_socket(sock, server_hostname="localhost")
    out: dict = {"alpn": s.selected_alpn_protocol(), "frames": [], "ended": None, "headers": None}
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "localhost")],
        end_stream=True,
    )
    s.sendall(conn.data_to_send())
    deadline = time.monotonic() + timeout
    try:
        while out["ended"] is None and time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except (ConnectionError, ssl.SSLError) as e:
                out["ended"] = f"error: {type(e).__name__}"
                break
            if not data:
                out["ended"] = "eof"
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    out["headers"] = dict(ev.headers)
                elif isinstance(ev, h2.events.DataReceived):
                    if ev.data:  # skip the empty END_STREAM frame
                        out["frames"].append(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    out["ended"] = "end_stream"
                elif isinstance(ev, h2.events.StreamReset):
                    out["ended"] = f"rst_stream {int(ev.error_code)}"
            s.sendall(conn.data_to_send())
    finally:
        s.close()
    return out


# ------------------------------------------------------------------------------------------------ framing


def test_h1_chunked_one_chunk_per_step() -> None:
    with ScriptedServer("h1-chunked", SCRIPT, headers={"x-extra": "1"}) as srv:
        reads, err = raw_h1(srv.port, GET)
        (resp,) = srv.wait_responses(1)
    assert err is None
    wire = b"".join(d for _, d in reads)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert b"content-type: text/event-stream" in head
    assert b"transfer-encoding: chunked" in head
    assert b"x-extra: 1" in head
    expected = b"".join(b"%x\r\n%s\r\n" % (len(d), d) for _, d in SCRIPT) + b"0\r\n\r\n"
    assert body == expected
    assert bytes(resp.wire) == wire
    assert resp.body == BODY and resp.outcome == "complete"
    # TCP_NODELAY + drain + gap: every step after a sleep starts a new read at the client.
    starts, pos = set(), 0
    for _, d in reads:
        starts.add(pos)
        pos += len(d)
    for step in (b"14\r\nevent: two", b"d\r\ndata: three"):
        assert wire.index(step) in starts
    gaps = [b[0] - a[0] for a, b in zip(resp.writes, resp.writes[1:], strict=False)]
    assert all(g >= 0.025 for g in gaps), gaps


def test_h1_close_body_ends_with_connection() -> None:
    with ScriptedServer("h1-close", SCRIPT) as srv:
        reads, err = raw_h1(srv.port, GET)
        (resp,) = srv.wait_responses(1)
    assert err is None
    head, _, body = b"".join(d for _, d in reads).partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    assert body == BODY
    assert resp.outcome == "complete"


def test_h1_close_with_httpx() -> None:
    with ScriptedServer("h1-close", SCRIPT) as srv, httpx.Client() as c:
        r = c.get(srv.url + "/s")
    assert r.content == BODY and r.headers["content-type"] == "text/event-stream"


def test_h1_tls_chunked() -> None:
    with ScriptedServer("h1-tls", SCRIPT) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        assert srv.tls is not None
        reads, err = raw_h1(srv.port, GET, tls=srv.tls.client_context())
        with httpx.Client(verify=srv.tls.client_context()) as c:
            r = c.get(srv.url + "/s")
    assert err is None
    body = b"".join(d for _, d in reads).partition(b"\r\n\r\n")[2]
    assert body == b"".join(b"%x\r\n%s\r\n" % (len(d), d) for _, d in SCRIPT) + b"0\r\n\r\n"
    assert r.http_version == "HTTP/1.1" and r.content == BODY


def test_h2_tls_one_data_frame_per_step() -> None:
    with ScriptedServer(
        "h2-tls", SCRIPT, headers=[("x-extra", "1"), ("Transfer-Encoding", "chunked")]
    ) as srv:
        assert srv.tls is not None
        got = h2_get(srv.port, srv.tls.client_context(["h2"]))
        (resp,) = srv.wait_responses(1)
    assert got["alpn"] == "h2"
    assert got["headers"][":status"] == "200"
    assert got["headers"]["content-type"] == "text/event-stream"
    assert got["headers"]["x-extra"] == "1"
    assert "transfer-encoding" not in got["headers"]  # connection-specific: dropped on HTTP/2
    assert got["frames"] == [d for _, d in SCRIPT]
    assert got["ended"] == "end_stream"
    assert resp.request.http_version == "HTTP/2" and resp.outcome == "complete"


def test_h2_tls_with_httpx_and_large_step() -> None:
    big = b"data: " + b"x" * 200_000 + b"\n\n"  # > one frame and > the initial 64 KiB window
    with ScriptedServer("h2-tls", [(0, b"data: a\n\n"), (0, big)]) as srv:
        assert srv.tls is not None
        with httpx.Client(http2=True, verify=srv.tls.client_context()) as c:
            r = c.get(srv.url + "/s")
    assert r.http_version == "HTTP/2"
    assert r.content == b"data: a\n\n" + big


def test_h2_server_falls_back_to_h1_for_h1_clients() -> None:
    with ScriptedServer("h2-tls", SCRIPT) as srv:
        assert srv.tls is not None
        with httpx.Client(verify=srv.tls.client_context()) as c:
            r = c.get(srv.url + "/s")
    assert r.http_version == "HTTP/1.1" and r.content == BODY


# ------------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("mode", ["h1-chunked", "h1-close", "h1-tls"])
def test_abort_resets_mid_stream_h1(mode: str) -> None:
    script = [(0, b"data: a\n\n"), (0.02, b"data: b\n\n"), ("abort",)]
    with ScriptedServer(mode, script) as srv:
        ctx = srv.tls.client_context() if srv.tls else None
        reads, err = raw_h1(srv.port, GET, tls=ctx)
        (resp,) = srv.wait_responses(1)
    assert resp.outcome == "aborted"
    assert resp.body == b"data: a\n\ndata: b\n\n"
    wire = b"".join(d for _, d in reads)
    assert b"data: b" in wire and not wire.endswith(b"0\r\n\r\n")
    # A reset, not a clean close: plain TCP reports ECONNRESET; OpenSSL reports it as EOF without close_notify.
    if mode == "h1-tls":
        assert isinstance(err, ConnectionResetError | ssl.SSLEOFError), err
    else:
        assert isinstance(err, ConnectionResetError), err


def test_abort_with_httpx_is_an_error() -> None:
    with ScriptedServer("h1-chunked", [(0, b"data: a\n\n"), ("abort",)]) as srv, httpx.Client() as c:
        with pytest.raises(httpx.TransportError):
            c.get(srv.url + "/s")


def test_abort_h2() -> None:
    with ScriptedServer("h2-tls", [(0, b"data: a\n\n"), (0.02, b"data: b\n\n"), ("abort",)]) as srv:
        assert srv.tls is not None
        got = h2_get(srv.port, srv.tls.client_context(["h2"]))
        (resp,) = srv.wait_responses(1)
    assert got["frames"] == [b"data: a\n\n", b"data: b\n\n"]
    assert got["ended"] is not None and got["ended"] != "end_stream"
    assert resp.outcome == "aborted"


def test_rst_stream_h2() -> None:
    with ScriptedServer("h2-tls", [(0, b"data: a\n\n"), ("rst_stream", 2)]) as srv:
        assert srv.tls is not None
        got = h2_get(srv.port, srv.tls.client_context(["h2"]))
    assert got["frames"] == [b"data: a\n\n"]
    assert got["ended"] == "rst_stream 2"


def test_stall_delays_next_write() -> None:
    with ScriptedServer("h1-chunked", [(0, b"data: a\n\n"), ("stall", 0.15), (0, b"data: b\n\n")]) as srv:
        raw_h1(srv.port, GET)
        (resp,) = srv.wait_responses(1)
    (t0, _), (t1, _) = resp.writes
    assert t1 - t0 >= 0.14


def test_client_disconnect_is_recorded() -> None:
    script = [(0, b"data: a\n\n")] + [(0.02, b"data: x\n\n")] * 200
    with ScriptedServer("h1-chunked", script) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        sock.sendall(GET)
        sock.recv(1000)
        sock.close()
        (resp,) = srv.wait_responses(1, timeout=5)
    assert resp.outcome == "client_gone"


def test_stop_cuts_open_streams_quickly() -> None:
    srv = ScriptedServer("h1-chunked", [(0, b"data: a\n\n"), ("stall", 30)])
    srv.start()
    result: dict = {}

    def client() -> None:
        result["reads"], result["err"] = raw_h1(srv.port, GET, timeout=10)

    t = threading.Thread(target=client)
    t.start()
    srv.wait_requests(1)
    time.sleep(0.05)
    t0 = time.monotonic()
    srv.stop()
    t.join(5)
    assert time.monotonic() - t0 < 3
    assert not t.is_alive()
    (resp,) = srv.wait_responses(1, timeout=1)
    assert resp.outcome == "cancelled"


# ------------------------------------------------------------------------------------------------ routing


def test_routes_default_404_and_requests_recorded() -> None:
    routes = {
        "/a": (200, None, [(0, b"data: A\n\n")]),
        "/b": (503, {"content-type": "application/json", "retry-after": "1"}, [(0, b'{"e":1}')]),
    }
    with ScriptedServer("h1-chunked", None, routes=routes) as srv, httpx.Client() as c:
        ra = c.get(srv.url + "/a?q=1")
        rb = c.post(srv.url + "/b", content=b'{"hello": 1}', headers={"x-test": "yes"})
        rc = c.get(srv.url + "/nope")
        assert srv.connections == 1  # keep-alive across responses
    assert (ra.status_code, ra.content) == (200, b"data: A\n\n")
    assert (
        rb.status_code == 503
        and rb.headers["content-type"] == "application/json"
        and rb.content == b'{"e":1}'
    )
    assert rb.headers["retry-after"] == "1"
    assert rc.status_code == 404
    reqs = srv.requests
    assert [(r.method, r.path) for r in reqs] == [("GET", "/a?q=1"), ("POST", "/b"), ("GET", "/nope")]
    assert reqs[1].body == b'{"hello": 1}' and reqs[1].header("X-Test") == "yes"


def test_default_script_and_h2_request_body() -> None:
    with ScriptedServer("h2-tls", SCRIPT, routes={"/other": (201, None, [(0, b"data: o\n\n")])}) as srv:
        assert srv.tls is not None
        with httpx.Client(http2=True, verify=srv.tls.client_context()) as c:
            r1 = c.post(srv.url + "/v1/x", json={"a": 1})
            r2 = c.get(srv.url + "/other")
    assert r1.content == BODY and (r2.status_code, r2.content) == (201, b"data: o\n\n")
    req = srv.requests[0]
    assert (req.method, req.path, req.http_version) == ("POST", "/v1/x", "HTTP/2")
    assert req.body == b'{"a":1}' or req.body == b'{"a": 1}'


def test_content_encoding_passes_raw_bytes() -> None:
    payload = gzip.compress(b"data: zipped\n\n")
    script = [(0, payload[:10]), (0.01, payload[10:])]
    with (
        ScriptedServer("h1-chunked", script, headers={"content-encoding": "gzip"}) as srv,
        httpx.Client() as c,
    ):
        with c.stream("GET", srv.url + "/s") as r:
            raw = b"".join(r.iter_raw())
        r2 = c.get(srv.url + "/s")
    assert raw == payload
    assert r2.content == b"data: zipped\n\n"


def test_bad_scripts_rejected() -> None:
    with pytest.raises(ValueError):
        ScriptedServer("h1-chunked", [(0, "text not bytes")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        ScriptedServer("h1-chunked", [("explode",)])
    with pytest.raises(ValueError):
        ScriptedServer("h3", [])


def test_tls_files(tmp_path) -> None:
    files = make_tls_files(tmp_path)
    for p in (files.ca_cert, files.ca_key, files.cert, files.key):
        assert p.exists() and p.read_bytes().startswith(b"-----BEGIN")
    with ScriptedServer("h1-tls", SCRIPT, tls=files) as srv:
        for host in ("127.0.0.1", "localhost"):
            with httpx.Client(verify=files.client_context()) as c:
                assert c.get(f"https://{host}:{srv.port}/s").content == BODY
        with httpx.Client(verify=True) as c, pytest.raises(httpx.ConnectError):
            c.get(srv.url + "/s")  # not trusted by the system store


def test_sse_event_helper() -> None:
    assert sse_event("a\nb", event="e", id="7") == b"event: e\nid: 7\ndata: a\ndata: b\n\n"
