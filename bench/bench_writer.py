"""Writer thread throughput and memory, and the cost of the tap on the event loop.

    python bench/bench_writer.py [--chunks 500000] [--streams 50]

Feeds the real Writer (parse, decode, batch, Parquet segments) with OpenAI-style chunks as fast as the
queue takes them, and reports chunks/s, events/s and peak RSS growth; then times Tap.__call__ (what runs on
mitmproxy's event loop per chunk) over many calls and prints p50/p99 beside a baseline of an identity
function called the same way.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_sse.capture import open_capture  # noqa: E402
from mitm_sse.store import CaptureDir  # noqa: E402
from mitm_sse.writer import CHUNK, END, OPEN, Writer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def openai_chunk(i: int) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-x",
        "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def row(sid: str) -> dict:
    now = time.time_ns()
    return {
        "stream_id": sid, "session": "bench", "kind": "sse", "method": "POST", "scheme": "https",
        "url": "https://api.openai.com/v1/chat/completions", "host": "api.openai.com", "port": 443,
        "path": "/v1/chat/completions", "query": "", "status": 200, "request_headers_json": "{}",
        "request_body": '{"model":"gpt-x","stream":true}', "request_body_raw": None,
        "response_headers_json": "{}", "content_type": "text/event-stream", "content_encoding": None,
        "http_version": "HTTP/1.1", "t_request_ns": now, "t_headers_ns": now, "model": "gpt-x",
    }  # fmt: skip


def bench_writer(n_chunks: int, n_streams: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cap = CaptureDir(d)
        w = Writer(cap, "bench")
        w.start()
        chunks = [openai_chunk(i) for i in range(1000)]
        sids = [f"s{i:04d}" for i in range(n_streams)]
        for sid in sids:
            w.q.put((OPEN, row(sid)))
        w.sync(60)
        rss0 = rss_mb()
        peak = rss0
        put = w.q.put
        t0 = time.perf_counter()
        for i in range(n_chunks):
            put((CHUNK, sids[i % n_streams], time.time_ns(), chunks[i % 1000]))
            if i % 50_000 == 0:
                # Keep the producer from racing far ahead (the proxy is limited by the network anyway).
                while w.q.qsize() > 100_000:
                    time.sleep(0.005)
                peak = max(peak, rss_mb())
        for sid in sids:
            put((END, sid, time.time_ns(), "complete", None))
        w.sync(600)
        elapsed = time.perf_counter() - t0
        peak = max(peak, rss_mb())
        w.stop()
        con = open_capture(d)
        stored = con.execute("SELECT count(*) FROM chunks").fetchone()[0]
        events = con.execute("SELECT count(*) FROM events WHERE delta_text IS NOT NULL").fetchone()[0]
        files = sum(1 for _ in Path(d).rglob("*.parquet"))
        return {
            "chunks": n_chunks, "stored": stored, "content_events": events, "seconds": elapsed,
            "chunks_per_s": n_chunks / elapsed, "rss_growth_mb": peak - rss0, "files": files,
        }  # fmt: skip


def bench_tap(n: int = 200_000) -> dict:
    from mitm_sse.recorder import Tap
    from mitm_sse.writer_proc import WriterClient

    with tempfile.TemporaryDirectory() as d:
        writer = WriterClient(CaptureDir(d), "tapbench")  # not started: we measure the enqueue only
        writer.alive = True
        tap = Tap("sid", writer, None)
        data = openai_chunk(1)

        def ident(b: bytes) -> bytes:
            return b

        out = {}
        for name, fn in (("identity", ident), ("tap", tap)):
            samples = []
            pc = time.perf_counter_ns
            for i in range(n):
                t = pc()
                fn(data)
                samples.append(pc() - t)
                if i % 20_000 == 0:  # drain so the queue does not grow without bound
                    while not writer.q.empty():
                        writer.q.get_nowait()
            samples.sort()
            out[name] = (
                samples[n // 2] / 1000,
                samples[int(n * 0.99)] / 1000,
                statistics.fmean(samples) / 1000,
            )
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=500_000)
    ap.add_argument("--streams", type=int, default=50)
    a = ap.parse_args()
    tap = bench_tap()
    print("per-chunk work on the event loop (µs)   p50     p99     mean")
    for name, (p50, p99, mean) in tap.items():
        print(f"  {name:<36} {p50:7.2f} {p99:7.2f} {mean:7.2f}")
    r = bench_writer(a.chunks, a.streams)
    print(
        f"writer: {r['chunks']:,} chunks ({r['streams'] if 'streams' in r else a.streams} streams) in "
        f"{r['seconds']:.2f} s = {r['chunks_per_s']:,.0f} chunks/s; stored {r['stored']:,}; "
        f"content events {r['content_events']:,}; RSS growth {r['rss_growth_mb']:.0f} MB; files {r['files']}"
    )


if __name__ == "__main__":
    main()
