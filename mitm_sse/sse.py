"""Incremental parsers for event streams: WHATWG Server-Sent Events and NDJSON.

Both take bytes in arbitrary chunks (the chunking of the wire) and yield the events that became complete
with each chunk. They never raise on bad input: invalid UTF-8 becomes U+FFFD, unknown fields are ignored.

The SSE parser follows the HTML standard, "9.2.6 Interpreting an event stream":
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["Event", "SSEParser", "NDJSONParser", "parse_sse", "make_parser"]

# Line ends of the event-stream grammar: CRLF, lone LF, lone CR. str.splitlines() would also split on
# \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029, which are ordinary characters in an event stream.
_LINE_END = re.compile(r"\r\n|\r|\n")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(slots=True)
class Event:
    """One dispatched event. `id` is the last event id in force when it was dispatched."""

    event: str
    data: str
    id: str
    retry: int | None


class SSEParser:
    """Incremental WHATWG event-stream parser.

    feed(bytes) -> list of events dispatched by that chunk; close() -> [] (an unterminated event at EOF is
    not dispatched, per the standard) and flushes decoder state.
    """

    __slots__ = (
        "_decoder",
        "_buf",
        "_started",
        "_data",
        "_has_data",
        "_type",
        "_last_id",
        "_id_buffer",
        "_retry",
        "_skip_lf",
    )

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""  # undecoded-into-lines text: at most one partial line
        self._started = False  # BOM check done
        self._data: list[str] = []
        self._has_data = False
        self._type = ""
        self._last_id = ""  # the event source's last event ID string
        self._id_buffer = ""  # the last event ID buffer (carried across events)
        self._retry: int | None = None  # retry set within the current block
        self._skip_lf = False  # last chunk ended in CR

    @property
    def last_event_id(self) -> str:
        return self._id_buffer

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        return self._feed_text(text, final=False)

    def close(self) -> list[Event]:
        text = self._decoder.decode(b"", final=True)
        events = self._feed_text(text, final=True)
        # A partial last line without a line end is discarded with the pending event, per the standard.
        self._buf = ""
        self._data = []
        self._has_data = False
        return events

    def _feed_text(self, text: str, final: bool) -> list[Event]:
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":  # one leading BOM is stripped, only at the start of the stream
                text = text[1:]
        if self._skip_lf:
            # The previous chunk ended in CR, already taken as a line end: an LF right after it is the
            # second half of a CRLF split across chunks, not an empty line.
            self._skip_lf = False
            if text[:1] == "\n":
                text = text[1:]
        buf = self._buf + text if self._buf else text
        if not buf:
            return []
        lines = _LINE_END.split(buf)
        self._buf = lines.pop()  # text after the last line end: an incomplete line
        if buf[-1] == "\r":
            self._skip_lf = True
        if not lines:
            return []
        return self._process_lines(lines)

    def _process_lines(self, lines: list[str]) -> list[Event]:
        events: list[Event] = []
        for line in lines:
            if not line:
                ev = self._dispatch()
                if ev is not None:
                    events.append(ev)
                continue
            if line[0] == ":":
                continue  # comment
            colon = line.find(":")
            if colon == -1:
                field, value = line, ""
            else:
                field = line[:colon]
                value = line[colon + 1 :]
                if value and value[0] == " ":
                    value = value[1:]
            if field == "data":
                self._data.append(value)
                self._has_data = True
            elif field == "event":
                self._type = value
            elif field == "id":
                if "\x00" not in value:
                    self._id_buffer = value
            elif field == "retry":
                if _DIGITS.fullmatch(value):
                    self._retry = int(value)
            # any other field is ignored
        return events

    def _dispatch(self) -> Event | None:
        self._last_id = self._id_buffer
        if not self._has_data:
            self._type = ""
            self._retry = None
            return None
        ev = Event(self._type or "message", "\n".join(self._data), self._last_id, self._retry)
        self._data = []
        self._has_data = False
        self._type = ""
        self._retry = None
        return ev


class NDJSONParser:
    """Newline-delimited JSON (application/x-ndjson, application/jsonl): each non-empty line is an event.

    The line is kept as text (not parsed here); an unterminated last line is dispatched at close, since
    NDJSON, unlike SSE, has no terminator that marks an event complete.
    """

    __slots__ = ("_decoder", "_buf", "_started")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._started = False

    @property
    def last_event_id(self) -> str:
        return ""

    def feed(self, chunk: bytes) -> list[Event]:
        return self._lines(self._decoder.decode(chunk), final=False)

    def close(self) -> list[Event]:
        return self._lines(self._decoder.decode(b"", final=True), final=True)

    def _lines(self, text: str, final: bool) -> list[Event]:
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        buf = self._buf + text
        parts = buf.split("\n")
        self._buf = "" if final else parts.pop()
        out = []
        for line in parts:
            if line.endswith("\r"):
                line = line[:-1]
            if line.strip():
                out.append(Event("message", line, "", None))
        return out


NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/ndjson")


def media_type(content_type: str | None) -> str:
    """'Text/Event-Stream; charset=utf-8' -> 'text/event-stream'."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def stream_kind(content_type: str | None) -> str | None:
    """'sse', 'ndjson' or None for a response content type."""
    mt = media_type(content_type)
    if mt == "text/event-stream":
        return "sse"
    if mt in NDJSON_TYPES:
        return "ndjson"
    return None


def make_parser(kind: str) -> SSEParser | NDJSONParser:
    return NDJSONParser() if kind == "ndjson" else SSEParser()


def parse_sse(body: bytes, chunk_size: int | None = None) -> list[Event]:
    """Parse a whole body (optionally fed in fixed-size pieces); convenience for tests and tools."""
    p = SSEParser()
    out: list[Event] = []
    if chunk_size:
        for i in range(0, len(body), chunk_size):
            out += p.feed(body[i : i + chunk_size])
    else:
        out += p.feed(body)
    out += p.close()
    return out
