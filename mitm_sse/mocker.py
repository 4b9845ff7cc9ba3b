"""The Mock addon: answer matched requests from recorded streams, with the recorded timing.

Hooks used, and why:
- running: start the replay server (replay_server.py) on mitmproxy's own loop and load the index.
- request: match the request against the index (matching.py). A hit is rewritten to the replay server with
  a one-time token; a miss is answered (404 / 502) or forwarded, by option and record mode.
- responseheaders: mocked flows stream (flow.response.stream = True) so each chunk leaves at once.
- response / error: put the original URL back on mocked flows (so flow lists show the real host) and,
  in `new` mode, pick up what the Recorder just stored so the next identical request replays it.

Everything that touches DuckDB runs in a worker thread (asyncio.to_thread): the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import math
import threading
import time
from typing import Any

from mitmproxy import ctx, exceptions, http

from .matching import IgnoreSpec, Index, MatchConfig, Recording, RequestView, parse_ignore
from .replay_server import TOKEN_HEADER, Chunks, Job, ReplayServer

log = logging.getLogger("mitm_sse")

STATUS_HOST = "mitm-sse.mock"  # http://mitm-sse.mock/status answers with the mock's counters
MODES = ("replay", "new", "all")
MISS = ("404", "502", "forward")
CHUNK_CACHE_BYTES = 256 * 1024 * 1024
PRELOAD_BYTES = 64 * 1024 * 1024  # captures up to this size are loaded whole at start
# A stream the *client* abandoned says nothing about the server: never replay it.
SKIP_END_REASONS = ("client_disconnected",)


def parse_speed(value: str) -> float:
    try:
        speed = float(value)
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not math.isfinite(speed) or speed < 0:
        raise ValueError(f"must be 0 (instant) or a positive factor, not {value!r}")
    return speed


def parse_loop(value: str) -> float | None:
    v = value.strip().lower()
    if v in ("", "0", "off", "no", "false"):
        return None
    if v in ("forever", "inf", "on", "yes", "true"):
        return math.inf
    try:
        s = float(v)
    except ValueError:
        raise ValueError(f"use off, forever or a number of seconds, not {value!r}") from None
    if not s > 0:
        raise ValueError(f"must be positive, not {value!r}")
    return s


def _split(value: str) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in value.split(",") if n.strip())


class Store:
    """Reads the capture folder for the mock. Blocking: call from worker threads only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._con = None
        self._files: dict[str, list[str]] | None = None

    def _connect(self):
        from .capture import open_capture
        from .store import CaptureDir

        if self._con is None:
            self._con = open_capture(self.path)
            self._files = CaptureDir(self.path).snapshot()
        return self._con

    def changed(self) -> bool:
        from .store import CaptureDir

        return CaptureDir(self.path).snapshot() != self._files

    def refresh(self) -> None:
        from .capture import refresh
        from .store import CaptureDir

        with self._lock:
            con = self._connect()
            self._files = CaptureDir(self.path).snapshot()
            refresh(con)

    def recordings(self, session: str | None) -> list[Recording]:
        with self._lock:
            cur = self._connect().cursor()
        sql = """
            SELECT stream_id, session, kind, method, host, port, path, query, request_headers_json,
                   request_body, request_body_raw, status, response_headers_json, content_encoding,
                   t_request_ns, t_headers_ns, t_end_ns, end_reason, error, n_chunks, url
            FROM streams WHERE end_reason IS NOT NULL AND end_reason NOT IN ?
        """
        params: list[Any] = [list(SKIP_END_REASONS)]
        if session is not None:
            sql += " AND session = ?"
            params.append(session)
        try:
            rows = cur.execute(sql, params).fetchall()
        finally:
            cur.close()
        return [_recording(r) for r in rows]

    def chunks(self, stream_id: str) -> Chunks:
        for attempt in (0, 1):
            with self._lock:
                cur = self._connect().cursor()
            try:
                return cur.execute(
                    "SELECT t_ns, data FROM chunks WHERE stream_id = ? ORDER BY seq", [stream_id]
                ).fetchall()
            except Exception:
                if attempt:
                    raise
                self.refresh()  # a compaction swapped files under the snapshot: rebind and retry
            finally:
                cur.close()
        return []

    def preload(self, stream_ids: list[str], budget: int) -> dict[str, Chunks]:
        """Every chunk of these streams in one scan, if they fit in `budget` bytes (else {})."""
        with self._lock:
            cur = self._connect().cursor()
        try:
            (total,) = cur.execute(
                "SELECT coalesce(sum(n_bytes), 0) FROM streams WHERE stream_id IN ?", [stream_ids]
            ).fetchone()
            if not stream_ids or total > budget:
                return {}
            rows = cur.execute(
                "SELECT stream_id, list(t_ns ORDER BY seq), list(data ORDER BY seq) FROM chunks "
                "WHERE stream_id IN ? GROUP BY stream_id",
                [stream_ids],
            ).fetchall()
        finally:
            cur.close()
        return {sid: list(zip(ts, ds, strict=True)) for sid, ts, ds in rows}

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


