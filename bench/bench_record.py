"""Recording overhead, side by side with the same mitmdump without the addon, in one run.

    python bench/bench_record.py [--chunks 10000] [--concurrent 50] [--rounds 3]

For each proxy (plain mitmdump with stream_large_bodies=1, so it streams too; and mitmdump -s record.py):
- throughput: one stream of N chunks sent as fast as the upstream can, timed at the client;
- concurrency: 50 streams at once of N/50 chunks each, total time;
- latency: chunks paced 2 ms apart carry their send time (epoch ns); the client subtracts it on arrival.
Printed as ratios against the plain proxy measured in the same run (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.proxy import Mitmdump  # noqa: E402

PAYLOAD = b'{"choices":[{"delta":{"content":" token"}}]}'


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        _, n, gap_us = path.rsplit("/", 2)
        n, gap = int(n), int(gap_us) / 1e6
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(n):
            body = b"data: " + str(time.time_ns()).encode() + b" " + PAYLOAD + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(body), body))
            if gap:
                await writer.drain()
                await asyncio.sleep(gap)
            elif writer.transport.get_write_buffer_size() > 256 * 1024:
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def client(proxy_port: int, up_port: int, n: int, gap_us: int) -> tuple[int, list[int]]:
    r, w = await asyncio.open_connection("127.0.0.1", proxy_port)
    w.write(
        f"GET http://127.0.0.1:{up_port}/s/{n}/{gap_us} HTTP/1.1\r\nHost: 127.0.0.1:{up_port}\r\n"
        f"Accept: text/event-stream\r\n\r\n".encode()
    )
    await w.drain()
    await r.readuntil(b"\r\n\r\n")
    lat: list[int] = []
    got = 0
    buf = b""
    while True:
        size_line = await r.readuntil(b"\r\n")
        size = int(size_line.strip(), 16)
        if size == 0:
            break
        data = await r.readexactly(size + 2)
        now = time.time_ns()
        buf += data[:-2]
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            got += 1
            if gap_us:
                lat.append(now - int(ev[6:].split(b" ", 1)[0]))
    w.close()
    return got, lat


async def run_case(proxy_port: int, up_port: int, chunks: int, concurrent: int) -> dict:
    t = time.perf_counter()
    got, _ = await client(proxy_port, up_port, chunks, 0)
    single = time.perf_counter() - t
    assert got == chunks, got
    t = time.perf_counter()
    per = chunks // concurrent
    res = await asyncio.gather(*(client(proxy_port, up_port, per, 0) for _ in range(concurrent)))
    multi = time.perf_counter() - t
    assert sum(g for g, _ in res) == per * concurrent
    _, lat = await client(proxy_port, up_port, 500, 2000)
    return {"single_s": single, "multi_s": multi, "lat_ms": statistics.median(lat) / 1e6,
            "lat_p99_ms": sorted(lat)[int(len(lat) * 0.99)] / 1e6}  # fmt: skip


async def main_async(a: argparse.Namespace) -> None:
    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = server.sockets[0].getsockname()[1]
    results: dict[str, list[dict]] = {"plain": [], "record": []}
    with tempfile.TemporaryDirectory() as d:
        proxies = {
            "plain": Mitmdump(Path(d) / "plain", script=None, options={"stream_large_bodies": "1"}),
            "record": Mitmdump(Path(d) / "rec", script="record"),
        }
        for p in proxies.values():
            p.tmp.mkdir(parents=True, exist_ok=True)
            p.start()
        try:
            for _ in range(a.rounds):  # interleaved rounds: drift in machine load hits both alike
                for name, p in proxies.items():
                    results[name].append(await run_case(p.port, up_port, a.chunks, a.concurrent))
        finally:
            for p in proxies.values():
                p.stop()
    server.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    plain_tp = a.chunks / med("plain", "single_s")
    rec_tp = a.chunks / med("record", "single_s")
    plain_m = a.chunks / med("plain", "multi_s")
    rec_m = a.chunks / med("record", "multi_s")
    print(f"rounds={a.rounds}  (median over rounds)        plain mitmdump   + recorder   ratio")
    print(
        f"1 stream x {a.chunks} chunks, chunks/s        {plain_tp:14,.0f} {rec_tp:12,.0f}   {rec_tp / plain_tp:5.3f}"
    )
    print(
        f"{a.concurrent} streams x {a.chunks // a.concurrent} chunks, chunks/s      "
        f"{plain_m:14,.0f} {rec_m:12,.0f}   {rec_m / plain_m:5.3f}"
    )
    pl, rl = med("plain", "lat_ms"), med("record", "lat_ms")
    print(f"paced chunk latency p50, ms             {pl:14.3f} {rl:12.3f}   added {rl - pl:+.3f} ms")
    print(
        f"paced chunk latency p99, ms             {med('plain', 'lat_p99_ms'):14.3f} "
        f"{med('record', 'lat_p99_ms'):12.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
