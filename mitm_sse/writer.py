"""The writer thread: everything the recorder does that is not stamping a chunk.

The proxy's event loop only puts tuples on a SimpleQueue (see recorder.Tap). This thread drains it, keeps the
per-stream parse state (content decoder → SSE/NDJSON parser → provider decoder), buffers rows column-wise
and writes one Parquet segment per table every `flush_interval` seconds. A failure to write is logged loudly
and retried; the proxy is never blocked or broken by it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

import pyarrow as pa

from . import providers
from .contentdecode import DecodeError, make_decoder
from .messages import CHUNK, END, OPEN, STOP, SYNC
from .schema import CHUNKS, EVENTS, STREAMS
from .sse import make_parser
from .store import CaptureDir, InstanceLock, dead_instances

log = logging.getLogger("mitm_sse")


MAX_BUFFERED_ROWS = 50_000  # flush early on fast feeds: smaller batches, smaller peaks of memory
MAX_PENDING_BYTES = 512 * 1024 * 1024  # unwritable disk: keep this much in memory, then drop (loudly)
ITL_SAMPLE_CAP = 100_000  # per stream; a live feed with millions of content events keeps the first ones


def _percentile(sorted_vals: list[int], q: float) -> int:
    """Linear interpolation between closest ranks (numpy's default, DuckDB's quantile_cont)."""
    n = len(sorted_vals)
    if n == 1:
        return sorted_vals[0]
    pos = (n - 1) * q
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return round(sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo))


class _Stream:
    __slots__ = (
        "row",
        "seq",
        "last_t",
        "decode",
        "parser",
        "dec",
        "n_events",
        "n_bytes",
        "t_first_chunk",
        "t_first_event",
        "t_first_content",
        "t_last_content",
        "gaps",
        "store_error",
    )

    def __init__(self, row: dict[str, Any], kind: str) -> None:
        self.row = row
        self.seq = 0
        self.last_t = row["t_headers_ns"]
        self.decode = None
        self.parser = make_parser(kind) if kind in ("sse", "ndjson") else None
        self.n_events = 0
        self.n_bytes = 0
        self.t_first_chunk = None
        self.t_first_event = None
        self.t_first_content = None
        self.t_last_content = None
        self.gaps: list[int] = []
        self.store_error: str | None = None
        try:
            self.decode = make_decoder(row.get("content_encoding"))
        except DecodeError as e:
            self.row["parse_error"] = str(e)
            self.parser = None
        req_json = None
        body = row.get("request_body")
        if body and body[:1] == "{":
            try:
                req_json = json.loads(body)
                if not isinstance(req_json, dict):
                    req_json = None
            except ValueError:
                pass
        info = providers.RequestInfo(
            method=row["method"] or "",
            host=row["host"] or "",
            path=row["path"] or "",
            query=row["query"] or "",
            content_type=(row["content_type"] or "").lower(),
            request_json=req_json,
        )
        self.dec = providers.decoder_for(info)


class Writer:
    """Owns the capture folder for one recorder process."""

    def __init__(self, capture: CaptureDir, instance: str, flush_interval: float = 0.5) -> None:
        self.capture = capture
        self.instance = instance
        self.flush_interval = flush_interval
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, _Stream] = {}
        self._cols: dict[str, dict[str, list]] = {}
        self._reset_buffers()
        self._pending: list[tuple[str, pa.Table]] = []  # segments that failed to write
        self._pending_bytes = 0
        self._seg_counter = 0
        self._last_compact = time.monotonic()
        self.compact_interval = 30.0
        self.errors = 0
        self.dropped_rows = 0
        self._thread: threading.Thread | None = None
        self._lock: InstanceLock | None = None
        self.alive = False
        # How streams still open at STOP end: the proxy closes them itself on a clean shutdown; if it
        # vanished (writer_proc sees EOF without STOP), they end as proxy_crashed.
        self.crash_reason = ("proxy_shutdown", "proxy stopped while the stream was open")

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.capture.ensure()
        self._lock = InstanceLock(self.capture, self.instance)
        try:  # before the proxy reports ready: `duckdb <dir>/capture.duckdb` works as soon as it listens
            from .capture import write_views_db

            write_views_db(self.capture)
        except Exception as e:  # the Parquet files are the store; the views file is a convenience
            log.warning("mitm-sse: could not write %s/capture.duckdb: %s", self.capture.path, e)
        self._thread = threading.Thread(target=self._run, name="mitm-sse-writer", daemon=True)
        self.alive = True
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self.q.put((STOP,))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("mitm-sse: writer did not finish within %.0f s; some rows may be lost", timeout)
        self._thread = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def sync(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written (tests, `done`)."""
        ev = threading.Event()
        self.q.put((SYNC, ev))
        return ev.wait(timeout)

    # ---- thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._startup()
        except Exception:
            # warning, not error: mitmproxy 12 exits when an error is logged during startup, and a failed
            # recovery must not stop the proxy.
            log.warning("mitm-sse: recovering earlier captures failed (recording goes on)", exc_info=True)
        get = self.q.get
        next_flush = time.monotonic() + self.flush_interval
        try:
            while True:
                timeout = next_flush - time.monotonic()
                msg = None
                if timeout > 0:
                    try:
                        msg = get(timeout=timeout)
                    except queue.Empty:
                        msg = None
                if msg is not None:
                    if self._handle(msg):
                        break
                    if self._n_rows < MAX_BUFFERED_ROWS:
                        continue
                if time.monotonic() >= next_flush or msg is not None:
                    self._flush()
                    self._maybe_compact()
                    next_flush = time.monotonic() + self.flush_interval
        except BaseException:
            log.exception("mitm-sse: the writer thread died; traffic is unaffected but is no longer recorded")
            self.alive = False
            raise
        # STOP: drain what is left, close open streams, final flush.
        try:
            while True:
                self._handle(self.q.get_nowait())
        except queue.Empty:
            pass
        now = time.time_ns()
        for sid in list(self.streams):
            self._end(sid, now, *self.crash_reason)
        self._flush()
        if self._pending:
            log.error("mitm-sse: %d segments could not be written at shutdown", len(self._pending))
        self.alive = False

    def _handle(self, msg: tuple) -> bool:
        """Apply one queue message; True for STOP."""
        kind = msg[0]
        if kind == CHUNK:
            self._chunk(msg[1], msg[2], msg[3])
        elif kind == OPEN:
            self._open(msg[1])
        elif kind == END:
            self._end(msg[1], msg[2], msg[3], msg[4])
        elif kind == SYNC:
            self._flush()
            msg[1].set()
        elif kind == STOP:
            return True
        return False

    def _startup(self) -> None:
        from .migrations import migrate

        migrate(self.capture)
        n = self.capture.cleanup_tmp()
        if n:
            log.info("mitm-sse: removed %d temporary files left by a killed recorder", n)
        dead = [d for d in dead_instances(self.capture) if d[0] != self.instance]
        if dead:
            from .recovery import close_orphans

            close_orphans(self, [d[0] for d in dead])
            for _, lf in dead:
                try:
                    lf.unlink()
                except OSError:
                    pass

    # ---- message handlers ---------------------------------------------------------------------------
    def _reset_buffers(self) -> None:
        self._cols = {
            "streams": {f.name: [] for f in STREAMS},
            "chunks": {f.name: [] for f in CHUNKS},
            "events": {f.name: [] for f in EVENTS},
        }
        c = self._cols["chunks"]
        self._c_sid, self._c_seq, self._c_t = c["stream_id"], c["seq"], c["t_ns"]
        self._c_delta, self._c_size, self._c_data = c["delta_ns"], c["size"], c["data"]
        e = self._cols["events"]
        self._e_cols = (
            e["stream_id"],
            e["seq"],
            e["chunk_seq"],
            e["t_ns"],
            e["event"],
            e["data"],
            e["id"],
            e["retry"],
            e["delta_text"],
            e["content_kind"],
        )
        self._n_rows = 0

    def _add_stream_row(self, row: dict[str, Any]) -> None:
        cols = self._cols["streams"]
        row["t_updated_ns"] = time.time_ns()
        row.setdefault("instance", self.instance)
        for name, col in cols.items():
            col.append(row.get(name))
        self._n_rows += 1

    def _open(self, row: dict[str, Any]) -> None:
        sid = row["stream_id"]
        st = _Stream(row, row["kind"])
        self.streams[sid] = st
        row["rev"] = 0
        self._add_stream_row(dict(row))

    def _chunk(self, sid: str, t_ns: int, data: bytes | tuple[int]) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        seq = st.seq
        st.seq = seq + 1
        if type(data) is tuple:  # (size,) marker from the tap: data dropped, size known
            size = data[0]
            data = None
            st.store_error = "chunk data dropped: the writer fell behind (memory cap)"
        else:
            size = len(data)
        st.n_bytes += size
        if st.t_first_chunk is None:
            st.t_first_chunk = t_ns
        self._c_sid.append(sid)
        self._c_seq.append(seq)
        self._c_t.append(t_ns)
        self._c_delta.append(t_ns - st.last_t)
        self._c_size.append(size)
        self._c_data.append(data)
        st.last_t = t_ns
        self._n_rows += 1
        if st.parser is None or data is None:
            return
        if st.decode is not None:
            try:
                data = st.decode(data)
            except DecodeError as e:
                st.row["parse_error"] = f"{e} (at chunk {seq}); events stop here, chunks are complete"
                st.parser = None
                return
            if not data:
                return
        try:
            evs = st.parser.feed(data)
        except Exception as e:  # the parser is written not to raise; never let a bug stop recording
            log.exception("mitm-sse: parser failed on stream %s", sid)
            st.row["parse_error"] = f"parser failed: {e!r}"
            st.parser = None
            return
        if evs:
            self._events(sid, st, evs, seq, t_ns)

    def _events(self, sid: str, st: _Stream, evs: list, chunk_seq: int, t_ns: int) -> None:
        (c_sid, c_seq, c_cseq, c_t, c_ev, c_data, c_id, c_retry, c_delta, c_kind) = self._e_cols
        feed = st.dec.feed
        n = st.n_events
        if st.t_first_event is None:
            st.t_first_event = t_ns
        for ev in evs:
            delta = feed(ev.event, ev.data)
            c_sid.append(sid)
            c_seq.append(n)
            c_cseq.append(chunk_seq)
            c_t.append(t_ns)
            c_ev.append(ev.event)
            c_data.append(ev.data)
            c_id.append(ev.id)
            c_retry.append(ev.retry)
            n += 1
            if delta is not None:
                c_delta.append(delta.text)
                c_kind.append(delta.kind)
                if st.t_first_content is None:
                    st.t_first_content = t_ns
                elif len(st.gaps) < ITL_SAMPLE_CAP:
                    st.gaps.append(t_ns - st.t_last_content)
                st.t_last_content = t_ns
            else:
                c_delta.append(None)
                c_kind.append(None)
        self._n_rows += n - st.n_events
        st.n_events = n

    def _end(self, sid: str, t_end_ns: int, reason: str, error: str | None) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        if st.decode is not None and st.parser is not None and reason == "complete" and st.seq:
            err = st.decode.finish()
            if err:
                st.row["parse_error"] = err
        if st.parser is not None:
            try:
                tail = st.parser.close()
            except Exception:
                tail = []
            if tail:
                self._events(sid, st, tail, max(st.seq - 1, 0), st.last_t)
        row = st.row
        row["rev"] = 1
        row["t_end_ns"] = t_end_ns
        row["end_reason"] = reason
        row["error"] = error
        row["n_chunks"] = st.seq
        row["n_bytes"] = st.n_bytes
        row["n_events"] = st.n_events
        row["store_error"] = st.store_error
        dec = st.dec
        row["provider"] = dec.provider
        row["model"] = dec.model or row.get("model")
        row["input_tokens"] = dec.input_tokens
        row["output_tokens"] = dec.output_tokens
        row["stop_reason"] = dec.stop_reason
        row["provider_error"] = dec.error
        row["n_content_events"] = dec.n_content_events
        row["t_first_chunk_ns"] = st.t_first_chunk
        row["t_first_event_ns"] = st.t_first_event
        row["t_first_content_ns"] = st.t_first_content
        row["t_last_content_ns"] = st.t_last_content
        if st.gaps:
            g = sorted(st.gaps)
            row["itl_p50_ns"] = _percentile(g, 0.50)
            row["itl_p95_ns"] = _percentile(g, 0.95)
            row["itl_p99_ns"] = _percentile(g, 0.99)
            row["itl_max_ns"] = g[-1]
        self._add_stream_row(row)

    # ---- output -------------------------------------------------------------------------------------
    def _segment_name(self) -> str:
        self._seg_counter += 1
        return f"s-{time.time_ns():020d}-{self.instance}-{self._seg_counter:06d}"

    def _flush(self) -> None:
        if self._n_rows:
            tables = []
            for name, schema in (("streams", STREAMS), ("chunks", CHUNKS), ("events", EVENTS)):
                cols = self._cols[name]
                if cols["stream_id"]:
                    try:
                        t = _to_table(cols, schema)
                    except Exception:
                        log.exception(
                            "mitm-sse: could not build the %s batch; %d rows lost",
                            name,
                            len(cols["stream_id"]),
                        )
                        self.dropped_rows += len(cols["stream_id"])
                        continue
                    tables.append((name, t))
            self._reset_buffers()
            for item in tables:
                self._pending.append(item)
                self._pending_bytes += item[1].nbytes
        if not self._pending:
            return
        still: list[tuple[str, pa.Table]] = []
        for table, data in self._pending:
            if still:  # keep order: once one write failed, the rest waits for the next try
                still.append((table, data))
                continue
            try:
                # A fresh name per write: retried batches must never overwrite one another.
                self.capture.write_segment(table, data, self._segment_name())
            except OSError as e:
                self.errors += 1
                if self.errors == 1 or self.errors % 20 == 0:
                    log.error(
                        "mitm-sse: CANNOT WRITE to %s (%s); keeping %.1f MB in memory and retrying. "
                        "Traffic is not affected.",
                        self.capture.path,
                        e.strerror or e,
                        self._pending_bytes / 1e6,
                    )
                still.append((table, data))
        if self.errors and not still and self._pending:
            log.warning("mitm-sse: writing to %s works again; recording resumed", self.capture.path)
            self.errors = 0
        self._pending = still
        self._pending_bytes = sum(t.nbytes for _, t in still)
        while self._pending_bytes > MAX_PENDING_BYTES and self._pending:
            table, data = self._pending.pop(0)
            self._pending_bytes -= data.nbytes
            self.dropped_rows += data.num_rows
            log.error(
                "mitm-sse: dropped %d %s rows that could not be written (memory cap)", data.num_rows, table
            )

    def _maybe_compact(self) -> None:
        now = time.monotonic()
        if now - self._last_compact < self.compact_interval or self._pending:
            return
        self._last_compact = now
        for table in ("streams", "chunks", "events"):
            try:
                self.capture.compact(table, self.instance)
            except Exception:
                log.exception("mitm-sse: compaction of %s failed (data is safe; will retry)", table)
        pa.default_memory_pool().release_unused()  # hand Arrow's freed buffers back to the OS


def _clean_str(v: object) -> object:
    """A str that UTF-8 can encode: lone surrogates (mitmproxy's surrogateescape of non-UTF-8 header, path
    or URL bytes) become U+FFFD."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return v


def _to_table(cols: dict[str, list], schema: pa.Schema) -> pa.Table:
    try:
        return pa.Table.from_pydict(cols, schema=schema)
    except (UnicodeEncodeError, pa.ArrowInvalid, pa.ArrowTypeError):
        # One odd value must not cost the whole batch: clean every text column and try again.
        cleaned = {
            name: [_clean_str(v) for v in col] if pa.types.is_string(schema.field(name).type) else col
            for name, col in cols.items()
        }
        return pa.Table.from_pydict(cleaned, schema=schema)
