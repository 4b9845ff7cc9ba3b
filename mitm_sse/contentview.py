"""An "SSE" content view for mitmweb and the mitmproxy console (mitmproxy 11 and 12), and the addon that keeps a
capped copy of streamed event-stream bodies so there is something to show.

    mitmweb -s mitm_sse/record.py                      # the recorder loads this addon too
    mitmweb -s mitm_sse/mock.py -s mitm_sse/contentview.py
    mitmweb -s mitm_sse/contentview.py                 # the view alone (whole, non-streamed bodies)

mitmproxy keeps no body for a streamed response (`flow.response.stream`), and the recorder streams every SSE /
NDJSON response. The `SSEView` addon wraps the stream callable of such a response: each chunk is passed on
unchanged and at once (nothing is buffered for the client), and the first `sse_view_max` bytes are copied
with each chunk's arrival offset. When the stream ends (the callable's final `b""` call, which mitmproxy makes
before the `response` hook, so `-w` / `--save-stream-file` save it) or fails (`error` hook), the copy becomes
`flow.response` content (the bytes as received, before content-decoding) and the chunk offsets go to
`flow.metadata["mitm_sse.view"]`. The response was already sent: setting its content afterwards sends nothing.

The view parses the body with the project's WHATWG parser and lists each event with the arrival offset of the
chunk that completed it, relative to the response headers. Load this addon *after* the one that makes the
response stream (the recorder or the mock): it only wraps responses that already stream.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

try:
    from mitm_sse.contentdecode import DecodeError, make_decoder
    from mitm_sse.sse import make_parser, stream_kind
except ImportError:  # loaded with -s from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mitm_sse.contentdecode import DecodeError, make_decoder
    from mitm_sse.sse import make_parser, stream_kind

log = logging.getLogger("mitm_sse")

__all__ = ["META_KEY", "SSEView", "render", "render_lines", "addons"]

META_KEY = "mitm_sse.view"
DEFAULT_MAX = "auto"
# "auto": keep this much where something can show or save it (mitmweb, the console, mitmdump -w); nothing
# in a bare mitmdump, which forgets each flow when it ends (a proxy left on must not pay per open stream).
AUTO_MAX = 256 * 1024
MAX_CHUNK_ENTRIES = 100_000  # arrival offsets kept per flow (beyond: the rest of the body has no offsets)
MAX_EVENTS_SHOWN = 5_000
MAX_DATA_CHARS = 4_000  # per event, in the view
VIEW_NAME = "SSE"

Line = list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------- keeping


class Keep:
    """Stream callable wrapper: copy up to `cap` bytes and each chunk's arrival, pass everything through."""

    __slots__ = ("flow", "chain", "cap", "buf", "t0", "chunks", "total", "finished", "owner")
    mitm_sse_keep = True  # marks a wrapper from any copy of this module (it may be loaded twice)

    def __init__(self, flow: http.HTTPFlow, chain: Any, cap: int, owner: SSEView) -> None:
        self.flow = flow
        self.chain = chain if callable(chain) else None
        self.cap = cap
        self.buf = bytearray()
        resp = flow.response
        self.t0 = (resp.timestamp_start if resp is not None else None) or time.time()
        self.chunks: list[list[float | int]] = []  # [offset_ms, size] per chunk as received
        self.total = 0
        self.finished = False
        self.owner = owner

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        if data:
            n = len(data)
            room = self.cap - len(self.buf)
            if room > 0:  # past the cap nothing more is kept, not even offsets: memory stays bounded
                if len(self.chunks) < MAX_CHUNK_ENTRIES:
                    self.chunks.append([round((time.time() - self.t0) * 1000.0, 3), n])
                self.buf += data if n <= room else data[:room]
            self.total += n
        else:
            self.finish()
        if self.chain is not None:
            return self.chain(data)
        return data

    def finish(self) -> None:
        """Hand the copy to the flow (idempotent: the end call comes twice over HTTP/2 on mitmproxy 11)."""
        if self.finished:
            return
        self.finished = True
        self.owner.live.pop(self.flow.id, None)
        resp = self.flow.response
        if resp is None:
            return
        kept = len(self.buf)
        self.flow.metadata[META_KEY] = {
            "chunks": self.chunks,
            "kept": kept,
            "total": self.total,
            "truncated": self.total > kept or len(self.chunks) >= MAX_CHUNK_ENTRIES,
        }
        if resp.raw_content is None:  # mitmproxy 12's store_streamed_bodies may have stored it already
            resp.data.content = bytes(self.buf)
        self.buf = bytearray()


