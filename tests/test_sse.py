"""The incremental parser against the WHATWG rules, under every chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_sse.sse import Event, NDJSONParser, SSEParser, parse_sse, stream_kind


def ev(data, event="message", id="", retry=None):
    return Event(event, data, id, retry)


def all_splits(body: bytes) -> list[list[Event]]:
    out = [parse_sse(body)]
    for size in (1, 2, 3, 7):
        out.append(parse_sse(body, size))
    for i in range(len(body) + 1):  # every single split point
        p = SSEParser()
        out.append(p.feed(body[:i]) + p.feed(body[i:]) + p.close())
    return out


def check(body: bytes, expected: list[Event]) -> None:
    for got in all_splits(body):
        assert got == expected


def test_line_ends_cr_lf_crlf_and_split_crlf():
    check(b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\n", [ev("a"), ev("b"), ev("c"), ev("d")])


def test_bom_stripped_once_only_at_start():
    check(b"\xef\xbb\xbfdata: a\n\n", [ev("a")])
    # A second BOM is part of the first line: field name "\ufeffdata" is unknown, ignored.
    check(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n", [ev("b")])


def test_invalid_utf8_becomes_replacement_char():
    check(b"data: \xff\xfe ok \xe2\x82\n\n", [ev("\ufffd\ufffd ok \ufffd")])


def test_single_leading_space_removed():
    check(b"data:  two spaces\ndata:none\n\n", [ev(" two spaces\nnone")])


def test_id_with_nul_ignored_and_last_id_carried():
    check(
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\ndata: c\n\nid\ndata: d\n\n",
        [ev("a", id="1"), ev("b", id="1"), ev("c", id="1"), ev("d", id="")],
    )


def test_retry_only_ascii_digits():
    check(
        b"retry: 100\ndata: a\n\nretry: 1a\ndata: b\n\nretry: \xd9\xa3\ndata: c\n\nretry:  5\ndata: d\n\n",
        [ev("a", retry=100), ev("b"), ev("c"), ev("d")],
    )


def test_empty_data_not_dispatched_but_empty_data_field_is():
    check(b"event: x\n\nid: 5\n\n: comment\n\ndata\n\n", [ev("", id="5")])


def test_event_type_resets_and_unknown_fields_ignored():
    check(b"event: a\nfoo: bar\ndata: 1\n\ndata: 2\n\n", [ev("1", event="a"), ev("2")])


def test_field_without_colon_and_colon_in_value():
    check(b"data\ndata: a:b\n\n", [ev("\na:b")])


def test_unterminated_event_at_eof_not_dispatched():
    check(b"data: a\n\ndata: b\n", [ev("a")])
    check(b"data: a\n\ndata: b", [ev("a")])


def test_other_unicode_line_breaks_are_not_line_ends():
    check("data: a\u2028b\x0bc\x85d\n\n".encode(), [ev("a\u2028b\x0bc\x85d")])


def test_many_events_in_one_chunk():
    body = b"".join(b"data: %d\n\n" % i for i in range(100_000))
    events = SSEParser().feed(body)
    assert len(events) == 100_000 and events[-1].data == "99999"


def test_huge_line():
    big = b"x" * (10 * 1024 * 1024)
    p = SSEParser()
    out = []
    for i in range(0, len(big), 65536):
        out += p.feed(b"data: " + big[i : i + 65536] if i == 0 else big[i : i + 65536])
    out += p.feed(b"\n\n")
    assert len(out) == 1 and len(out[0].data) == len(big)


def test_nul_bytes_kept_in_data():
    check(b"data: a\x00b\n\n", [ev("a\x00b")])


def test_ndjson():
    p = NDJSONParser()
    got = p.feed(b'{"a":1}\r\n{"b"') + p.feed(b":2}\n\n  \n") + p.feed(b'{"c":3}') + p.close()
    assert [e.data for e in got] == ['{"a":1}', '{"b":2}', '{"c":3}']


def test_stream_kind():
    assert stream_kind("Text/Event-Stream; charset=utf-8") == "sse"
    assert stream_kind("application/x-ndjson") == "ndjson"
    assert stream_kind("application/jsonl") == "ndjson"
    assert stream_kind("application/json") is None
    assert stream_kind(None) is None


# ---- property-based: the parser agrees with itself across chunkings, and with a direct spec reading ----

lines = st.sampled_from(
    [
        b"data: x",
        b"data:y",
        b"data",
        b"event: t",
        b"id: 7",
        b"id: a\x00",
        b"retry: 12",
        b"retry: x",
        b": c",
        b"",
        b"data: \xc3\xa9",
        b"data: \xff",
        b"\xef\xbb\xbfdata: bom",
        b"field: v",
    ]
)
line_ends = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def bodies(draw):
    parts = draw(st.lists(st.tuples(lines, line_ends), max_size=30))
    return b"".join(a + b for a, b in parts)


def reference(body: bytes) -> list[Event]:
    """A straightforward, non-incremental reading of the standard, for comparison."""
    import re

    text = body.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    raw_lines = re.split(r"\r\n|\r|\n", text)
    raw_lines.pop()  # the part after the last line end is not a complete line
    out, data, etype, last_id, retry = [], None, "", "", None
    for line in raw_lines:
        if line == "":
            if data is not None:
                out.append(Event(etype or "message", "\n".join(data), last_id, retry))
            data, etype, retry = None, "", None
            continue
        if line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data = (data or []) + [value]
        elif name == "event":
            etype = value
        elif name == "id" and "\x00" not in value:
            last_id = value
        elif name == "retry" and re.fullmatch(r"[0-9]+", value):
            retry = int(value)
    return out


@settings(max_examples=300, deadline=None)
@given(bodies(), st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_any_chunking_matches_reference(body, cuts):
    cuts = sorted({c % (len(body) + 1) for c in cuts})
    p = SSEParser()
    got, prev = [], 0
    for c in [*cuts, len(body)]:
        got += p.feed(body[prev:c])
        prev = c
    got += p.close()
    assert got == reference(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=1, max_value=64))
def test_never_raises_on_arbitrary_bytes(body, size):
    assert parse_sse(body, size) == parse_sse(body)
