"""Latency metrics as SQL over the contract views. Definitions (docs/metrics.md) and their anchors:

- TTFB  = t_headers_ns - t_request_ns.
- TTFT  = first event with generated content (text, tool-call arguments, reasoning, refusal) - t_request_ns.
          Lifecycle events (message_start, ping, response.created, role-only deltas) do not count: counting
          the first chunk gives ~1 ms "TTFT", a known gateway bug. For streams no provider decoder knows
          (provider 'generic' with no content found), TTFT falls back to the first event.
- E2E   = t_end_ns - t_request_ns (LLMPerf "end to end latency").
- ITL   = gaps between consecutive content events, per stream p50/p95/p99 (vLLM benchmark_serving ITL);
          the `itl_gaps` view has every gap, for pooled percentiles as vLLM reports them.
- TPOT  = (E2E - TTFT) / (output_tokens - 1) (vLLM TPOT, NVIDIA AIPerf "inter token latency").
- output_tokens = the provider's usage when reported, else the number of content events.
- tokens_per_s  = output_tokens / E2E in seconds (LLMPerf "request_output_throughput_token_per_s").

Everything `summary_sql` reads is a per-stream column the writer precomputed, so grouped summaries never scan
chunks or events (100k streams in well under a second, see bench/bench_stats.py).
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
CREATE OR REPLACE VIEW itl_gaps AS
SELECT stream_id, seq, t_ns, content_kind, itl_ms FROM (
    SELECT stream_id, seq, t_ns, content_kind,
           (t_ns - lag(t_ns) OVER (PARTITION BY stream_id ORDER BY seq)) / 1e6 AS itl_ms
    FROM events WHERE content_kind IS NOT NULL
) WHERE itl_ms IS NOT NULL;
"""

GROUPS = {
    "host": "host",
    "model": "coalesce(model, '?')",
    "session": "coalesce(session, '')",
    "provider": "coalesce(provider, '?')",
    "path": "path",
    "status": "status",
}

# Metrics summarised by default, in the order shown. Each gets p50/p90/p99 across streams; for the ITL
# columns the per-stream value is that stream's median (itl_p50_ms) or tail (itl_p95_ms) gap.
SUMMARY_METRICS = ("ttfb_ms", "ttft_ms", "e2e_ms", "itl_p50_ms", "itl_p95_ms", "tpot_ms", "tokens_per_s")
QUANTILES = ((0.5, "p50"), (0.9, "p90"), (0.99, "p99"))

# A stream counts as failed when it did not end normally or the status is an HTTP error.
ERROR_COND = "(coalesce(end_reason, '') <> 'complete' OR coalesce(status, 0) >= 400)"


def summary_column(metric: str, q_name: str) -> str:
    """Column name summary_sql gives a metric's quantile: ttft_ms, p90 -> ttft_p90."""
    return f"{metric.removesuffix('_ms')}_{q_name}"


def summary_sql(
    by: list[str] | tuple[str, ...] = ("host", "model"),
    where: str = "",
    metrics: tuple[str, ...] = SUMMARY_METRICS,
) -> str:
    """Grouped percentiles (p50/p90/p99, linear interpolation) of the stream_latency metrics.

    `where` is a SQL condition on stream_latency columns (the caller owns its safety; the CLI passes
    only bound parameters through it).
    """
    unknown = [b for b in by if b not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
    keys = [GROUPS[b] + f" AS {b}" for b in by]
    metric_cols = [
        f"quantile_cont({m}, {q}) AS {summary_column(m, name)}" for m in metrics for q, name in QUANTILES
    ]
    cond = f"WHERE {where}" if where else ""
    group = ", ".join(str(i + 1) for i in range(len(keys)))
    order = ", ".join(str(i + 1) for i in range(len(keys)))
    return f"""
SELECT {", ".join(keys)}{"," if keys else ""} count(*) AS streams,
       count(*) FILTER (WHERE {ERROR_COND}) AS errors,
       sum(output_tokens) AS output_tokens,
       {", ".join(metric_cols)}
FROM stream_latency {cond}
{"GROUP BY " + group if keys else ""}
ORDER BY streams DESC{", " + order if keys else ""}
"""


def pooled_itl_sql(by: list[str] | tuple[str, ...] = ("host", "model"), where: str = "") -> str:
    """ITL percentiles over every gap of every stream pooled (vLLM benchmark_serving's ITL). Scans events."""
    keys = [GROUPS[b] + f" AS {b}" for b in by]
    group = ", ".join(str(i + 1) for i in range(len(keys)))
    cond = f"WHERE {where}" if where else ""
    qs = ", ".join(f"quantile_cont(g.itl_ms, {q}) AS itl_{name}" for q, name in QUANTILES)
    return f"""
SELECT {", ".join(keys)}{"," if keys else ""} count(*) AS gaps, avg(g.itl_ms) AS itl_mean, {qs}
FROM itl_gaps g JOIN (SELECT * FROM stream_latency {cond}) s USING (stream_id)
{"GROUP BY " + group if keys else ""}
ORDER BY gaps DESC
"""
