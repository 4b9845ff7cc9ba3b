"""Real loopback upstream servers for the test-suite.

`ScriptedServer` plays a *script* of writes to every request, over one of several wire framings, so tests can
drive mitmproxy (and the recorder behind it) with byte- and timing-exact upstream behaviour:

    with ScriptedServer("h1-chunked", [(0, b"data: a\\n\\n"), (0.05, b"data: b\\n\\n")]) as srv:
        httpx.get(srv.url + "/stream")
        (resp,) = srv.wait_responses(1)
        assert resp.body == b"data: a\\n\\ndata: b\\n\\n"

Modes:
    h1-chunked    HTTP/1.1, Transfer-Encoding: chunked, one HTTP chunk per script step (keep-alive)
    h1-close      HTTP/1.1, no Content-Length: the body ends when the server closes the connection
    h1-tls        h1-chunked over TLS (ALPN http/1.1)
    h1-close-tls  h1-close over TLS
    h2-tls        HTTP/2 over TLS (ALPN h2, `h2` library); falls back to h1-chunked if the client cannot do h2

Script steps:
    (sleep_s, bytes)        sleep, then write the bytes (one chunk / DATA frame group), then drain
    ("stall", seconds)      sleep without writing
    ("abort",)              TCP reset: SO_LINGER 0 then close, mid-stream
    ("rst_stream", code)    HTTP/2 only: RST_STREAM on this stream (code optional, default CANCEL); h1: abort

Every server runs on its own asyncio loop in a daemon thread, binds 127.0.0.1 on an ephemeral port, and bounds
every loop (requests per connection, streams per connection, idle reads, whole responses) in count and time so a
misbehaving test cannot hang the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http
import ipaddress
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from mitm_sse.replay_server import reset_connection  # RST close, as the mock replays faults

HOST = "127.0.0.1"

# name -> (framing, tls)
MODES: dict[str, tuple[str, bool]] = {
    "h1-chunked": ("chunked", False),
    "h1-close": ("close", False),
    "h1-tls": ("chunked", True),
    "h1-close-tls": ("close", True),
    "h2-tls": ("h2", True),
}

Step = tuple[Any, ...]
HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]

# Connection-specific headers are illegal in HTTP/2 (RFC 9113 8.2.2); h2 would raise on them.
_H2_FORBIDDEN = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}

# Hard bounds: nothing in here may loop or wait forever.
MAX_REQUESTS_PER_CONN = 1000
MAX_STREAMS_PER_CONN = 1000
MAX_REQUEST_BODY = 16 * 1024 * 1024
MAX_REQUEST_CHUNKS = 100_000


def sse_event(data: str, event: str | None = None, id: str | None = None, retry: int | None = None) -> bytes:
    """One SSE event block (handy for writing scripts)."""
    out = []
    if event is not None:
        out.append(f"event: {event}\n")
    if id is not None:
        out.append(f"id: {id}\n")
    if retry is not None:
        out.append(f"retry: {retry}\n")
    for line in data.split("\n"):
        out.append(f"data: {line}\n")
    return ("".join(out) + "\n").encode()


# --------------------------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str  # "HTTP/1.1" or "HTTP/2"
    t: float  # time.monotonic() when the whole request had arrived

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass
class SentResponse:
    """What the server sent for one request. Timestamps are time.monotonic() right after each drain."""

    request: RecordedRequest
    status: int
    headers: list[tuple[str, str]]
    t_headers: float | None = None
    writes: list[tuple[float, bytes]] = field(default_factory=list)  # script payload per step (no framing)
    wire: bytearray = field(default_factory=bytearray)  # h1 only: exact bytes incl. status line and framing
    t_end: float | None = None
    # running | complete | aborted | rst_stream | client_gone | timeout | cancelled
    outcome: str = "running"

    @property
    def body(self) -> bytes:
        return b"".join(d for _, d in self.writes)


@dataclass
class Route:
    status: int
    headers: list[tuple[str, str]]
    script: list[Step]


def _norm_headers(headers: HeadersLike | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


def _check_script(script: Sequence[Step]) -> list[Step]:
    # Validate up front so a typo fails at construction, not as a hung stream inside the server thread.
    out: list[Step] = []
    for i, step in enumerate(script):
        if not isinstance(step, tuple) or not step:
            raise ValueError(f"script step {i}: expected a tuple, got {step!r}")
        kind = step[0]
        if kind == "abort" and len(step) == 1:
            pass
        elif kind == "stall" and len(step) == 2 and isinstance(step[1], int | float) and step[1] >= 0:
            pass
        elif kind == "rst_stream" and len(step) in (1, 2):
            pass
        elif (
            len(step) == 2
            and isinstance(kind, int | float)
            and kind >= 0
            and isinstance(step[1], bytes | bytearray | memoryview)
        ):
            step = (float(kind), bytes(step[1]))
        else:
            raise ValueError(f"script step {i}: not understood: {step!r}")
        out.append(step)
    return out


# --------------------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    def server_context(self, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 requires TLS 1.2+
        ctx.load_cert_chain(self.cert, self.key)
        ctx.set_alpn_protocols(list(alpn))
        return ctx

    def client_context(self, alpn: Sequence[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


def make_tls_files(directory: str | Path) -> TLSFiles:
    """Create a self-signed CA and a CA-signed server cert (SAN 127.0.0.1, ::1, localhost) as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 - readable on 3.11 too
    # EC keys: generated in ~1 ms, where RSA-2048 takes ~100 ms per test.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitm-sse test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # Python 3.13+ sets VERIFY_X509_STRICT by default, which requires the AKI extension.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    files = TLSFiles(
        directory=directory,
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        cert=directory / "server.pem",
        key=directory / "server-key.pem",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.ca_key.write_bytes(key_pem(ca_key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key_pem(key))
    for p in (files.ca_key, files.key):
        p.chmod(0o600)
    return files


# --------------------------------------------------------------------------------------------- server


class _ClientGone(Exception):
    pass


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class ScriptedServer:
    """Loopback HTTP server that answers each request by playing a script of timed writes.

    `routes` maps a path (exact, with or without the query string) to `(status, headers, script)`;
    requests to other paths get the default `(status, headers, script)` given here, or 404 if `script` is None.
    `headers` are extra response headers; `content_type` is added unless `headers` has its own Content-Type.
    """

    def __init__(
        self,
        mode: str = "h1-chunked",
        script: Sequence[Step] | None = (),
        *,
        status: int = 200,
        headers: HeadersLike | None = None,
        content_type: str | None = "text/event-stream",
        routes: Mapping[str, tuple[int, HeadersLike | None, Sequence[Step]]] | None = None,
        tls: TLSFiles | None = None,
        idle_timeout: float = 10.0,
        response_timeout: float = 60.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
        self.mode = mode
        self.framing, self.is_tls = MODES[mode]
        self.content_type = content_type
        self.default: Route | None = (
            None if script is None else Route(status, _norm_headers(headers), _check_script(script))
        )
        self.routes: dict[str, Route] = {
            path: Route(st, _norm_headers(hd), _check_script(sc))
            for path, (st, hd, sc) in (routes or {}).items()
        }
        self.idle_timeout = idle_timeout
        self.response_timeout = response_timeout
        self._own_tls_dir: str | None = None
        self.tls: TLSFiles | None = tls
        if self.is_tls and self.tls is None:
            self._own_tls_dir = tempfile.mkdtemp(prefix="mitm-sse-tls-")
            self.tls = make_tls_files(self._own_tls_dir)

        self.requests: list[RecordedRequest] = []
        self.responses: list[SentResponse] = []
        self.connections = 0  # accepted connections (after TLS handshake)
        self.port = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ----------------------------------------------------------------- lifecycle (called from the test thread)

    @property
    def url(self) -> str:
        return f"{'https' if self.is_tls else 'http'}://{HOST}:{self.port}"

    def start(self, timeout: float = 5.0) -> int:
        """Start the server thread; returns the bound port."""
        if self._thread is not None:
            return self.port
        self._thread = threading.Thread(target=self._run, name=f"ScriptedServer[{self.mode}]", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("ScriptedServer did not start in time")
        if self._start_error is not None:
            raise RuntimeError("ScriptedServer failed to start") from self._start_error
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, cut every open connection, and join the thread (bounded by `timeout`)."""
        if self._thread is None:
            return
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop already gone
                loop.call_soon_threadsafe(ev.set)
        self._thread.join(timeout)
        self._thread = None
        if self._own_tls_dir is not None:
            shutil.rmtree(self._own_tls_dir, ignore_errors=True)
            self._own_tls_dir = None

    def __enter__(self) -> ScriptedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_responses(self, n: int, timeout: float = 5.0) -> list[SentResponse]:
        """Block until `n` responses have finished (any outcome); returns the first `n` finished."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                done = [r for r in self.responses if r.t_end is not None]
                if len(done) >= n:
                    return done[:n]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(done)} of {n} responses finished within {timeout} s")
                self._cond.wait(left)

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self.requests)} of {n} requests within {timeout} s")
                self._cond.wait(left)
            return list(self.requests[:n])

    # ----------------------------------------------------------------- server thread

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # surface start failures to start()
            self._start_error = e
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        ssl_ctx = None
        if self.is_tls:
            assert self.tls is not None
            alpn = ["h2", "http/1.1"] if self.framing == "h2" else ["http/1.1"]
            ssl_ctx = self.tls.server_context(alpn)
        server = await asyncio.start_server(
            self._on_connection, HOST, 0, ssl=ssl_ctx, ssl_handshake_timeout=10 if ssl_ctx else None
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for w in list(self._writers):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            for t in list(self._handlers):
                t.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=2)
            with contextlib.suppress(Exception):
                # 3.12's wait_closed waits for all connections; they are aborted above, but bound it anyway.
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Each script step must leave as its own segment, not wait for Nagle to batch it with the next.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            alpn = None
            ssl_obj = writer.get_extra_info("ssl_object")
            if ssl_obj is not None:
                alpn = ssl_obj.selected_alpn_protocol()
            if self.framing == "h2" and alpn == "h2":
                await self._serve_h2(reader, writer)
            else:
                await self._serve_h1(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError, _ClientGone):
            pass
        except asyncio.CancelledError:
            pass  # stop(): fall through to closing
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                if self._stop_event is not None and self._stop_event.is_set():
                    writer.transport.abort()
                else:
                    writer.close()
            # Never await wait_closed here: a TLS close_notify to a vanished peer could wait.

    def _route(self, path: str) -> Route:
        bare = path.split("?", 1)[0]
        route = self.routes.get(path) or self.routes.get(bare) or self.default
        return route or Route(404, [], [(0.0, b"no route\n")])

    def _response_headers(self, route: Route) -> list[tuple[str, str]]:
        headers = list(route.headers)
        if self.content_type is not None and not any(k.lower() == "content-type" for k, _ in headers):
            headers.insert(0, ("content-type", self.content_type))
        return headers

    def _record_request(self, req: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()

    def _begin(self, req: RecordedRequest, status: int, headers: list[tuple[str, str]]) -> SentResponse:
        resp = SentResponse(request=req, status=status, headers=headers)
        with self._cond:
            self.responses.append(resp)
        return resp

    def _finish(self, resp: SentResponse, outcome: str) -> None:
        with self._cond:
            if resp.t_end is None:
                resp.outcome = outcome
                resp.t_end = time.monotonic()
            self._cond.notify_all()

    # ----------------------------------------------------------------- HTTP/1.1

    async def _read_h1_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> RecordedRequest | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None  # clean close between requests
            raise
        except TimeoutError:
            return None  # idle keep-alive connection
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip(), v.strip()))
        lower = {k.lower(): v for k, v in headers}
        if lower.get("expect", "").lower() == "100-continue":
            # curl waits (1 s) for this before sending a body larger than 1 KiB
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = b""
        if "chunked" in lower.get("transfer-encoding", "").lower():
            parts = []
            total = 0
            for _ in range(MAX_REQUEST_CHUNKS):
                size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), self.idle_timeout)
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # trailers, ended by an empty line
                    for _ in range(100):
                        if await asyncio.wait_for(reader.readuntil(b"\r\n"), self.idle_timeout) == b"\r\n":
                            break
                    break
                total += size
                if total > MAX_REQUEST_BODY:
                    raise ConnectionError("request body too large")
                parts.append(await asyncio.wait_for(reader.readexactly(size + 2), self.idle_timeout))
            body = b"".join(p[:-2] for p in parts)
        elif "content-length" in lower:
            n = int(lower["content-length"])
            if n > MAX_REQUEST_BODY:
                raise ConnectionError("request body too large")
            body = await asyncio.wait_for(reader.readexactly(n), self.idle_timeout)
        return RecordedRequest(method, target, headers, body, version, time.monotonic())

    async def _serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(MAX_REQUESTS_PER_CONN):
            req = await self._read_h1_request(reader, writer)
            if req is None:
                return
            self._record_request(req)
            route = self._route(req.path)
            keep = await self._respond_h1(writer, req, route)
            if not keep or (req.header("connection") or "").lower() == "close":
                return

    async def _respond_h1(self, writer: asyncio.StreamWriter, req: RecordedRequest, route: Route) -> bool:
        """Play one response; returns whether the connection may carry another request."""
        headers = self._response_headers(route)
        names = {k.lower() for k, _ in headers}
        # A caller-supplied Content-Length means "send the body as-is": no chunk framing, keep-alive.
        chunked = self.framing in ("chunked", "h2") and "content-length" not in names
        if self.framing == "close":
            if "connection" not in names:
                headers.append(("connection", "close"))
        elif chunked and "transfer-encoding" not in names:
            headers.append(("transfer-encoding", "chunked"))
        resp = self._begin(req, route.status, headers)

        async def send(raw: bytes) -> None:
            writer.write(raw)
            resp.wire += raw
            await writer.drain()

        head = f"HTTP/1.1 {route.status} {_reason(route.status)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        outcome = "complete"
        try:
            async with asyncio.timeout(self.response_timeout):
                await send(head.encode("latin-1"))
                resp.t_headers = time.monotonic()
                if req.method == "HEAD":
                    return self.framing != "close"
                for step in route.script:
                    if step[0] in ("abort", "rst_stream"):
                        reset_connection(writer)
                        outcome = "aborted"
                        return False
                    if step[0] == "stall":
                        await asyncio.sleep(step[1])
                        continue
                    delay, data = step
                    if delay:
                        await asyncio.sleep(delay)
                    if not data:
                        continue  # an empty HTTP chunk would end the body
                    await send(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    resp.writes.append((time.monotonic(), data))
                if chunked:
                    await send(b"0\r\n\r\n")
                if self.framing == "close":
                    # The body ends with the connection; close now so the timestamp is the end of body.
                    writer.close()
                    return False
                return True
        except TimeoutError:
            outcome = "timeout"
            reset_connection(writer)
            return False
        except ConnectionError:
            outcome = "client_gone"
            raise _ClientGone from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._finish(resp, outcome)

    # ----------------------------------------------------------------- HTTP/2

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        await writer.drain()
        window_open = asyncio.Event()  # set whenever the peer grants more flow-control window
        pending: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        tasks: dict[int, asyncio.Task[None]] = {}
        reset_by_peer: set[int] = set()
        n_streams = 0
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), self.idle_timeout)
                if not data:
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    writer.write(conn.data_to_send())
                    return
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        pending[ev.stream_id] = ([(str(k), str(v)) for k, v in ev.headers], bytearray())
                    elif isinstance(ev, h2.events.DataReceived):
                        if ev.stream_id in pending:
                            buf = pending[ev.stream_id][1]
                            if len(buf) + len(ev.data) > MAX_REQUEST_BODY:
                                raise ConnectionError("request body too large")
                            buf += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in pending:
                        n_streams += 1
                        if n_streams > MAX_STREAMS_PER_CONN:
                            return
                        hdrs, body = pending.pop(ev.stream_id)
                        tasks[ev.stream_id] = asyncio.create_task(
                            self._respond_h2(
                                conn, writer, ev.stream_id, hdrs, bytes(body), window_open, reset_by_peer
                            )
                        )
                    elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                        window_open.set()
                    elif isinstance(ev, h2.events.StreamReset):
                        t = tasks.pop(ev.stream_id, None)
                        if t is not None:
                            reset_by_peer.add(ev.stream_id)
                            t.cancel()
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
                for sid in [s for s, t in tasks.items() if t.done()]:
                    del tasks[sid]
        finally:
            for t in tasks.values():
                t.cancel()
            if tasks:
                await asyncio.wait(list(tasks.values()), timeout=2)

    async def _respond_h2(
        self,
        conn: h2.connection.H2Connection,
        writer: asyncio.StreamWriter,
        sid: int,
        req_headers: list[tuple[str, str]],
        body: bytes,
        window_open: asyncio.Event,
        reset_by_peer: set[int],
    ) -> None:
        pseudo = {k: v for k, v in req_headers if k.startswith(":")}
        req = RecordedRequest(
            method=pseudo.get(":method", ""),
            path=pseudo.get(":path", ""),
            headers=[(k, v) for k, v in req_headers if not k.startswith(":")],
            body=body,
            http_version="HTTP/2",
            t=time.monotonic(),
        )
        if ":authority" in pseudo:
            req.headers.insert(0, ("host", pseudo[":authority"]))
        self._record_request(req)
        route = self._route(req.path)
        headers = [(k.lower(), v) for k, v in self._response_headers(route) if k.lower() not in _H2_FORBIDDEN]
        resp = self._begin(req, route.status, headers)

        async def flush() -> None:
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()

        async def send(data: bytes) -> None:
            view = memoryview(data)
            for _ in range(1_000_000):  # bounded: each pass sends >= 1 byte or waits (bounded by timeout)
                if not view:
                    return
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(view))
                if n <= 0:
                    window_open.clear()
                    await window_open.wait()
                    continue
                conn.send_data(sid, bytes(view[:n]))
                view = view[n:]
            raise RuntimeError("h2 send did not finish")

        outcome = "complete"
        try:
            async with asyncio.timeout(self.response_timeout):
                conn.send_headers(sid, [(":status", str(route.status)), *headers])
                await flush()
                resp.t_headers = time.monotonic()
                for step in route.script:
                    if step[0] == "abort":
                        reset_connection(writer)
                        outcome = "aborted"
                        return
                    if step[0] == "rst_stream":
                        code = step[1] if len(step) > 1 else h2.errors.ErrorCodes.CANCEL
                        conn.reset_stream(sid, error_code=code)
                        await flush()
                        outcome = "rst_stream"
                        return
                    if step[0] == "stall":
                        await asyncio.sleep(step[1])
                        continue
                    delay, data = step
                    if delay:
                        await asyncio.sleep(delay)
                    if not data:
                        continue
                    await send(data)
                    await flush()  # all frames of one step in one write
                    resp.writes.append((time.monotonic(), data))
                conn.end_stream(sid)
                await flush()
        except TimeoutError:
            outcome = "timeout"
            reset_connection(writer)
        except (ConnectionError, h2.exceptions.StreamClosedError):
            outcome = "client_gone"
        except h2.exceptions.ProtocolError:
            outcome = "client_gone"
        except asyncio.CancelledError:
            outcome = "client_gone" if sid in reset_by_peer else "cancelled"
            raise
        finally:
            self._finish(resp, outcome)
