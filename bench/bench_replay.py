"""Replay fidelity and instant-replay throughput of the mock, beside plain mitmdump in the same run.

    python bench/bench_replay.py [--streams 100] [--chunks 100] [--seed 1]

1. baseline: plain mitmdump (no addon, stream_large_bodies=1) between a scripted upstream and 100 concurrent
   clients; every chunk's gap at the client is compared with the gap at which the upstream wrote it.
   This is mitmproxy's own jitter: the floor for both recording and replay.
2. record: the same traffic through `mitmdump -s mitm_sse/record.py` (recorded gaps: chunks.delta_ns).
3. mock, speed 1: upstream stopped, the same 100 requests at once through `mitmdump -s mitm_sse/mock.py`;
   every chunk's gap at the client is compared with its recorded gap.
4. instant: `sse_mock_speed=0` against mitmproxy's own `--server-replay` of the same flows (built from the
   capture), 100 concurrent streams: chunks per second at the client.

Gaps are drawn uniformly from 1-200 ms (seeded). Clients are raw asyncio sockets (one loop, one thread) so
the measuring side costs little; the upstream runs in its own thread.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.proxy import Mitmdump  # noqa: E402
from tests.servers import ScriptedServer  # noqa: E402

MARK = re.compile(rb'"c":(\d+),')


def scripts(n_streams: int, n_chunks: int, seed: int) -> dict[str, list[tuple[float, bytes]]]:
    rnd = random.Random(seed)
    out = {}
    for s in range(n_streams):
        steps = []
        for c in range(n_chunks):
            gap = rnd.uniform(0.001, 0.200)
            body = b'data: {"s":%d,"c":%d,"choices":[{"delta":{"content":" tok"}}]}\n\n' % (s, c)
            steps.append((0.0 if c == 0 else gap, body))
        out[f"/s{s}"] = steps
    return out


async def fetch(proxy_port: int, url: str, host: str) -> tuple[list[float], float]:
    """Arrival time (monotonic) of each chunk, found by its marker in the de-chunked body; end time."""
    r, w = await asyncio.open_connection("127.0.0.1", proxy_port)
    w.write(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await w.drain()
    raw, body = bytearray(), bytearray()
    arrivals: list[float] = []
    pos = 0
    head_done, chunked, finished = False, False, False
    while not finished:
        data = await r.read(65536)
        now = time.monotonic()
        if not data:
            break
        raw += data
        if not head_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                continue
            chunked = b"transfer-encoding: chunked" in raw[:end].lower()
            del raw[: end + 4]
            head_done = True
        if chunked:  # proxies re-frame chunks: a marker may straddle two HTTP chunks
            while True:
                nl = raw.find(b"\r\n")
                if nl < 0:
                    break
                size = int(raw[:nl].split(b";")[0], 16)
                if size == 0:
                    finished = True
                    break
                if len(raw) < nl + 2 + size + 2:
                    break
                body += raw[nl + 2 : nl + 2 + size]
                del raw[: nl + 2 + size + 2]
        else:
            body += raw
            raw.clear()
        for m in MARK.finditer(body, pos):
            arrivals.append(now)
            pos = m.end()
    w.close()
    return arrivals, time.monotonic()


async def run_clients(
    proxy_port: int, up_port: int, paths: list[str]
) -> tuple[dict[str, list[float]], float]:
    host = f"127.0.0.1:{up_port}"
    t = time.monotonic()
    res = await asyncio.gather(*(fetch(proxy_port, f"http://{host}{p}", host) for p in paths))
    wall = max(end for _, end in res) - t
    return {p: arr for p, (arr, _) in zip(paths, res, strict=True)}, wall


def errors_ms(client: dict[str, list[float]], reference: dict[str, list[float]]) -> list[float]:
    """|client gap - reference gap| in ms for every chunk after the first."""
    out = []
    for p, arr in client.items():
        ref = reference[p]
        if len(arr) != len(ref):
            raise RuntimeError(f"{p}: {len(arr)} chunks at the client, {len(ref)} expected")
        for i in range(1, len(arr)):
            out.append(abs((arr[i] - arr[i - 1]) - (ref[i] - ref[i - 1])) * 1000)
    return out


def pct(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def write_flows(path: Path, con, up_port: int) -> None:
    """The captured streams as a mitmproxy flow file, for --server-replay."""
    from mitmproxy import http, io
    from mitmproxy.test import tflow

    rows = con.execute(
        "SELECT s.path, list(c.data ORDER BY c.seq) FROM streams s JOIN chunks c USING (stream_id) GROUP BY s.path"
    ).fetchall()
    with open(path, "wb") as f:
        w = io.FlowWriter(f)
        for p, body in rows:
            fl = tflow.tflow(resp=True)
            fl.request = http.Request.make("GET", f"http://127.0.0.1:{up_port}{p}")
            fl.response = http.Response.make(200, b"".join(body), {"content-type": "text/event-stream"})
            w.add(fl)


async def main_async(a: argparse.Namespace) -> None:
    routes = scripts(a.streams, a.chunks, a.seed)
    paths = list(routes)
    n_total = a.streams * a.chunks
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as d:
        tmp = Path(d)
        srv = ScriptedServer("h1-chunked", routes={p: (200, None, s) for p, s in routes.items()}, script=None)
        srv.response_timeout = 120
        srv.start()
        up = srv.port

        def server_times() -> dict[str, list[float]]:
            return {r.request.path: [t for t, _ in r.writes] for r in srv.responses}

        # 1. plain mitmdump
        with Mitmdump(tmp / "plain", script=None, options={"stream_large_bodies": "1"}) as p:
            got, _ = await run_clients(p.port, up, paths)
        base = errors_ms(got, server_times())
        srv.responses.clear()

        # 2. record
        cap = tmp / "capture"
        with Mitmdump(tmp / "rec", script="record", sse_dir=cap) as p:
            got, _ = await run_clients(p.port, up, paths)
            p.wait_for(
                "SELECT count(*) FROM streams WHERE end_reason = 'complete'",
                lambda r: r[0][0] == a.streams,
                timeout=30,
            )
        rec_err = errors_ms(got, server_times())
        srv.stop()

        con = p.capture()
        recorded: dict[str, list[float]] = {}  # per chunk marker: when its recorded chunk arrived
        for path, times, datas in con.execute(
            "SELECT s.path, list(c.t_ns ORDER BY c.seq), list(c.data ORDER BY c.seq) "
            "FROM streams s JOIN chunks c USING (stream_id) GROUP BY s.path"
        ).fetchall():
            recorded[path] = [t / 1e9 for t, d in zip(times, datas, strict=True) for _ in MARK.finditer(d)]
        write_flows(tmp / "flows.mitm", con, up)
        con.close()

        # 3. mock at speed 1
        with Mitmdump(tmp / "mock1", script="mock", sse_dir=cap) as p:
            await warm(p.port)
            got, _ = await run_clients(p.port, up, paths)
        mock_err = errors_ms(got, recorded)

        # 4. instant: mock speed 0 vs mitmproxy --server-replay
        with Mitmdump(tmp / "mock0", script="mock", sse_dir=cap, options={"sse_mock_speed": "0"}) as p:
            await warm(p.port)
            await run_clients(p.port, up, paths[:5])  # chunk cache warm, like server-replay's flows in memory
            got, wall_mock = await run_clients(p.port, up, paths)
        assert sum(len(v) for v in got.values()) == n_total
        sr_opts = {"server_replay_extra": "kill", "server_replay_reuse": "true"}
        with Mitmdump(
            tmp / "sr", script=None, options=sr_opts, args=["--server-replay", str(tmp / "flows.mitm")]
        ) as p:
            await run_clients(p.port, up, paths[:5])
            got, wall_sr = await run_clients(p.port, up, paths)
        assert sum(len(v) for v in got.values()) == n_total

    def line(name: str, e: list[float]) -> tuple[str, str]:
        return (
            name,
            f"{len(e):7d} {pct(e, 0.5):7.2f} {pct(e, 0.95):7.2f} {pct(e, 0.99):7.2f} {max(e):7.2f}",
        )

    print(
        f"\n{a.streams} concurrent streams x {a.chunks} chunks, gaps 1-200 ms (seed {a.seed}), Python "
        f"{sys.version.split()[0]}"
    )
    print(f"{'|client gap - reference gap|, ms':44} {'gaps':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}")
    rows.append(line("plain mitmdump (vs upstream writes)", base))
    rows.append(line("record.py (vs upstream writes)", rec_err))
    rows.append(line("mock.py speed 1 (vs recorded gaps)", mock_err))
    for name, vals in rows:
        print(f"{name:44} {vals}")
    print(f"\n{'instant replay, 100 concurrent':44} {'chunks/s':>9} {'wall s':>7}")
    print(f"{'mock.py sse_mock_speed=0':44} {n_total / wall_mock:9.0f} {wall_mock:7.2f}")
    print(f"{'mitmdump --server-replay (whole bodies)':44} {n_total / wall_sr:9.0f} {wall_sr:7.2f}")
    print(
        f"\nmedian recorded gap {statistics.median(d for v in recorded.values() for d in _gaps(v)) * 1000:.1f} ms"
    )


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def warm(port: int) -> None:
    """Wait until the mock has loaded its index (mitmdump listens before that)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET http://mitm-sse.mock/status HTTP/1.1\r\nHost: mitm-sse.mock\r\nConnection: close\r\n\r\n")
    await w.drain()
    await r.read()
    w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
