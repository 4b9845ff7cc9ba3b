"""Benchmark: `mitm-sse stats` over a synthetic capture of 100,000 streams and 10,000,000 chunks.

    python bench/bench_stats.py [--streams 100000] [--chunks-per-stream 100] [--dir /tmp/x] [--keep]

Writes the capture straight with pyarrow (the same layout and schema the recorder writes, two revisions per
stream as the recorder leaves them), then times in the same run:
  1. stats as the CLI computes it (open_capture + cli.stats_rows: DuckDB over the per-stream columns),
  2. the same computation in pandas (read the Parquet, keep the last revision, derive the metrics,
     group quantiles), checked to give the same numbers,
  3. the whole `mitm-sse stats` process (Python start-up included),
  4. pooled ITL over every event (the one summary that must scan events), for scale.
Target: (1) at most 2 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mitm_sse import cli, metrics
from mitm_sse.capture import open_capture
from mitm_sse.schema import CHUNKS, EVENTS, STREAMS
from mitm_sse.store import CaptureDir

HOSTS = [
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "localhost",
    "openrouter.ai",
]
MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "claude-sonnet",
    "claude-haiku",
    "gemini-flash",
    "llama-70b",
    "qwen-32b",
    "mistral",
]
T0 = 1_750_000_000_000_000_000
MS = 1_000_000


def _binary_column(payload: bytes, n: int) -> pa.Array:
    """n copies of payload as a BinaryArray, built from buffers (no Python loop)."""
    offsets = np.arange(n + 1, dtype=np.int32) * len(payload)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(payload * n)])


def _string_column(text: str, n: int) -> pa.Array:
    b = text.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * len(b)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(b * n)])


def build(path: Path, n_streams: int, per: int, seed: int = 0, files: int = 10) -> None:
    rng = np.random.default_rng(seed)
    cap = CaptureDir(path)
    cap.ensure()
    day = "day=2025-06-15"
    host_i = rng.integers(0, len(HOSTS), n_streams)
    model_i = rng.integers(0, len(MODELS), n_streams)
    t_req = T0 + np.arange(n_streams, dtype=np.int64) * 50 * MS + rng.integers(0, 50 * MS, n_streams)
    ttfb = rng.lognormal(np.log(120), 0.4, n_streams) * MS
    t_head = t_req + ttfb.astype(np.int64)
    # chunk gaps: chunk 0 = headers + ~lifecycle, chunk 1 = first token after "prefill", then token cadence
    gaps = rng.gamma(2.0, 15.0, (n_streams, per)) * MS
    gaps[:, 1] += rng.lognormal(np.log(300), 0.5, n_streams) * MS
    t_chunks = t_head[:, None] + np.cumsum(gaps, axis=1).astype(np.int64)
    t_end = t_chunks[:, -1] + 2 * MS
    content = t_chunks[:, 1:-1]  # first chunk is lifecycle, last carries usage: per-2 content events
    itl = np.diff(content, axis=1)
    p50, p95, p99 = (
        np.percentile(itl, q, axis=1, method="linear").round().astype(np.int64) for q in (50, 95, 99)
    )
    out_tokens = np.where(rng.random(n_streams) < 0.7, per - 2, None)  # 30% report no usage
    sid = np.char.add("s", np.char.zfill(np.arange(n_streams).astype(str), 23)).astype(object)

    final = {
        "stream_id": sid,
        "rev": np.ones(n_streams, np.int32),
        "instance": np.full(n_streams, "bench", object),
        "session": np.array([f"run{i % 4}" for i in range(n_streams)], object),
        "kind": np.full(n_streams, "sse", object),
        "method": np.full(n_streams, "POST", object),
        "scheme": np.full(n_streams, "https", object),
        "host": np.array(HOSTS, object)[host_i],
        "port": np.full(n_streams, 443, np.int32),
        "path": np.full(n_streams, "/v1/chat/completions", object),
        "query": np.full(n_streams, "", object),
        "status": np.where(rng.random(n_streams) < 0.01, 429, 200).astype(np.int32),
        "content_type": np.full(n_streams, "text/event-stream", object),
        "t_request_ns": t_req,
        "t_headers_ns": t_head,
        "t_end_ns": t_end,
        "end_reason": np.where(rng.random(n_streams) < 0.005, "client_disconnected", "complete").astype(
            object
        ),
        "n_chunks": np.full(n_streams, per, np.int64),
        "n_bytes": np.full(n_streams, per * 16, np.int64),
        "n_events": np.full(n_streams, per, np.int64),
        "provider": np.full(n_streams, "openai", object),
        "model": np.array(MODELS, object)[model_i],
        "input_tokens": rng.integers(10, 4000, n_streams),
        "output_tokens": out_tokens,
        "n_content_events": np.full(n_streams, per - 2, np.int64),
        "t_first_chunk_ns": t_chunks[:, 0],
        "t_first_event_ns": t_chunks[:, 0],
        "t_first_content_ns": content[:, 0],
        "t_last_content_ns": content[:, -1],
        "itl_p50_ns": p50,
        "itl_p95_ns": p95,
        "itl_p99_ns": p99,
        "itl_max_ns": itl.max(axis=1),
        "t_updated_ns": t_end + MS,
    }
    final["url"] = np.char.add(
        np.char.add("https://", final["host"].astype(str)), "/v1/chat/completions"
    ).astype(object)
    provisional = {
        k: final[k]
        for k in (
            "stream_id",
            "instance",
            "session",
            "kind",
            "method",
            "scheme",
            "url",
            "host",
            "port",
            "path",
            "query",
            "status",
            "content_type",
            "t_request_ns",
            "t_headers_ns",
            "model",
        )
    }
    provisional["rev"] = np.zeros(n_streams, np.int32)
    provisional["t_updated_ns"] = t_head + MS

    def table(cols: dict, schema: pa.Schema, n: int) -> pa.Table:
        arrays = []
        for f in schema:
            v = cols.get(f.name)
            arrays.append(pa.nulls(n, f.type) if v is None else pa.array(v, type=f.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    (path / "streams" / day).mkdir(parents=True, exist_ok=True)
    (path / "chunks" / day).mkdir(parents=True, exist_ok=True)
    (path / "events" / day).mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table(provisional, STREAMS, n_streams),
        path / "streams" / day / "s-0-provisional.parquet",
        compression="zstd",
    )
    pq.write_table(
        table(final, STREAMS, n_streams), path / "streams" / day / "s-1-final.parquet", compression="zstd"
    )

    # chunks and events: one event per chunk, written in `files` segments like a compacted capture
    bounds = np.linspace(0, n_streams, files + 1).astype(int)
    for k in range(files):
        lo, hi = bounds[k], bounds[k + 1]
        n = (hi - lo) * per
        sids = pa.array(np.repeat(sid[lo:hi], per), pa.string())
        seq = np.tile(np.arange(per, dtype=np.int64), hi - lo)
        t = t_chunks[lo:hi].reshape(-1)
        delta = np.diff(np.concatenate([t_head[lo:hi, None], t_chunks[lo:hi]], axis=1), axis=1).reshape(-1)
        chunks = pa.Table.from_arrays(
            [
                sids,
                pa.array(seq),
                pa.array(t),
                pa.array(delta),
                pa.array(np.full(n, 16, np.int64)),
                _binary_column(b'data: {"x":1}\n\n\n', n),
            ],
            schema=CHUNKS,
        )
        pq.write_table(
            chunks, path / "chunks" / day / f"c-{k:03d}.parquet", compression="zstd", row_group_size=1 << 20
        )
        is_content = (seq >= 1) & (seq < per - 1)
        events = pa.Table.from_arrays(
            [
                sids,
                pa.array(seq),
                pa.array(seq),
                pa.array(t),
                _string_column("message", n),
                _string_column('{"x":1}', n),
                pa.nulls(n, pa.string()),
                pa.nulls(n, pa.int64()),
                pa.array(np.where(is_content, "tok", None), pa.string()),
                pa.array(np.where(is_content, "text", None), pa.string()),
            ],
            schema=EVENTS,
        )
        pq.write_table(
            events, path / "events" / day / f"e-{k:03d}.parquet", compression="zstd", row_group_size=1 << 20
        )


def stats_duckdb(path: Path) -> tuple[list[str], list[tuple]]:
    """Exactly what `mitm-sse stats --by host,model` computes."""
    con = open_capture(path)
    return cli.stats_rows(con, ["host", "model"])


def stats_pandas(path: Path):
    """The same table with pandas (pyarrow reader, only the columns needed)."""
    import pandas as pd

    cols = [
        "stream_id",
        "rev",
        "t_updated_ns",
        "host",
        "model",
        "status",
        "end_reason",
        "t_request_ns",
        "t_headers_ns",
        "t_end_ns",
        "t_first_content_ns",
        "t_first_event_ns",
        "provider",
        "itl_p50_ns",
        "itl_p95_ns",
        "output_tokens",
        "n_content_events",
    ]
    files = sorted((path / "streams").glob("*/*.parquet"))
    df = pd.concat([pq.read_table(f, columns=cols).to_pandas() for f in files], ignore_index=True)
    df = df.sort_values(["rev", "t_updated_ns"]).drop_duplicates("stream_id", keep="last")
    out = pd.DataFrame({"host": df["host"], "model": df["model"].fillna("?")})
    tok = df["output_tokens"].fillna(df["n_content_events"])
    first = df["t_first_content_ns"].where(
        df["t_first_content_ns"].notna(), df["t_first_event_ns"].where(df["provider"] == "generic")
    )
    out["ttfb_ms"] = (df["t_headers_ns"] - df["t_request_ns"]) / 1e6
    out["ttft_ms"] = (first - df["t_request_ns"]) / 1e6
    out["e2e_ms"] = (df["t_end_ns"] - df["t_request_ns"]) / 1e6
    out["itl_p50_ms"] = df["itl_p50_ns"] / 1e6
    out["itl_p95_ms"] = df["itl_p95_ns"] / 1e6
    out["tpot_ms"] = ((df["t_end_ns"] - df["t_first_content_ns"]) / 1e6 / (tok - 1)).where(tok > 1)
    out["tokens_per_s"] = (tok / ((df["t_end_ns"] - df["t_request_ns"]) / 1e9)).where(tok > 0)
    out["error"] = (df["end_reason"].fillna("") != "complete") | (df["status"].fillna(0) >= 400)
    g = out.groupby(["host", "model"])
    res = g.size().rename("streams").to_frame()
    res["errors"] = g["error"].sum()
    for m in metrics.SUMMARY_METRICS:
        for q, name in metrics.QUANTILES:
            res[metrics.summary_column(m, name)] = g[m].quantile(q)
    return res.reset_index()


def timed(fn, *args, repeat: int = 5):
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - t)
    return result, min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=100_000)
    ap.add_argument("--chunks-per-stream", type=int, default=100)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic capture")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    path = args.dir or Path(tempfile.mkdtemp(prefix="mitm-sse-bench-"))
    try:
        t = time.perf_counter()
        build(path, args.streams, args.chunks_per_stream)
        size = sum(f.stat().st_size for f in path.rglob("*.parquet")) / 1e6
        print(
            f"built {args.streams:,} streams, {args.streams * args.chunks_per_stream:,} chunks and as many "
            f"events in {time.perf_counter() - t:.1f} s ({size:.0f} MB of Parquet) at {path}"
        )

        (cols, rows), best, med = timed(stats_duckdb, path, repeat=args.repeat)
        print(f"stats (CLI code path, DuckDB):  best {best:.3f} s, median {med:.3f} s  ({len(rows)} groups)")
        pdf, pbest, pmed = timed(stats_pandas, path, repeat=args.repeat)
        print(f"stats in pandas:               best {pbest:.3f} s, median {pmed:.3f} s")
        print(f"ratio pandas / DuckDB (median): {pmed / med:.1f}x")

        # same numbers both ways
        duck = {(r[0], r[1]): dict(zip(cols, r, strict=True)) for r in rows}
        worst = 0.0
        for _, pr in pdf.iterrows():
            d = duck[(pr["host"], pr["model"])]
            assert d["streams"] == pr["streams"] and d["errors"] == pr["errors"]
            for c in cols[2:]:
                if c in pr and d[c] is not None:
                    worst = max(worst, abs(d[c] - pr[c]) / max(abs(pr[c]), 1e-9))
        print(f"DuckDB and pandas agree: max relative difference {worst:.1e}")

        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-m", "mitm_sse.cli", "stats", "--dir", str(path), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        print(
            f"`mitm-sse stats --json` as a process (Python start-up included): {time.perf_counter() - t:.2f} s"
        )

        con = open_capture(path)
        t = time.perf_counter()
        con.execute(metrics.pooled_itl_sql(["model"])).fetchall()
        print(
            f"pooled ITL over all events (stats --pooled-itl, scans events): {time.perf_counter() - t:.2f} s"
        )
        target = "OK" if med <= 2.0 else "OVER TARGET"
        print(f"target stats <= 2 s: {target}")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
