"""The SSE content view: flows recorded through a real mitmdump (saved with -w, read back with FlowReader)
render their parsed events with arrival offsets, on the installed mitmproxy (11 or 12)."""

from __future__ import annotations

import gzip
import re
import zlib

import httpx
import pytest
from mitmproxy import contentviews, http
from mitmproxy import io as mio
from mitmproxy.test import taddons

from mitm_sse import contentview
from mitm_sse.contentview import META_KEY, SSEView, render
from tests.proxy import Mitmdump
from tests.servers import ScriptedServer

SCRIPT = [
    (0.0, b"\xef\xbb\xbfretry: 3000\r\nid: 1\r\nevent: greet\r\ndata: hel"),
    (0.05, b"lo\r\n\r"),
    (0.05, b'\ndata: {"a": 1}\n\ndata: two\n\n: comment\n'),
    (0.1, b"data: caf\xc3"),
    (0.05, b"\xa9\n\nid: 2\ndata: last\n\n"),
]
BODY = b"".join(d for _, d in SCRIPT)


def _run(tmp_path, mode="h1-chunked", script=SCRIPT, headers=None, options=None) -> list[http.HTTPFlow]:
    flows_file = tmp_path / "flows.mitm"
    with (
        ScriptedServer(mode, script, headers=headers) as srv,
        Mitmdump(tmp_path, options=options, args=["-w", str(flows_file)]) as proxy,
    ):
        scheme = "https" if "tls" in mode else "http"
        with httpx.Client(
            proxy=proxy.url, verify=proxy.ca, http2=mode == "h2-tls", timeout=20, trust_env=False
        ) as c:
            with c.stream("GET", f"{scheme}://127.0.0.1:{srv.port}/v1/stream") as r:
                received = b"".join(r.iter_raw())
        raw = b"".join(d for _, d in script)
        assert received == raw  # the client got every byte unchanged
        proxy.wait_for("SELECT 1 FROM streams WHERE end_reason IS NOT NULL")
    with open(flows_file, "rb") as f:
        return [fl for fl in mio.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def _event_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"\s*(\+[0-9.]+ms|\?) .*#\d", ln)]


@pytest.mark.parametrize("mode", ["h1-chunked", "h2-tls"])
def test_view_of_recorded_stream(tmp_path, mode):
    (flow,) = _run(tmp_path, mode)
    resp = flow.response
    assert resp.raw_content == BODY  # the capped copy, as received
    info = flow.metadata[META_KEY]
    assert info["total"] == len(BODY) and info["kept"] == len(BODY) and not info["truncated"]
    assert sum(size for _, size in info["chunks"]) == len(BODY)
    assert len(info["chunks"]) == len(SCRIPT)  # one entry per chunk as it arrived
    offsets = [off for off, _ in info["chunks"]]
    assert offsets == sorted(offsets) and offsets[0] >= 0

    text = render(resp.content, flow=flow, http_message=resp, content_type="text/event-stream")
    assert text.startswith("5 events in 5 chunks, ")
    rows = _event_lines(text)
    assert len(rows) == 5
    assert "greet" in rows[0] and "id=1" in rows[0] and "retry=3000" in rows[0]
    assert '{"a":1}' in text and "café" in text and "id=2" in rows[4]
    # each event carries the arrival offset of the chunk that completed it (ms after the response headers)
    shown = [float(r.split()[0].lstrip("+").removesuffix("ms")) for r in rows]
    per_event_chunk = [1, 2, 2, 4, 4]  # "hello" completes in chunk 1 (CRLF split), etc.
    assert shown == [pytest.approx(offsets[i], abs=0.051) for i in per_event_chunk]


def test_view_through_mitmproxy_registry(tmp_path):
    """The view as mitmweb / the console pick it: registered by the addon, chosen by priority."""
    (flow,) = _run(tmp_path)
    addon = SSEView()
    with taddons.context(addon):  # loads the addon: registers the view
        if hasattr(contentviews, "registry"):  # mitmproxy 12
            res = contentviews.prettify_message(flow.response, flow)
            assert res.view_name == "SSE"
            text = res.text
        else:  # mitmproxy 11
            desc, lines, err = contentviews.get_message_content_view("auto", flow.response, flow)
            assert err is None and desc.startswith("SSE")
            text = "\n".join("".join(t for _, t in line) for line in lines)
        assert text.startswith("5 events in 5 chunks")
        assert len(_event_lines(text)) == 5
        addon.done()
    if hasattr(contentviews, "registry"):
        assert "sse" not in contentviews.registry
    else:
        assert contentviews.get("SSE") is None


def test_view_cap_and_gzip(tmp_path):
    """gzip on the wire: the view decodes the kept raw bytes chunk by chunk; the cap truncates the copy."""
    events = b"".join(b"data: event %d\n\n" % i for i in range(200))
    comp = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
    parts = []
    for i in range(0, len(events), 400):
        parts.append(comp.compress(events[i : i + 400]) + comp.flush(zlib.Z_SYNC_FLUSH))
    parts.append(comp.flush())
    script = [(0.01, p) for p in parts if p]
    assert gzip.decompress(b"".join(p for _, p in script)) == events
    (flow,) = _run(tmp_path, script=script, headers={"content-encoding": "gzip"})
    info = flow.metadata[META_KEY]
    assert not info["truncated"] and info["total"] == sum(len(p) for _, p in script)
    text = render(flow.response.raw_content, flow=flow, http_message=flow.response)
    assert text.startswith("200 events in ")
    assert "event 199" in text

    big = [(0.0, b"data: " + b"x" * 700 + b"\n\n") for _ in range(4)]
    (tmp_path / "big").mkdir()
    (flow,) = _run(tmp_path / "big", script=big, options={"sse_view_max": "1k"})
    info = flow.metadata[META_KEY]
    assert info["truncated"] and info["kept"] == 1024 and info["total"] == 4 * 708
    assert len(flow.response.raw_content) == 1024
    text = render(flow.response.content, flow=flow, http_message=flow.response)
    # offsets are kept only for the chunks within the cap (memory stays bounded on endless feeds)
    assert text.startswith("1 events in 2 chunks") and "sse_view_max" in text


def test_view_of_non_streamed_body():
    """A body mitmproxy buffered itself (no SSEView timing): events without offsets."""
    resp = http.Response.make(200, b"event: a\ndata: 1\n\ndata: 2\n\n", {"content-type": "text/event-stream"})
    text = render(resp.content, http_message=resp, content_type="text/event-stream")
    assert text.startswith("2 events in 27 bytes")
    assert len(_event_lines(text)) == 2


def test_disabled_cap_keeps_nothing(tmp_path):
    (flow,) = _run(tmp_path, options={"sse_view_max": "0"})
    assert META_KEY not in flow.metadata
    assert not flow.response.raw_content


def test_module_loads_as_script():
    assert isinstance(contentview.addons[0], SSEView)
