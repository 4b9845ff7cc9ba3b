"""The data contract in code: Arrow schemas of the stored tables.

Users write SQL against these names. Changing one needs a migration (`migrations.py`), a CHANGELOG line and
the README's data contract section updated.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

STREAMS = pa.schema(
    [
        ("stream_id", pa.string()),
        ("rev", pa.int32()),  # 0 provisional (headers seen), 1 final; the `streams` view keeps the highest
        ("instance", pa.string()),  # recorder process that wrote it (orphan detection)
        ("session", pa.string()),
        ("kind", pa.string()),  # 'sse', 'ndjson', or 'body' (non-streamed response, recorded whole)
        ("method", pa.string()),
        ("scheme", pa.string()),
        ("url", pa.string()),  # secret query parameters redacted
        ("host", pa.string()),
        ("port", pa.int32()),
        ("path", pa.string()),  # without the query
        ("query", pa.string()),  # raw query string (redacted), '' if none
        ("status", pa.int32()),
        ("request_headers_json", pa.string()),  # JSON object, lower-case names, secrets redacted
        ("request_body", pa.string()),  # UTF-8 text of the request body (lossy if not UTF-8)
        ("request_body_raw", pa.binary()),  # exact request body, only when it is not valid UTF-8
        ("response_headers_json", pa.string()),
        ("content_type", pa.string()),
        ("content_encoding", pa.string()),
        ("http_version", pa.string()),
        ("t_request_ns", pa.int64()),  # proxy had the end of the client's request (epoch ns)
        ("t_headers_ns", pa.int64()),  # response headers arrived at the proxy
        ("t_end_ns", pa.int64()),
        (
            "end_reason",
            pa.string(),
        ),  # complete, client_disconnected, server_error, proxy_shutdown, proxy_crashed
        ("error", pa.string()),
        ("parse_error", pa.string()),  # content decoding failed: events stop there, chunks are complete
        ("store_error", pa.string()),  # some data of this stream could not be stored
        ("n_chunks", pa.int64()),
        ("n_bytes", pa.int64()),
        ("n_events", pa.int64()),
        ("provider", pa.string()),
        ("model", pa.string()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),  # provider usage when reported, else NULL (see n_content_events)
        ("stop_reason", pa.string()),
        ("provider_error", pa.string()),
        ("n_content_events", pa.int64()),
        ("t_first_chunk_ns", pa.int64()),
        ("t_first_event_ns", pa.int64()),
        ("t_first_content_ns", pa.int64()),
        ("t_last_content_ns", pa.int64()),
        ("itl_p50_ns", pa.int64()),  # inter-token latency over content events, linear interpolation
        ("itl_p95_ns", pa.int64()),
        ("itl_p99_ns", pa.int64()),
        ("itl_max_ns", pa.int64()),
        ("t_updated_ns", pa.int64()),
    ]
)

CHUNKS = pa.schema(
    [
        ("stream_id", pa.string()),
        ("seq", pa.int64()),
        ("t_ns", pa.int64()),
        ("delta_ns", pa.int64()),  # since the previous chunk; for seq 0 since the response headers
        ("size", pa.int64()),
        ("data", pa.binary()),  # bytes exactly as received, before content-decoding; NULL only if dropped
    ]
)

EVENTS = pa.schema(
    [
        ("stream_id", pa.string()),
        ("seq", pa.int64()),
        ("chunk_seq", pa.int64()),  # the chunk in which the event completed
        ("t_ns", pa.int64()),
        ("event", pa.string()),
        ("data", pa.string()),
        ("id", pa.string()),  # last event id in force
        ("retry", pa.int64()),  # retry field of this event's block, when all ASCII digits
        ("delta_text", pa.string()),  # generated content the provider decoder found, NULL if none
        ("content_kind", pa.string()),  # text, reasoning, tool_call, refusal; NULL if none
    ]
)

TABLES: dict[str, pa.Schema] = {"streams": STREAMS, "chunks": CHUNKS, "events": EVENTS}
