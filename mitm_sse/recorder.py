"""The Recorder addon: streams every SSE/NDJSON response through a tap that stores each chunk.

Hooks used, and why:
- request: take the per-request session label (x-mitm-sse-session) off the request before it is forwarded.
- responseheaders: the only point where a response can be switched to streaming; we set
  flow.response.stream to a Tap, which stamps and enqueues each chunk and returns it unchanged.
- response / error: the reliable end of a stream (the tap also sees b"" at the end, twice over HTTP/2 on
  mitmproxy 11, so it is not used as an end signal).
- done: open streams end as proxy_shutdown and the writer flushes everything (SIGTERM, Ctrl-C, `q`).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from mitmproxy import connection, ctx, exceptions, flowfilter, http

from .messages import CHUNK, END, OPEN
from .sse import stream_kind
from .store import CaptureDir, StoreError, default_dir, new_instance_id
from .writer_proc import WriterClient

log = logging.getLogger("mitm_sse")

SESSION_HEADER = "x-mitm-sse-session"
DEFAULT_REDACT = "authorization,proxy-authorization,x-api-key,api-key,cookie,set-cookie,x-goog-api-key"
DEFAULT_REDACT_PARAMS = "key,api_key,apikey,access_token,token,sig,signature"
REDACTED = "[REDACTED]"
MAX_BACKLOG_BYTES = 256 * 1024 * 1024  # beyond this, chunks pass through but only their size is stored
MAX_REQUEST_BODY = 16 * 1024 * 1024


def _split_names(value: str) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in value.split(",") if n.strip())


def headers_json(headers: http.Headers, redact: frozenset[str]) -> str:
    """JSON object of lower-cased names; repeated headers joined with ', '; redacted values replaced."""
    out: dict[str, str] = {}
    for name, value in headers.items(multi=True):
        key = name.lower()
        if key in redact:
            value = REDACTED
        out[key] = f"{out[key]}, {value}" if key in out else value
    return json.dumps(out, ensure_ascii=False)


def redact_query(url: str, params: frozenset[str]) -> tuple[str, str]:
    """(url, query) with the values of secret query parameters replaced."""
    parts = urlsplit(url)
    if not parts.query or not params:
        return url, parts.query
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k.lower() in params for k, _ in pairs):
        return url, parts.query
    q = urlencode([(k, REDACTED if k.lower() in params else v) for k, v in pairs], safe="[]")
    return urlunsplit(parts._replace(query=q)), q


class Tap:
    """flow.response.stream callable. Runs on mitmproxy's event loop: stamp, enqueue, return unchanged."""

    __slots__ = ("sid", "w", "put", "chain")

    def __init__(self, sid: str, writer: WriterClient, chain: Callable[[bytes], Any] | None) -> None:
        self.sid = sid
        self.w = writer
        self.put = writer.q.put
        self.chain = chain  # a stream callable set by another addon before us: it still runs, after us

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        if data:
            w = self.w
            if w.alive:  # a dead writer's queue would only grow
                n = len(data)
                if w.enqueued_bytes - w.dequeued_bytes < MAX_BACKLOG_BYTES:
                    w.enqueued_bytes += n
                    self.put((CHUNK, self.sid, time.time_ns(), data))
                else:  # the writer fell far behind: keep the traffic flowing, store only the size
                    self.put((CHUNK, self.sid, time.time_ns(), (n,)))
        if self.chain is not None:
            return self.chain(data)
        return data


