"""The mock end to end: record through a real mitmdump from real local upstreams, stop them, replay.

One module fixture records every shape once (SSE over HTTP/1.1 and HTTP/2 + TLS, gzip, a whole JSON body,
a fault, a request recorded three times, session labels); each test then runs its own mock mitmdump on a
copy of that capture. Timing assertions are deliberately loose: these machines are shared and noisy.
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest

from tests.proxy import Mitmdump
from tests.servers import Route, ScriptedServer, _check_script

pytestmark = pytest.mark.timeout(90)

GAPS = [0.08, 0.05, 0.12, 0.05, 0.1]  # recorded gaps between chunks (first: after the headers)
SSE = [(g, f'data: {{"n": {i}, "text": "tok{i}"}}\n\n'.encode()) for i, g in enumerate(GAPS)]
SSE_BODY = b"".join(d for _, d in SSE)
_gz = zlib.compressobj(wbits=31)
GZ = [(0.02, _gz.compress(b"data: zipped one\n\n") + _gz.flush(zlib.Z_SYNC_FLUSH))]
GZ.append((0.02, _gz.compress(b"data: zipped two\n\n") + _gz.flush()))
FAULT = [(0.02, b"data: a\n\n"), (0.03, b"data: b\n\n"), ("abort",)]
LONG = [(0.0, b"data: first\n\n")] + [(0.1, b"data: tick\n\n")] * 15
FEED = [(0.02, b"data: x\n\n"), (0.05, b"data: y\n\n"), (0.05, b"data: z\n\n")]
CHAT_BODY = {
    "model": "m-1",
    "stream": True,
    "metadata": {"user_id": "u-1"},
    "messages": [{"role": "user", "content": "hi"}],
}


class _H2First(ssl.SSLContext):
    """httpx offers ALPN "http/1.1" before "h2"; with connection_strategy=lazy mitmproxy takes the client's
    first choice (there is no server ALPN to mirror yet). Browsers offer h2 first: do the same."""

    def set_alpn_protocols(self, protocols) -> None:
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def _client(proxy: Mitmdump, http2: bool = False, timeout: float = 20) -> httpx.Client:
    verify = _H2First(ssl.PROTOCOL_TLS_CLIENT)
    verify.load_verify_locations(proxy.ca)
    return httpx.Client(proxy=proxy.url, verify=verify, http2=http2, timeout=timeout, trust_env=False)


def _stream(client: httpx.Client, method: str, url: str, **kw) -> tuple[httpx.Response, bytes, list[float]]:
    out, times = bytearray(), []
    t0 = time.monotonic()
    with client.stream(method, url, **kw) as r:
        for part in r.iter_raw():
            out += part
            times.append(time.monotonic() - t0)
    return r, bytes(out), times


def _status(proxy: Mitmdump) -> dict:
    with _client(proxy, timeout=5) as c:
        return c.get("http://mitm-sse.mock/status").json()


class Recorded:
    def __init__(self, path: Path, h1_port: int, h2_port: int) -> None:
        self.path, self.h1_port, self.h2_port = path, h1_port, h2_port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.h1_port}{path}"

    def https(self, path: str) -> str:
        return f"https://127.0.0.1:{self.h2_port}{path}"

    def copy(self, tmp: Path) -> Path:
        dst = tmp / "capture"
        shutil.copytree(self.path, dst, ignore=shutil.ignore_patterns("instances", ".lock"))
        (dst / "instances").mkdir(mode=0o700)
        return dst


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Recorded:
    tmp = tmp_path_factory.mktemp("rec")
    routes = {
        "/sse": (200, None, SSE),
        "/chat": (200, {"x-upstream": "yes", "cache-control": "no-cache"}, SSE),
        "/gz": (200, {"content-encoding": "gzip"}, GZ),
        "/json": (200, {"content-type": "application/json"}, [(0.01, b'{"ok": true, "n": 1}')]),
        "/fault": (200, None, FAULT),
        "/long": (200, None, LONG),
        "/feed": (200, None, FEED),
        "/n": (200, None, [(0, b"data: 1\n\n")]),
    }
    h1 = ScriptedServer("h1-chunked", routes=routes, script=None)
    h2 = ScriptedServer("h2-tls", SSE)
    with h1, h2, Mitmdump(tmp, script="record", options={"sse_record": "all"}) as proxy:
        with _client(proxy) as c:
            for path in ("/sse", "/gz", "/json", "/long", "/feed"):
                c.get(f"{h1.url}{path}").raise_for_status()
            r = c.post(
                f"{h1.url}/chat?key=SECRET&ts=1", json=CHAT_BODY, headers={"authorization": "Bearer sk-1"}
            )
            assert r.content == SSE_BODY
            with pytest.raises(httpx.HTTPError):
                c.get(f"{h1.url}/fault").read()
            for i in (1, 2, 3):  # the same request, three different answers, in this order
                h1.routes["/n"] = Route(200, [], _check_script([(0, f"data: {i}\n\n".encode())]))
                assert c.get(f"{h1.url}/n").content == f"data: {i}\n\n".encode()
            for s in ("alpha", "beta"):
                h1.routes["/n"] = Route(200, [], _check_script([(0, f"data: {s}\n\n".encode())]))
                c.get(f"{h1.url}/n?s=1", headers={"x-mitm-sse-session": s}).raise_for_status()
        with _client(proxy, http2=True) as c:
            r = c.get(f"{h2.url}/sse")
            assert r.http_version == "HTTP/2" and r.content == SSE_BODY
        proxy.wait_for(
            "SELECT count(*) FROM streams WHERE end_reason IS NOT NULL", lambda r: r[0][0] == 13, timeout=15
        )
    # Upstreams stopped here: from now on only the mock can answer.
    return Recorded(proxy.sse_dir, h1.port, h2.port)


class _Mock(Mitmdump):
    def start(self, timeout: float = 20.0) -> Mitmdump:
        super().start(timeout)
        if self.options.get("sse_mode") != "all" and self.proc is not None:
            _status(self)  # mitmdump listens before the index is loaded: wait until it is
        return self


def _mock(tmp: Path, recorded: Recorded, **options: str) -> Mitmdump:
    return _Mock(tmp, script="mock", sse_dir=recorded.copy(tmp), options=options)


def test_replay_identical_bytes_and_timing(tmp_path, recorded):
    with _mock(tmp_path, recorded, sse_mock_ignore="metadata.user_id,query:ts") as proxy:
        # HTTP/1.1, plain
        with _client(proxy) as c:
            r, body, times = _stream(c, "GET", recorded.url("/sse"))
            assert r.status_code == 200 and body == SSE_BODY
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-mitm-sse-mock"]
            assert len(times) == len(SSE)  # each recorded chunk arrived as its own read
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            for want, got in zip(GAPS[1:], gaps, strict=True):
                assert want * 0.5 < got < want + 0.1, (want, got)
            assert times[0] > GAPS[0] * 0.5  # the recorded time to first byte is kept
            # gzip: raw bytes replayed as stored, still decodable by the client
            r, body, _ = _stream(c, "GET", recorded.url("/gz"), headers={"accept-encoding": "gzip"})
            assert body == b"".join(d for _, d in GZ) and r.headers["content-encoding"] == "gzip"
            assert c.get(recorded.url("/gz")).text == "data: zipped one\n\ndata: zipped two\n\n"
            # a whole (non-streamed) response recorded with sse_record=all
            r = c.get(recorded.url("/json"))
            assert r.json() == {"ok": True, "n": 1} and r.headers["content-length"] == str(len(r.content))
            # canonical JSON body, ignored field and query param, redacted query value
            other = dict(CHAT_BODY, metadata={"user_id": "someone-else"})
            raw = json.dumps(other, indent=3, sort_keys=False).encode()
            r = c.post(
                recorded.url("/chat?ts=999&key=OTHER-SECRET"),
                content=raw,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 200 and r.content == SSE_BODY
            assert r.headers["x-upstream"] == "yes"
            # recorded order, then the last repeats
            assert [c.get(recorded.url("/n")).text for _ in range(4)] == [
                f"data: {i}\n\n" for i in (1, 2, 3, 3)
            ]
        # HTTP/2 over TLS to an upstream that is gone
        with _client(proxy, http2=True) as c:
            r, body, _ = _stream(c, "GET", recorded.https("/sse"))
            assert r.http_version == "HTTP/2" and r.status_code == 200 and body == SSE_BODY
        # HTTP/1.1 over TLS
        with _client(proxy) as c:
            r = c.get(recorded.https("/sse"))
            assert r.http_version == "HTTP/1.1" and r.content == SSE_BODY
        st = _status(proxy)
        assert st["active_replays"] == 0 and st["misses"] == 0
        assert "Traceback" not in proxy.log()


def test_miss_404_names_closest_and_differences(tmp_path, recorded):
    with _mock(tmp_path, recorded) as proxy, _client(proxy) as c:
        changed = dict(CHAT_BODY, messages=[{"role": "user", "content": "bye"}])
        r = c.post(recorded.url("/chat?key=x&ts=1"), json=changed)
        assert r.status_code == 404
        info = r.json()
        assert info["request"]["path"] == "/chat"
        assert (
            info["closest"]["url"].endswith("/chat?key=%5BREDACTED%5D&ts=1")
            or "chat" in info["closest"]["url"]
        )
        assert any("messages.0.content" in d for d in info["differences"]), info["differences"]
        # without sse_mock_ignore, user_id and ts are part of the match
        r = c.post(recorded.url("/chat?key=x&ts=2"), json=dict(CHAT_BODY, metadata={"user_id": "u-2"}))
        diffs = r.json()["differences"]
        assert r.status_code == 404 and any("ts" in d for d in diffs) and any("user_id" in d for d in diffs)
        r = c.get(recorded.url("/nothing-like-it"))
        assert r.status_code == 404 and r.json()["closest"]
        assert _status(proxy)["misses"] == 3


def test_instant_502_cycle_session_and_lazy(tmp_path, recorded):
    # connection_strategy=eager on purpose: the addon switches to lazy so unreachable HTTPS hosts work.
    opts = {
        "sse_mock_speed": "0",
        "sse_mock_miss": "502",
        "sse_mock_repeat": "cycle",
        "connection_strategy": "eager",
    }
    with _mock(tmp_path, recorded, **opts) as proxy:
        with _client(proxy) as c:
            t = time.monotonic()
            r, body, _ = _stream(c, "GET", recorded.url("/sse"))
            instant = time.monotonic() - t
            assert body == SSE_BODY
            assert instant < sum(GAPS) * 0.5, instant  # recorded: 0.4 s
            assert c.get(recorded.url("/missing")).status_code == 502
            assert [c.get(recorded.url("/n")).text for _ in range(4)] == [
                f"data: {i}\n\n" for i in (1, 2, 3, 1)
            ]
        with _client(proxy, http2=True) as c:
            assert c.get(recorded.https("/sse")).content == SSE_BODY
    with _mock(tmp_path / "s", recorded, sse_mock_session="beta") as proxy, _client(proxy) as c:
        assert c.get(recorded.url("/n?s=1")).text == "data: beta\n\n"
        assert c.get(recorded.url("/sse")).status_code == 404  # recorded outside the session


def test_speed_factor(tmp_path, recorded):
    with _mock(tmp_path, recorded, sse_mock_speed="2") as proxy, _client(proxy) as c:
        _, body, times = _stream(c, "GET", recorded.url("/sse"))
        assert body == SSE_BODY
        span = times[-1] - times[0]
        assert sum(GAPS[1:]) / 2 * 0.5 < span < sum(GAPS[1:]) * 0.9, span


def test_bad_options_are_refused(tmp_path, recorded):
    for opt, value in (("sse_mock_speed", "fast"), ("sse_mock_speed", "-1"), ("sse_mode", "vcr")):
        p = _mock(tmp_path / f"{opt}{value}", recorded, **{opt: value})
        try:
            p.start(timeout=15)  # mitmdump may listen briefly, then exits on the startup error
            assert p.proc is not None
            p.proc.wait(15)
        except (RuntimeError, httpx.HTTPError):
            pass
        log = p.log()
        p.stop()
        assert f"OptionsError: {opt}" in log and "exiting" in log, log


def test_fault_replays_as_fault(tmp_path, recorded):
    with _mock(tmp_path, recorded) as proxy, _client(proxy) as c:
        got = bytearray()
        with pytest.raises(httpx.HTTPError):
            with c.stream("GET", recorded.url("/fault")) as r:
                assert r.status_code == 200
                for part in r.iter_raw():
                    got += part
        assert bytes(got) == b"data: a\n\ndata: b\n\n"
    with _mock(tmp_path / "h2", recorded) as proxy, _client(proxy, http2=True) as c:
        with pytest.raises(httpx.HTTPError):
            # scheme is not part of the match: the h1 recording answers an HTTPS + HTTP/2 client too
            c.get(f"https://127.0.0.1:{recorded.h1_port}/fault").read()


@pytest.mark.parametrize("http2", [False, True])
def test_disconnect_cancels_and_concurrency(tmp_path, recorded, http2):
    with _mock(tmp_path, recorded) as proxy:
        # scheme is not part of the match: over HTTPS + HTTP/2 the h1 recordings answer too
        base = (lambda p: f"https://127.0.0.1:{recorded.h1_port}{p}") if http2 else recorded.url
        with _client(proxy, http2=http2) as c:
            with c.stream("GET", base("/long")) as r:
                it = r.iter_raw()
                next(it)
                assert _status(proxy)["active_replays"] == 1
        deadline = time.monotonic() + 5
        while (st := _status(proxy))["active_replays"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st["active_replays"] == 0 and st["cancelled"] >= 1, st
        # many replays at once, each complete
        results: list[bytes] = []

        def run() -> None:
            with _client(proxy, http2=http2) as c:
                results.append(c.get(base("/sse")).content)

        threads = [threading.Thread(target=run) for _ in range(30)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert len(results) == 30 and all(b == SSE_BODY for b in results)
        assert time.monotonic() - t < sum(GAPS) * 5  # concurrent, not one after the other
        assert _status(proxy)["active_replays"] == 0


def test_loop_until_max_duration(tmp_path, recorded):
    with _mock(tmp_path, recorded, sse_mock_loop="1") as proxy, _client(proxy) as c:
        t = time.monotonic()
        _, body, _ = _stream(c, "GET", recorded.url("/feed"))
        elapsed = time.monotonic() - t
        one = b"".join(d for _, d in FEED)
        assert body.startswith(one * 3) and len(body) % len(b"data: x\n\n") == 0
        assert body.count(b"data: x") >= 5  # a round is ~0.14 s
        assert 0.8 < elapsed < 3, elapsed
        # the whole JSON body is not looped
        assert c.get(recorded.url("/json")).json() == {"ok": True, "n": 1}


def test_miss_forward_is_not_recorded(tmp_path, recorded):
    live = [(0, b"data: live\n\n")]
    with ScriptedServer("h1-chunked", live) as srv:
        with _mock(tmp_path, recorded, sse_mock_miss="forward") as proxy, _client(proxy) as c:
            assert c.get(f"{srv.url}/fresh").content == b"data: live\n\n"
            assert c.get(recorded.url("/sse")).content == SSE_BODY  # hits are still mocked
            time.sleep(1.2)  # more than a recorder flush
            assert c.get("http://mitm-sse.mock/reload").json()["recordings"] == 13
        assert len(srv.requests) == 1


def test_mode_new_records_miss_then_replays(tmp_path, recorded):
    live = [(0.01, b"data: one\n\n"), (0.02, b"data: two\n\n")]
    srv = ScriptedServer("h1-chunked", live)
    srv.start()
    with _mock(tmp_path, recorded, sse_mode="new") as proxy, _client(proxy) as c:
        r = c.get(f"{srv.url}/new")
        assert r.content == b"data: one\n\ndata: two\n\n" and "x-mitm-sse-mock" not in r.headers
        assert c.get(recorded.url("/sse")).headers["x-mitm-sse-mock"]  # known ones are replayed
        srv.stop()  # from now on the new recording answers
        deadline = time.monotonic() + 10
        while True:
            r = c.get(f"{srv.url}/new")
            if r.status_code == 200 and "x-mitm-sse-mock" in r.headers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200 and r.content == b"data: one\n\ndata: two\n\n"
        assert r.headers["x-mitm-sse-mock"]


def test_mode_all_forwards_and_records_everything(tmp_path, recorded):
    with ScriptedServer("h1-chunked", [(0, b"data: fresh\n\n")]) as srv:
        rec = Recorded(recorded.path, srv.port, recorded.h2_port)
        with _mock(tmp_path, recorded, sse_mode="all") as proxy, _client(proxy) as c:
            assert c.get(rec.url("/sse")).content == b"data: fresh\n\n"  # recorded, yet forwarded
            proxy.wait_for(
                "SELECT count(*) FROM streams WHERE end_reason IS NOT NULL",
                lambda r: r[0][0] == 14,
                timeout=10,
            )
        assert len(srv.requests) == 1
