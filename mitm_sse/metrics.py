"""Latency metrics as SQL over the contract views. Definitions (README, "Metrics") and their anchors:

- TTFB  = t_headers_ns - t_request_ns.
- TTFT  = first event with generated content (text, tool-call arguments, reasoning, refusal) - t_request_ns.
          Lifecycle events (message_start, ping, response.created, role-only deltas) do not count: counting
          the first chunk gives ~1 ms "TTFT", a known gateway bug. For streams no provider decoder knows
          (provider 'generic' with no content found), TTFT falls back to the first event.
- E2E   = t_end_ns - t_request_ns (LLMPerf "end to end latency").
- ITL   = gaps between consecutive content events, per stream p50/p95/p99 (vLLM benchmark_serving ITL).
- TPOT  = (E2E - TTFT) / (output_tokens - 1) (vLLM TPOT, NVIDIA AIPerf "inter token latency").
- output_tokens = the provider's usage when reported, else the number of content events.
- tokens_per_s  = output_tokens / E2E in seconds (LLMPerf "request_output_throughput_token_per_s").
"""

from __future__ import annotations

METRIC_VIEWS_SQL = """
CREATE OR REPLACE VIEW stream_latency AS
SELECT
    stream_id, session, method, host, path, provider, model, status, end_reason, t_request_ns,
    (t_headers_ns - t_request_ns) / 1e6 AS ttfb_ms,
    (coalesce(t_first_content_ns,
              CASE WHEN provider = 'generic' THEN t_first_event_ns END) - t_request_ns) / 1e6 AS ttft_ms,
    (t_end_ns - t_request_ns) / 1e6 AS e2e_ms,
    itl_p50_ns / 1e6 AS itl_p50_ms,
    itl_p95_ns / 1e6 AS itl_p95_ms,
    itl_p99_ns / 1e6 AS itl_p99_ms,
    itl_max_ns / 1e6 AS itl_max_ms,
    coalesce(output_tokens, n_content_events) AS output_tokens,
    CASE WHEN output_tokens IS NOT NULL THEN 'usage' ELSE 'events' END AS output_tokens_source,
    input_tokens,
    CASE WHEN coalesce(output_tokens, n_content_events) > 1 AND t_first_content_ns IS NOT NULL
         THEN ((t_end_ns - t_first_content_ns) / 1e6) / (coalesce(output_tokens, n_content_events) - 1)
    END AS tpot_ms,
    CASE WHEN t_end_ns > t_request_ns AND coalesce(output_tokens, n_content_events) > 0
         THEN coalesce(output_tokens, n_content_events) / ((t_end_ns - t_request_ns) / 1e9)
    END AS tokens_per_s,
    n_chunks, n_events, n_bytes
FROM streams;
"""

GROUPS = {
    "host": "host",
    "model": "coalesce(model, '?')",
    "session": "coalesce(session, '')",
    "provider": "coalesce(provider, '?')",
    "path": "path",
}


def summary_sql(by: list[str] | tuple[str, ...] = ("host", "model"), where: str = "") -> str:
    """Grouped percentiles (p50/p90/p99) of the stream_latency metrics."""
    keys = [GROUPS[b] + f" AS {b}" for b in by]
    metric_cols = []
    for m in ("ttfb_ms", "ttft_ms", "e2e_ms", "itl_p50_ms", "tpot_ms", "tokens_per_s"):
        for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
            metric_cols.append(f"quantile_cont({m}, {q}) AS {m.removesuffix('_ms')}_{name}")
    cond = f"WHERE {where}" if where else ""
    group = ", ".join(str(i + 1) for i in range(len(keys)))
    return f"""
SELECT {", ".join(keys)}{"," if keys else ""} count(*) AS streams,
       sum(output_tokens) AS output_tokens,
       {", ".join(metric_cols)}
FROM stream_latency {cond}
{"GROUP BY " + group if keys else ""}
ORDER BY streams DESC
"""