class SSEView:
    """Addon: registers the content view and keeps capped copies of streamed SSE / NDJSON bodies."""

    def __init__(self) -> None:
        self.cap = 1024 * 1024
        self.live: dict[str, Keep] = {}
        self._view: Any = None

    def load(self, loader: Any) -> None:
        if "sse_view_max" in loader.master.options:  # a second copy (record.py and -s contentview.py)
            self.cap = 0  # the first copy keeps; this one only stays out of the way
            return
        loader.add_option(
            "sse_view_max",
            str,
            DEFAULT_MAX,
            "Bytes of each streamed SSE/NDJSON response kept for the SSE content view (e.g. 1m, 256k; 0 = none; "
            "auto = 256k in mitmweb, the console or with mitmdump -w, else none).",
        )
        self._view = register()

    def configure(self, updated: set[str]) -> None:
        if ("sse_view_max" in updated or "save_stream_file" in updated) and self._view is not None:
            value = ctx.options.sse_view_max
            if value.strip().lower() == "auto":
                shown = type(ctx.master).__name__ != "DumpMaster" or bool(ctx.options.save_stream_file)
                self.cap = AUTO_MAX if shown else 0
                return
            try:
                cap = human.parse_size(value)
            except ValueError as e:
                raise exceptions.OptionsError(f"sse_view_max: {e}") from None
            self.cap = max(0, cap or 0)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None or not resp.stream or self.cap <= 0:
            return  # not streamed: mitmproxy keeps the whole body itself
        if (
            getattr(resp.stream, "mitm_sse_keep", False)
            or stream_kind(resp.headers.get("content-type")) is None
        ):
            return
        keep = Keep(flow, resp.stream, self.cap, self)
        self.live[flow.id] = keep
        resp.stream = keep

    def error(self, flow: http.HTTPFlow) -> None:
        keep = self.live.get(flow.id)
        if keep is not None:
            keep.finish()

    def response(self, flow: http.HTTPFlow) -> None:
        self.error(flow)  # normally finished by the final b"" already

    def done(self) -> None:
        for keep in list(self.live.values()):
            keep.finish()
        unregister(self._view)
        self._view = None


# ---------------------------------------------------------------------------------------------- rendering


def _chunks_of(
    message: http.Message | None, flow: Any, data: bytes
) -> tuple[list[tuple[float | None, bytes]], str]:
    """The body as (arrival offset ms | None, bytes) pieces, decoded, and a note for the header line."""
    meta = getattr(flow, "metadata", None) or {}
    info = meta.get(META_KEY) if isinstance(meta, dict) else None
    raw = message.raw_content if message is not None else None
    enc = message.headers.get("content-encoding") if message is not None else None
    if not info or raw is None:
        return [(None, data)], ""
    try:
        decoder = make_decoder(enc)
    except DecodeError:
        return [(None, data)], f"cannot decode {enc}"
    pieces: list[tuple[float | None, bytes]] = []
    note = ""
    pos = 0
    for entry in info.get("chunks", ()):
        if pos >= len(raw):
            break
        offset, size = float(entry[0]), int(entry[1])
        part = raw[pos : pos + size]
        pos += size
        if decoder is not None:
            try:
                part = decoder(part)
            except DecodeError as e:
                note = f"content-decoding stopped: {e}"
                break
        pieces.append((offset, part))
    else:
        if pos < len(raw):
            rest = raw[pos:]
            if decoder is not None:
                try:
                    rest = decoder(rest)
                except DecodeError as e:
                    note, rest = f"content-decoding stopped: {e}", b""
            pieces.append((None, rest))
    return pieces, note


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more chars]"


def _fmt_ms(ms: float | None) -> str:
    return "?" if ms is None else f"+{ms:.1f}ms"