def _recording(r: tuple) -> Recording:
    (sid, session, kind, method, host, port, path, query, req_h, body, body_raw, status, resp_h, enc) = r[:14]
    t_req, t_head, t_end, end_reason, error, n_chunks, url = r[14:]
    headers: dict[str, str] = {}
    try:
        headers = json.loads(req_h or "{}")
    except ValueError:
        pass
    try:
        resp_headers = list(json.loads(resp_h or "{}").items())
    except ValueError:
        resp_headers = []
    raw = body_raw if body_raw is not None else (body.encode("utf-8") if body is not None else None)
    return Recording(
        stream_id=sid,
        session=session or "",
        kind=kind or "sse",
        request=RequestView(
            method or "GET", host or "", int(port or 0), path or "/", query or "", raw, headers
        ),
        status=int(status or 200),
        response_headers=resp_headers,
        content_encoding=enc,
        t_request_ns=int(t_req or t_head or 0),
        t_headers_ns=int(t_head or 0),
        t_end_ns=int(t_end or 0),
        end_reason=end_reason,
        error=error,
        n_chunks=int(n_chunks or 0),
        url=url or "",
    )


class Mock:
    def __init__(self, recorder: Any = None) -> None:
        self.recorder = recorder  # the Recorder loaded beside us (mock.py), for `new` mode syncs
        self.server: ReplayServer | None = None
        self.store: Store | None = None
        self.index: Index | None = None
        self.cfg = MatchConfig()
        self.speed = 1.0
        self.loop_s: float | None = None
        self._stale = True
        self._index_lock: asyncio.Lock | None = None
        self._cache: collections.OrderedDict[str, Chunks] = collections.OrderedDict()
        self._cache_bytes = 0
        self._loading: dict[str, asyncio.Future] = {}
        self._bg: set[asyncio.Task] = set()
        self.hits = 0
        self.misses = 0

    # ---- options ------------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        if "sse_dir" not in loader.master.options:  # the Recorder defines it when loaded beside us
            loader.add_option("sse_dir", str, "", "Capture folder (default: $MITM_SSE_DIR or ~/.mitm-sse).")
        loader.add_option(
            "sse_mode",
            str,
            "replay",
            "replay: answer from recordings only; new: a miss is forwarded and recorded, then replayed; "
            "all: forward and record everything.",
        )
        loader.add_option(
            "sse_mock_speed",
            str,
            "1",
            "Replay speed: 1 recorded timing, 0 instant, 2 twice as fast, 0.5 half.",
        )
        loader.add_option(
            "sse_mock_miss",
            str,
            "404",
            "In replay mode, a request with no recording gets: 404, 502 or forward.",
        )
        loader.add_option(
            "sse_mock_ignore",
            str,
            "",
            "Comma-separated parts left out of matching: JSON body paths (metadata.user_id, messages.*.id), "
            "query:NAME, header:NAME.",
        )
        loader.add_option(
            "sse_mock_headers",
            str,
            "",
            "Comma-separated request headers that must match too (none by default).",
        )
        loader.add_option("sse_mock_session", str, "", "Only replay recordings of this session.")
        loader.add_option(
            "sse_mock_repeat",
            str,
            "last",
            "When the recordings of a request are used up: 'last' repeats the last, 'cycle' starts over.",
        )
        loader.add_option(
            "sse_mock_loop",
            str,
            "off",
            "Replay each stream in a loop: off, forever (until the client leaves) or a maximum in seconds.",
        )
        loader.add_option(
            "sse_mock_lazy",
            bool,
            True,
            "Set connection_strategy=lazy, so HTTPS hosts that are unreachable (or do not exist) can be mocked.",
        )

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "sse_mode" in updated and o.sse_mode not in MODES:
            raise exceptions.OptionsError(f"sse_mode must be replay, new or all, not {o.sse_mode!r}")
        if "sse_mock_miss" in updated and o.sse_mock_miss not in MISS:
            raise exceptions.OptionsError(
                f"sse_mock_miss must be 404, 502 or forward, not {o.sse_mock_miss!r}"
            )
        if "sse_mock_repeat" in updated and o.sse_mock_repeat not in ("last", "cycle"):
            raise exceptions.OptionsError(f"sse_mock_repeat must be last or cycle, not {o.sse_mock_repeat!r}")
        if "sse_mock_speed" in updated:
            try:
                self.speed = parse_speed(o.sse_mock_speed)
            except ValueError as e:
                raise exceptions.OptionsError(f"sse_mock_speed: {e}") from None
        if "sse_mock_loop" in updated:
            try:
                self.loop_s = parse_loop(o.sse_mock_loop)
            except ValueError as e:
                raise exceptions.OptionsError(f"sse_mock_loop: {e}") from None
        if updated & {"sse_mock_ignore", "sse_mock_headers", "sse_redact_params", "sse_redact"}:
            try:
                ignore = parse_ignore(o.sse_mock_ignore)
            except ValueError as e:
                raise exceptions.OptionsError(f"sse_mock_ignore: {e}") from None
            redact = _split(o.sse_redact_params) if "sse_redact_params" in o else frozenset()
            redact_h = _split(o.sse_redact) if "sse_redact" in o else frozenset()
            self.cfg = MatchConfig(ignore, redact, _split(o.sse_mock_headers), redact_h)
            self._stale = True
        if updated & {"sse_dir", "sse_mock_session", "sse_mock_repeat"}:
            self._stale = True
        if "sse_dir" in updated and self.store is not None:
            old, self.store = self.store, None
            self._clear_cache()
            self._spawn(asyncio.to_thread(old.close))
        if "sse_mock_lazy" in updated and o.sse_mock_lazy and o.connection_strategy != "lazy":
            # Eager mode dials the real host on CONNECT, before our request hook can redirect the flow:
            # an unreachable host would get a 502 and never reach the mock.
            o.update(connection_strategy="lazy")

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def running(self) -> None:
        self._index_lock = asyncio.Lock()
        self.server = ReplayServer(self._load_chunks)
        await self.server.start()

        log.info(
            "mitm-sse: mock replay server on 127.0.0.1:%d, mode %s", self.server.port, ctx.options.sse_mode
        )
        if ctx.options.sse_mode != "all":
            try:
                await self._ensure_index()
            except Exception as e:  # report, keep running: the next request retries
                log.error("mitm-sse: could not load recordings from %s: %s", self._dir(), e)
        # Measured: with mitmproxy, DuckDB and the preloaded chunks in memory, a full (generation 2)
        # garbage collection stalls the event loop ~30 ms, which shows up as a late chunk at the client.
        # Collect once now and move what is alive after startup out of the collector's scans.
        gc.collect()
        gc.freeze()

    async def done(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    # ---- index --------------------------------------------------------------------------------------
    @staticmethod
    def _dir() -> str:
        from .store import default_dir

        return ctx.options.sse_dir or str(default_dir())

    async def _ensure_index(self, force: bool = False) -> Index:
        assert self._index_lock is not None
        async with self._index_lock:
            if self.store is None:
                self.store = Store(self._dir())
            store = self.store
            if self._stale or self.index is None:
                session = ctx.options.sse_mock_session or None
                recs = await asyncio.to_thread(store.recordings, session)
                idx = Index(self.cfg, cycle=ctx.options.sse_mock_repeat == "cycle")
                for r in recs:
                    idx.add(r)
                self.index, self._stale = idx, False
                log.info("mitm-sse: %d recordings to replay from %s", len(idx), store.path)
                # A small capture is read whole, once: a replay then starts without a query, so the
                # first chunk keeps its recorded time to first byte even when 100 requests arrive at once.
                self._clear_cache()
                pre = await asyncio.to_thread(store.preload, list(idx.recordings), PRELOAD_BYTES)
                for sid, chunks in pre.items():
                    self._cache_put(sid, chunks)
            elif force and await asyncio.to_thread(store.changed):
                await asyncio.to_thread(store.refresh)
                session = ctx.options.sse_mock_session or None
                n = 0
                for r in await asyncio.to_thread(store.recordings, session):
                    n += self.index.add(r)
                if n:
                    log.info("mitm-sse: %d new recordings", n)
            return self.index

    async def _load_chunks(self, rec: Recording) -> Chunks:
        sid = rec.stream_id
        if sid in self._cache:
            self._cache.move_to_end(sid)
            return self._cache[sid]
        fut = self._loading.get(sid)
        if fut is None:
            assert self.store is not None
            fut = asyncio.ensure_future(asyncio.to_thread(self.store.chunks, sid))
            self._loading[sid] = fut
            try:
                chunks = await fut
            finally:
                self._loading.pop(sid, None)
            self._cache_put(sid, chunks)
            return chunks
        return await asyncio.shield(fut)

    def _cache_put(self, sid: str, chunks: Chunks) -> None:
        size = sum(len(d) for _, d in chunks if d)
        if size >= CHUNK_CACHE_BYTES // 4:
            return  # a huge stream is re-read each time rather than evicting everything else
        self._cache[sid] = chunks
        self._cache_bytes += size
        while self._cache_bytes > CHUNK_CACHE_BYTES and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= sum(len(d) for _, d in old if d)

    def _clear_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # configure before the loop runs
            coro.close()
            return
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- hooks --------------------------------------------------------------------------------------
    async def request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.pretty_host == STATUS_HOST:
            await self._status(flow)
            return
        mode = ctx.options.sse_mode
        if mode == "all" or flow.response is not None or self.server is None:
            return
        view = RequestView(
            method=req.method,
            host=req.pretty_host,
            port=req.port,
            path=req.path.split("?", 1)[0],
            query=req.path.split("?", 1)[1] if "?" in req.path else "",
            body=req.raw_content,
            headers={k.lower(): v for k, v in req.headers.items()},
        )
        index = await self._ensure_index()
        key = index.lookup(view)
        if key is None:
            index = await self._ensure_index(force=True)  # maybe recorded since (new mode, another proxy)
            key = index.lookup(view)
        if key is not None:
            self.hits += 1
            self._redirect(flow, index.take(key))
            return
        self.misses += 1
        if mode == "new":
            flow.metadata["mitm_sse.mock"] = "recording"
            return  # forwarded; the Recorder stores it; response/error then refresh the index
        miss = ctx.options.sse_mock_miss
        # Not a recording to keep: the Recorder skips flows marked as handled by the mock.
        flow.metadata["mitm_sse.mocked"] = True
        flow.metadata["mitm_sse.mock"] = "miss"
        if miss == "forward":
            return
        flow.response = self._miss_response(view, index, int(miss))

    def _redirect(self, flow: http.HTTPFlow, rec: Recording) -> None:
        req = flow.request
        assert self.server is not None
        t_req = req.timestamp_end or time.time()
        t0 = time.monotonic() - max(0.0, time.time() - t_req)  # when the proxy had the whole request
        job = Job(rec, t0, self.speed, self.loop_s if rec.kind != "body" else None, req.method == "HEAD")
        token = self.server.register(job)
        flow.metadata["mitm_sse.mocked"] = True
        flow.metadata["mitm_sse.mock"] = "replay"
        flow.metadata["mitm_sse.replayed"] = rec.stream_id
        flow.metadata["mitm_sse.orig"] = (req.scheme, req.host, req.port, req.host_header)
        host_header = req.host_header
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.server.port
        if host_header is not None:
            req.host_header = host_header  # the replay server sees the Host the client asked for
        req.headers[TOKEN_HEADER] = token

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get("mitm_sse.mock") == "replay" and flow.response is not None:
            if not callable(flow.response.stream):
                flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        orig = flow.metadata.pop("mitm_sse.orig", None)
        if orig is not None:
            scheme, host, port, host_header = orig
            req = flow.request
            req.scheme, req.host, req.port = scheme, host, port
            if host_header is not None:
                req.host_header = host_header
            req.headers.pop(TOKEN_HEADER, None)
        if flow.metadata.get("mitm_sse.mock") == "recording":
            self._spawn(self._pick_up_recording())

    async def _pick_up_recording(self) -> None:
        """new mode: make what the Recorder just stored replayable for the next identical request."""
        writer = getattr(self.recorder, "writer", None)
        if writer is not None:
            await asyncio.to_thread(writer.sync, 10.0)
        try:
            await self._ensure_index(force=True)
        except Exception as e:
            log.warning("mitm-sse: could not reload recordings: %s", e)

    # ---- answers ------------------------------------------------------------------------------------
    def _miss_response(self, view: RequestView, index: Index, status: int) -> http.Response:
        closest = index.closest(view)
        body: dict[str, Any] = {
            "error": "mitm-sse mock: no recording matches this request",
            "request": view.describe(),
            "recordings": len(index),
            "session": ctx.options.sse_mock_session or None,
        }
        if closest:
            rec, diffs = closest[0]
            body["closest"] = {
                "stream_id": rec.stream_id,
                "session": rec.session,
                "method": rec.request.method,
                "url": rec.url,
            }
            body["differences"] = diffs
        body["hint"] = (
            "record it (sse_mode=new), or leave fields out of matching with sse_mock_ignore "
            "(e.g. metadata.user_id, query:ts, header:x-request-id)"
        )
        log.warning(
            "mitm-sse: no recording for %s %s%s",
            view.method,
            view.host,
            view.path,
        )
        return http.Response.make(
            status,
            json.dumps(body, indent=2, ensure_ascii=False).encode(),
            {"content-type": "application/json", "x-mitm-sse-mock": "miss"},
        )

    async def _status(self, flow: http.HTTPFlow) -> None:
        flow.metadata["mitm_sse.mocked"] = True
        path = flow.request.path.split("?", 1)[0]
        if path == "/reload":
            self._stale = True
        if ctx.options.sse_mode != "all":
            await self._ensure_index()  # so that a status answer also means "ready to replay"
        stats: dict[str, Any] = dict(self.server.stats()) if self.server else {}
        stats.update(
            hits=self.hits,
            misses=self.misses,
            recordings=len(self.index) if self.index else 0,
            mode=ctx.options.sse_mode,
            speed=self.speed,
            port=self.server.port if self.server else None,
        )
        flow.response = http.Response.make(
            200, json.dumps(stats).encode(), {"content-type": "application/json"}
        )


__all__ = ["Mock", "IgnoreSpec", "parse_speed", "parse_loop"]