class Recorder:
    def __init__(self) -> None:
        self.writer: WriterClient | None = None
        self.capture: CaptureDir | None = None
        self.filter: flowfilter.TFilter | None = None
        self.redact: frozenset[str] = _split_names(DEFAULT_REDACT)
        self.redact_params: frozenset[str] = _split_names(DEFAULT_REDACT_PARAMS)
        self.open: dict[str, http.HTTPFlow] = {}
        self._restarting = False
        self._last_restart = 0.0

    # ---- options ------------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option("sse_dir", str, "", "Capture folder (default: $MITM_SSE_DIR or ~/.mitm-sse).")
        loader.add_option("sse_filter", str, "", "mitmproxy filter expression limiting what is recorded.")
        loader.add_option(
            "sse_session",
            str,
            "",
            f"Session label for recorded streams (request header {SESSION_HEADER} overrides).",
        )
        loader.add_option(
            "sse_redact", str, DEFAULT_REDACT, "Comma-separated header names whose values never reach disk."
        )
        loader.add_option(
            "sse_redact_params",
            str,
            DEFAULT_REDACT_PARAMS,
            "Comma-separated URL query parameter names whose values never reach disk.",
        )
        loader.add_option(
            "sse_record",
            str,
            "streams",
            "What to record: 'streams' (SSE and NDJSON responses, plus non-streamed answers to requests that "
            "asked for a stream, e.g. a 429), 'all' (also every other response matching sse_filter, whole), "
            "'none' (pass-through).",
        )

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "sse_filter" in updated:
            if o.sse_filter:
                try:
                    self.filter = flowfilter.parse(o.sse_filter)
                except ValueError as e:
                    raise exceptions.OptionsError(
                        f"sse_filter: invalid filter expression {o.sse_filter!r}: {e}"
                    ) from None
            else:
                self.filter = None
        if "sse_redact" in updated:
            self.redact = _split_names(o.sse_redact)
        if "sse_redact_params" in updated:
            self.redact_params = _split_names(o.sse_redact_params)
        if "sse_record" in updated and o.sse_record not in ("streams", "all", "none"):
            raise exceptions.OptionsError(f"sse_record must be streams, all or none, not {o.sse_record!r}")
        if "sse_dir" in updated or self.writer is None:
            path = o.sse_dir or str(default_dir())
            cap = CaptureDir(path)
            if self.capture is not None and cap.path == self.capture.path and self.writer is not None:
                return
            try:
                cap.ensure(files=False)
            except StoreError as e:
                raise exceptions.OptionsError(f"sse_dir: {e}") from None
            self._start_writer(cap)

    def _start_writer(self, cap: CaptureDir) -> None:
        if self.writer is not None:
            self._close_all("proxy_shutdown", "capture folder changed")
            self.writer.stop()
        self.capture = cap
        self.writer = WriterClient(cap, new_instance_id())
        try:
            self.writer.start()
        except (OSError, StoreError) as e:
            self.writer = None
            raise exceptions.OptionsError(f"sse_dir: cannot record into {cap.path}: {e}") from None
        log.info("mitm-sse: recording SSE streams into %s", cap.path)

    # ---- hooks --------------------------------------------------------------------------------------
    def running(self) -> None:
        # Everything loaded so far lives as long as the proxy: move it out of the GC's generations, so a full
        # collection (which pauses the event loop, and so every stream) has far fewer objects to walk.
        gc.collect()
        gc.freeze()

    def request(self, flow: http.HTTPFlow) -> None:
        # The URL as the client asked for it: map_remote and other rewrites run after script addons, and the
        # Mock matches on this too, so a capture made through map_remote replays to the same client request.
        flow.metadata["mitm_sse.client_url"] = _client_url(flow.request)
        label = flow.request.headers.get(SESSION_HEADER)
        if label is not None:
            flow.metadata["mitm_sse.session"] = label
            del flow.request.headers[SESSION_HEADER]

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.writer is None or ctx.options.sse_record == "none":
            return False
        if flow.metadata.get("mitm_sse.mocked"):  # answered by the Mock addon from a recording
            return False
        if not self.writer.alive:
            self._restart_writer()
            return False
        return self.filter is None or bool(self.filter(flow))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        kind = stream_kind(resp.headers.get("content-type"))
        if kind is None or not self._wanted(flow):
            return
        # HEAD and 204/304 carry no body: nothing to tap (mitmproxy ends them at the headers).
        if flow.request.method == "HEAD" or resp.status_code in (204, 304):
            return
        sid = self._open(flow, kind)
        prev = resp.stream
        resp.stream = Tap(sid, self.writer, prev if callable(prev) else None)

    def response(self, flow: http.HTTPFlow) -> None:
        sid = flow.metadata.get("mitm_sse.stream_id")
        if sid is not None:
            self._end(flow, "complete", None)
            return
        if flow.response is None or flow.response.stream or not self._wanted(flow):
            return
        mode = ctx.options.sse_record
        if mode == "all" or (mode == "streams" and self._asked_for_stream(flow)):
            self._record_whole(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("mitm_sse.stream_id") is None:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        self._end(flow, classify_error(flow, msg), msg)

    def done(self) -> None:
        if self.writer is None:
            return
        self._close_all("proxy_shutdown", "proxy stopped while the stream was open")
        self.writer.stop()
        self.writer = None

    # ---- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _asked_for_stream(flow: http.HTTPFlow) -> bool:
        if "text/event-stream" in flow.request.headers.get("accept", ""):
            return True
        ct = flow.request.headers.get("content-type", "")
        if "json" in ct and b'"stream"' in (flow.request.raw_content or b""):
            try:
                body = json.loads(flow.request.raw_content)
                return isinstance(body, dict) and body.get("stream") is True
            except ValueError:
                return False
        return False

    def _stream_row(self, flow: http.HTTPFlow, kind: str) -> dict[str, Any]:
        req, resp = flow.request, flow.response
        assert resp is not None
        now = time.time_ns()
        sid = f"{now:016x}{flow.id[:8]}"
        scheme, host, port, path, client_url = flow.metadata.get("mitm_sse.client_url") or _client_url(req)
        url, query = redact_query(client_url, self.redact_params)
        raw = req.raw_content
        body_text = body_raw = None
        if raw:
            if len(raw) > MAX_REQUEST_BODY:
                raw = raw[:MAX_REQUEST_BODY]
            try:
                body_text = raw.decode("utf-8")
            except UnicodeDecodeError:
                body_text = raw.decode("utf-8", "replace")
                body_raw = raw
        t_req = req.timestamp_end or req.timestamp_start
        session = flow.metadata.get("mitm_sse.session", ctx.options.sse_session) or ""
        return {
            "stream_id": sid,
            "session": session,
            "kind": kind,
            "method": req.method,
            "scheme": scheme,
            "url": url,
            "host": host,
            "port": port,
            "path": path.split("?", 1)[0],
            "query": query,
            "status": resp.status_code,
            "request_headers_json": headers_json(req.headers, self.redact),
            "request_body": body_text,
            "request_body_raw": body_raw,
            "response_headers_json": headers_json(resp.headers, self.redact),
            "content_type": resp.headers.get("content-type"),
            "content_encoding": resp.headers.get("content-encoding"),
            "http_version": resp.http_version,
            "t_request_ns": int(t_req * 1e9) if t_req else None,
            "t_headers_ns": now,
            "model": _request_model(body_text),
        }

    def _restart_writer(self) -> None:
        """The writer process died: start a new one off the event loop, at most every 5 s.

        Streams that were open in the dead writer keep flowing to their clients unrecorded; the new writer's
        start-up recovery closes them in the store as proxy_crashed.
        """
        now = time.monotonic()
        if self._restarting or now - self._last_restart < 5.0 or self.capture is None:
            return
        self._restarting = True
        self._last_restart = now
        cap, old = self.capture, self.writer

        def restart() -> None:
            try:
                new = WriterClient(cap, new_instance_id())
                new.start()
            except Exception as e:
                log.error(
                    "mitm-sse: restarting the writer failed (%s); will retry; traffic is not affected", e
                )
            else:
                if self.writer is old:
                    self.writer = new
                    log.warning("mitm-sse: writer restarted; recording resumed for new streams")
                else:
                    new.stop()
            finally:
                self._restarting = False

        threading.Thread(target=restart, name="mitm-sse-writer-restart", daemon=True).start()

    def _open(self, flow: http.HTTPFlow, kind: str) -> str:
        row = self._stream_row(flow, kind)
        sid = row["stream_id"]
        flow.metadata["mitm_sse.stream_id"] = sid
        self.open[sid] = flow
        self.writer.q.put((OPEN, row))
        return sid

    def _end(self, flow: http.HTTPFlow, reason: str, error: str | None) -> None:
        sid = flow.metadata.pop("mitm_sse.stream_id", None)
        if sid is None or self.open.pop(sid, None) is None or self.writer is None:
            return
        self.writer.q.put((END, sid, time.time_ns(), reason, error))

    def _close_all(self, reason: str, error: str) -> None:
        for flow in list(self.open.values()):
            self._end(flow, reason, error)

    def _record_whole(self, flow: http.HTTPFlow) -> None:
        """A non-streamed response, stored as one chunk (mitmproxy already buffered it)."""
        resp = flow.response
        assert resp is not None
        kind = stream_kind(resp.headers.get("content-type")) or "body"
        row = self._stream_row(flow, kind)
        t_headers = int(resp.timestamp_start * 1e9) if resp.timestamp_start else row["t_headers_ns"]
        row["t_headers_ns"] = t_headers
        sid = row["stream_id"]
        put = self.writer.q.put
        put((OPEN, row))
        body = resp.raw_content or b""
        t_end = int(resp.timestamp_end * 1e9) if resp.timestamp_end else time.time_ns()
        if body:
            self.writer.enqueued_bytes += len(body)
            put((CHUNK, sid, t_end, body))
        put((END, sid, t_end, "complete", None))


def _client_url(req: http.Request) -> list:
    """[scheme, host, port, path, url] of the request as it is now."""
    return [req.scheme, req.pretty_host, req.port, req.path, req.pretty_url]


def _gone(conn: connection.Connection | None) -> bool:
    """The peer closed its side (mitmproxy clears CAN_READ on EOF, before the layers see it)."""
    if conn is None:
        return False
    return conn.timestamp_end is not None or not (conn.state & connection.ConnectionState.CAN_READ)


def classify_error(flow: http.HTTPFlow, msg: str) -> str:
    """end_reason for a stream that failed: which side went away?

    mitmproxy's messages are not enough on their own: "peer closed connection" and (over HTTP/2) "stream
    reset by client (...)" are used for both sides. So look at the connections too.
    """
    low = msg.lower()
    if "client disconnected" in low or "client closed" in low:
        return "client_disconnected"
    if low == "killed" or "killed by" in low:
        return "killed"
    client_gone = _gone(flow.client_conn)
    server_gone = _gone(flow.server_conn)
    if client_gone and not server_gone:
        return "client_disconnected"
    if "stream reset by client" in low and not server_gone:
        # An RST_STREAM: from the client if only the client side speaks HTTP/2.
        server_h2 = flow.server_conn is not None and flow.server_conn.alpn == b"h2"
        if not server_h2:
            return "client_disconnected"
    return "server_error"


def _request_model(body: str | None) -> str | None:
    if not body or '"model"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    m = obj.get("model") if isinstance(obj, dict) else None
    return m if isinstance(m, str) else None