def render_lines(
    data: bytes,
    *,
    content_type: str | None = None,
    flow: Any = None,
    http_message: http.Message | None = None,
) -> tuple[str, list[Line]]:
    """(description, lines of (style, text)) for an event-stream or NDJSON body."""
    ct = content_type
    if ct is None and http_message is not None:
        ct = http_message.headers.get("content-type")
    kind = stream_kind(ct) or "sse"
    pieces, note = _chunks_of(http_message, flow, data)
    parser = make_parser(kind)
    events: list[tuple[float | None, Any]] = []
    last: float | None = None
    for offset, part in pieces:
        if offset is not None:
            last = offset
        for ev in parser.feed(part):
            events.append((offset if offset is not None else None, ev))
    events.extend((None, ev) for ev in parser.close())

    info = (getattr(flow, "metadata", None) or {}).get(META_KEY) if flow is not None else None
    head: Line = [("header", f"{len(events)} {'events' if kind == 'sse' else 'lines'}")]
    if info:
        n_chunks = len(info.get("chunks", ()))
        head.append(("text", f" in {n_chunks} chunks, {info.get('total', 0)} bytes"))
        if last is not None:
            head.append(("text", f", last chunk at +{last:.1f} ms after the response headers"))
        if info.get("truncated"):
            head.append(("warn", f" (view keeps the first {info.get('kept', 0)} bytes: sse_view_max)"))
    else:
        head.append(
            ("text", f" in {len(data)} bytes (no arrival times: response not streamed through SSEView)")
        )
    lines: list[Line] = [head]
    if note:
        lines.append([("warn", note)])
    lines.append([("text", "")])

    prev: float | None = None
    for i, (offset, ev) in enumerate(events):
        if i >= MAX_EVENTS_SHOWN:
            lines.append([("warn", f"… {len(events) - i} more events not shown")])
            break
        gap = "" if offset is None or prev is None else f"(+{offset - prev:.1f})"
        prev = offset if offset is not None else prev
        row: Line = [("highlight", f"{_fmt_ms(offset):>12}"), ("text", f" {gap:<10} ")]
        row.append(("header", f"#{i:<4} {ev.event or 'message'}"))
        if ev.id:
            row.append(("text", f"  id={ev.id}"))
        if ev.retry is not None:
            row.append(("text", f"  retry={ev.retry}"))
        lines.append(row)
        text = ev.data
        try:
            obj = json.loads(text)
            text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        except (ValueError, RecursionError):
            pass
        for dline in _short(text, MAX_DATA_CHARS).split("\n"):
            lines.append([("text", "      "), ("content_data", dline)])
    desc = f"SSE ({kind})" + (f", {note}" if note else "")
    return desc, lines


def render(
    data: bytes, flow: Any = None, http_message: http.Message | None = None, content_type: str | None = None
) -> str:
    """The view as plain text (what mitmproxy 12 shows; mitmproxy 11 shows the same lines, styled)."""
    _, lines = render_lines(data, content_type=content_type, flow=flow, http_message=http_message)
    return "\n".join("".join(t for _, t in line) for line in lines)


def _priority(content_type: str | None) -> float:
    kind = stream_kind(content_type)
    if kind == "sse":
        return 2.0
    if kind is not None:
        return 0.5  # NDJSON: the JSON views may be chosen; ours is still selectable
    return -1.0


# ------------------------------------------------------------------------------------- registration (11/12)


def _make_view() -> Any:
    from mitmproxy import contentviews

    if hasattr(contentviews, "Contentview"):  # mitmproxy >= 12

        class SSEContentview(contentviews.Contentview):
            name = VIEW_NAME
            syntax_highlight = "none"

            def prettify(self, data: bytes, metadata: Any) -> str:
                return render(
                    data,
                    flow=metadata.flow,
                    http_message=metadata.http_message,
                    content_type=metadata.content_type,
                )

            def render_priority(self, data: bytes, metadata: Any) -> float:
                return _priority(metadata.content_type)

        return SSEContentview()

    from mitmproxy.contentviews import base

    class ViewSSE(base.View):
        name = VIEW_NAME

        def __call__(self, data: bytes, *, content_type=None, flow=None, http_message=None, **_: Any):
            desc, lines = render_lines(data, content_type=content_type, flow=flow, http_message=http_message)
            return desc, iter(lines)

        def render_priority(self, data: bytes, *, content_type=None, **_: Any) -> float:
            return _priority(content_type)

    return ViewSSE()


def register() -> Any:
    """Add the SSE view to mitmproxy's registry (replacing an earlier one, e.g. on script reload)."""
    from mitmproxy import contentviews

    view = _make_view()
    if hasattr(contentviews, "registry"):  # 12: register() replaces by name
        contentviews.registry.register(view)
    else:  # 11
        old = contentviews.get(VIEW_NAME)
        if old is not None:
            contentviews.remove(old)
        contentviews.add(view)
    return view


def unregister(view: Any) -> None:
    if view is None:
        return
    from mitmproxy import contentviews

    try:
        if hasattr(contentviews, "registry"):
            by_name = getattr(contentviews.registry, "_by_name", None)
            if isinstance(by_name, dict) and by_name.get(VIEW_NAME.lower()) is view:
                del by_name[VIEW_NAME.lower()]
        elif view in contentviews.views:
            contentviews.remove(view)
    except Exception as e:  # never fail shutdown over a view
        log.debug("mitm-sse: could not remove the SSE view: %s", e)


addons = [SSEView()]
