"""Load: many concurrent paced SSE streams through a real mitmdump, plain and recording, in one run.

    python bench/load_concurrent.py [--streams 200] [--seconds 60] [--rate 30] [--pad 120] [--quick]

Defaults: 200 streams x 30 chunks/s = 6,000 chunks/s for 60 s (issue 5, "Load"). `--quick`: 50 streams for
3 s each (under 20 s in all). Stream starts are spread over one chunk interval, so their phases differ.

- upstream: a raw asyncio HTTP/1.1 server (own process, 127.0.0.1) sends each stream's chunks on an absolute
  schedule, one SSE event per HTTP chunk: `data: {"s":S,"n":N,"t":<send time ns>,"pad":"xx.."}` (unique, sizes
  vary), and keeps a SHA-256 of everything it sent per stream;
- clients: raw asyncio sockets (absolute-form GET through the proxy) decode the chunked body, hash it and
  measure each event's latency (send time in the payload to arrival);
- the same load first through plain mitmdump (no addon, stream_large_bodies=1): the baseline, then through
  `mitmdump -s mitm_sse/record.py`; RSS and CPU of mitmdump and of its writer child sampled every second
  from /proc;
- after SIGTERM (the recorder flushes), the capture is checked: per stream the concatenation of
  chunks.data ordered by seq is what the upstream sent (the proxy may coalesce or split reads, so chunk rows
  are not compared one by one), seq is 0..n-1 with no duplicate (stream_id, seq), one event per sent chunk,
  every event distinct, the stream ended `complete`.

Only correctness fails the run (exit 1). Throughput, latency and memory are printed, with the plain proxy
measured in the same run as the yardstick: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    SSE_RESPONSE_HEAD,
    Sampler,
    machine_line,
    mb,
    open_sse,
    print_failures,
    read_chunk,
    serve_until_stopped,
    upstream_process,
)
from mitm_sse import open_capture  # noqa: E402
from tests.proxy import Mitmdump  # noqa: E402

IDLE_TIMEOUT = 30.0  # a client or upstream write that makes no progress for this long fails the stream
T_RE = re.compile(rb'"t":(\d+)')


# ---- upstream (its own process) ---------------------------------------------------------------------
def payload(s: int, n: int, pad: int) -> bytes:
    p = b"x" * (pad // 4 + (s * 7 + n * 13) % max(pad, 1))
    return b'data: {"s":%d,"n":%d,"t":%d,"pad":"%s"}\n\n' % (s, n, time.time_ns(), p)


def upstream_main(conn, pad: int) -> None:
    """Child process: serve /load/<run>/<s>/<n>/<rate> until told to stop; report per-stream hashes."""
    sent: dict[str, tuple] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key, i, nbytes, h, late = "?", 0, 0, hashlib.sha256(), 0.0
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            path = head.split(b" ", 2)[1].decode()
            _, _, run, s, n, rate = path.split("/")
            s, n, rate = int(s), int(n), float(rate)
            key = f"{run}/{s}"
            writer.write(SSE_RESPONSE_HEAD)
            t0 = time.monotonic()
            for i in range(n):  # noqa: B007 (i is reported on failure)
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late = max(late, -delay)
                body = payload(s, i, pad)
                h.update(body)
                nbytes += len(body)
                writer.write(b"%x\r\n%s\r\n" % (len(body), body))
                if writer.transport.get_write_buffer_size() > 64 * 1024:
                    await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            writer.write(b"0\r\n\r\n")
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            sent[key] = (n, nbytes, h.hexdigest(), late, None)
        except Exception as e:  # noqa: BLE001 (reported to the parent, which fails the run)
            sent[key] = (i, nbytes, h.hexdigest(), late, repr(e))
        finally:
            writer.close()

    asyncio.run(serve_until_stopped(conn, handle, sent, backlog=1024))


# ---- clients (this process) ---------------------------------------------------------------------------
async def client(proxy_port: int, up_port: int, run: str, s: int, n: int, rate: float, delay: float) -> dict:
    await asyncio.sleep(delay)
    res = {"s": s, "events": 0, "bytes": 0, "sha": "", "lat": [], "error": None}
    h = hashlib.sha256()
    w = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(IDLE_TIMEOUT) as cm:
            r, w = await open_sse(proxy_port, up_port, f"/load/{run}/{s}/{n}/{rate}")
            tail = b""
            lat = res["lat"]
            for _ in range(4 * n + 16):  # bounded: at most a few HTTP chunks per sent chunk
                data = await read_chunk(r)
                if data is None:
                    break
                now = time.time_ns()
                cm.reschedule(loop.time() + IDLE_TIMEOUT)
                h.update(data)
                res["bytes"] += len(data)
                buf = tail + data
                cut = buf.rfind(b"\n\n")
                if cut >= 0:
                    done, tail = buf[: cut + 2], buf[cut + 2 :]
                    res["events"] += done.count(b"\n\n")
                    lat.extend(now - int(t) for t in T_RE.findall(done))
                else:
                    tail = buf
            else:
                raise RuntimeError("too many HTTP chunks")
    except Exception as e:  # noqa: BLE001
        res["error"] = repr(e) or type(e).__name__
    finally:
        if w is not None:
            w.close()
    res["sha"] = h.hexdigest()
    return res


# ---- figures --------------------------------------------------------------------------------------------
def pct(vals: list[int], q: float) -> float:
    return vals[min(len(vals) - 1, int(len(vals) * q))] / 1e6


# ---- one run through one proxy --------------------------------------------------------------------------
async def load(proxy_port: int, up_port: int, run: str, a: argparse.Namespace) -> tuple[list[dict], float]:
    n = int(a.seconds * a.rate)
    t = time.monotonic()
    res = await asyncio.wait_for(
        asyncio.gather(
            *(
                client(proxy_port, up_port, run, s, n, a.rate, s / a.streams / a.rate)
                for s in range(a.streams)
            )
        ),
        a.seconds + 1 + 4 * IDLE_TIMEOUT,
    )
    return res, time.monotonic() - t


def run_one(name: str, proxy: Mitmdump, up_port: int, conn, a: argparse.Namespace) -> dict:
    recording = proxy.script is not None
    proxy.tmp.mkdir(parents=True, exist_ok=True)
    proxy.start()
    sampler = Sampler(proxy.proc.pid, a.seconds + 10 * IDLE_TIMEOUT, recording=recording)
    out: dict = {"name": name, "failures": []}
    try:
        time.sleep(1.0)
        start = sampler.sample()
        sampler.start()
        res, wall = asyncio.run(load(proxy.port, up_port, name, a))
        time.sleep(1.5)  # let the writer flush its last interval before the "end" sample
        end = sampler.sample()
        sampler.halt.set()
        sampler.join(5)
    finally:
        sampler.halt.set()
        rc = proxy.stop()
    conn.send("dump")
    sent = {int(k.split("/")[1]): v for k, v in conn.recv().items() if k.startswith(name + "/")}
    n = int(a.seconds * a.rate)
    fails = out["failures"]
    for r in res:
        s = r["s"]
        if r["error"]:
            fails.append(f"client {s}: {r['error']}")
        snt = sent.get(s)
        if snt is None:
            fails.append(f"stream {s}: the upstream has no record of it")
            continue
        if snt[4]:
            fails.append(f"upstream {s}: {snt[4]}")
        if snt[0] != n or r["events"] != n or r["sha"] != snt[2] or r["bytes"] != snt[1]:
            fails.append(f"client {s}: got {r['events']} events/{r['bytes']} B, sent {snt[0]}/{snt[1]} B, "
                         f"hash {'equal' if r['sha'] == snt[2] else 'DIFFERENT'}")  # fmt: skip
    got = sum(r["events"] for r in res)
    lat = sorted(x for r in res for x in r["lat"])
    rss_p = [x[1] for x in sampler.samples if x[1] is not None]
    rss_w = [x[2] for x in sampler.samples if x[2] is not None]
    out.update(
        chunks=got,
        wall=wall,
        cps=got / wall,
        lat50=pct(lat, 0.5) if lat else float("nan"),
        lat99=pct(lat, 0.99) if lat else float("nan"),
        latmax=lat[-1] / 1e6 if lat else float("nan"),
        late=max((v[3] for v in sent.values()), default=0.0),
        rss=(start[1], max(rss_p, default=None), end[1]),
        wrss=(start[2], max(rss_w, default=None), end[2]),
        cpu=(end[3] or 0) - (start[3] or 0),
        wcpu=((end[4] or 0) - (start[4] or 0)) if recording else None,
        rc=rc,
        timeline=[
            (x[0] - start[0], x[1], x[2]) for x in sampler.samples[:: max(1, len(sampler.samples) // 10)]
        ],
        byte_identical=sum(1 for r in res if not r["error"] and r["sha"] == sent.get(r["s"], (0, 0, ""))[2]),
    )
    if rc != 0:
        fails.append(f"mitmdump exited with {rc} after SIGTERM")
    if recording:
        t = time.monotonic()
        check_capture(proxy.sse_dir, name, sent, n, a.streams, fails, out)
        out["check_s"] = time.monotonic() - t
    return out


def check_capture(
    path: Path, run: str, sent: dict, n: int, streams: int, fails: list[str], out: dict
) -> None:
    con = open_capture(path)
    rows = con.execute(
        "SELECT stream_id, path, end_reason, n_chunks, n_events, n_bytes FROM streams WHERE path LIKE ?",
        [f"/load/{run}/%"],
    ).fetchall()
    by_sid = {r[0]: int(r[1].split("/")[3]) for r in rows}
    if len(rows) != streams or len(set(by_sid.values())) != streams:
        fails.append(
            f"capture: {len(rows)} stream rows ({len(set(by_sid.values()))} distinct), want {streams}"
        )
    n_chunks_of = {r[0]: r[3] for r in rows}
    for sid, _, reason, _n_chunks, n_events, n_bytes in rows:
        s = by_sid[sid]
        if reason != "complete" or n_events != n or n_bytes != sent.get(s, (0, -1))[1]:
            fails.append(f"capture stream {s}: end_reason={reason} n_events={n_events} n_bytes={n_bytes}")
    dups = con.execute(
        "SELECT count(*) FROM (SELECT stream_id, seq FROM chunks GROUP BY ALL HAVING count(*) > 1)"
    ).fetchall()[0][0]
    if dups:
        fails.append(f"capture: {dups} duplicated (stream_id, seq)")
    for sid, cnt, dist, lo, hi, size in con.execute(
        "SELECT stream_id, count(*), count(DISTINCT seq), min(seq), max(seq), sum(size) FROM chunks GROUP BY ALL"
    ).fetchall():
        if sid in by_sid and (
            cnt != dist
            or lo != 0
            or hi != cnt - 1
            or cnt != n_chunks_of[sid]
            or size != sent.get(by_sid[sid], (0, -1))[1]
        ):
            fails.append(f"capture stream {by_sid[sid]}: {cnt} chunk rows ({n_chunks_of[sid]} in streams), "
                         f"seq {lo}..{hi}, {dist} distinct, {size} bytes")  # fmt: skip
    for sid, cnt, dist in con.execute(
        "SELECT stream_id, count(*), count(DISTINCT data) FROM events GROUP BY ALL"
    ).fetchall():
        if sid in by_sid and (cnt != n or dist != n):
            fails.append(f"capture stream {by_sid[sid]}: {cnt} events ({dist} distinct), sent {n}")
    hashes: dict[str, hashlib._Hash] = {}
    n_rows = 0
    reader = con.sql("SELECT stream_id, data FROM chunks ORDER BY stream_id, seq").to_arrow_reader(65536)
    for batch in reader:
        for sid, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            n_rows += 1
            if data is None:
                fails.append(f"capture: a NULL chunk in stream {by_sid.get(sid, sid)}")
                continue
            h = hashes.get(sid)
            if h is None:
                h = hashes[sid] = hashlib.sha256()
            h.update(data)
    same = 0
    for sid, s in by_sid.items():
        h = hashes.get(sid)
        if h is not None and h.hexdigest() == sent.get(s, (0, 0, ""))[2]:
            same += 1
        else:
            fails.append(f"capture stream {s}: concatenated chunks.data differ from what the upstream sent")
    out["stored_rows"], out["stored_identical"] = n_rows, same
    con.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=30.0, help="chunks/s per stream")
    ap.add_argument("--pad", type=int, default=120, help="padding bytes per event (varies 0.25x..1.25x)")
    ap.add_argument("--quick", action="store_true", help="50 streams x 3 s (under 20 s in all)")
    a = ap.parse_args()
    if a.quick:
        a.streams, a.seconds = 50, 3.0
    n = int(a.seconds * a.rate)
    print(f"load_concurrent: {a.streams} streams x {n} chunks at {a.rate:g}/s each "
          f"(target {a.streams * a.rate:,.0f} chunks/s for {a.seconds:g} s), pad {a.pad}")  # fmt: skip
    print(machine_line())
    results = []
    with upstream_process(upstream_main, a.pad) as (parent, up_port):
        with tempfile.TemporaryDirectory(prefix="load-concurrent-") as d:
            for name, script, opts in (
                ("plain", None, {"stream_large_bodies": "1"}),
                ("record", "record", None),
            ):
                proxy = Mitmdump(Path(d) / name, script=script, options=opts)
                try:
                    r = run_one(name, proxy, up_port, parent, a)
                except BaseException:
                    print(f"--- {name}: mitmdump log tail ---\n{proxy.log()[-3000:]}", file=sys.stderr)
                    raise
                finally:
                    proxy.stop()
                results.append(r)
                report(r, a)
    plain, rec = results
    print("\nrecording vs plain mitmdump, same run:")
    print(f"  chunks/s {rec['cps']:,.0f} vs {plain['cps']:,.0f} (ratio {rec['cps'] / plain['cps']:.3f}); "
          f"latency p50 {rec['lat50']:.2f} vs {plain['lat50']:.2f} ms, p99 {rec['lat99']:.2f} vs "
          f"{plain['lat99']:.2f} ms")  # fmt: skip
    print(
        f"  mitmdump CPU {rec['cpu']:.1f} s (+ writer {rec['wcpu']:.1f} s) vs {plain['cpu']:.1f} s; "
        f"peak RSS {mb(rec['rss'][1])} MB (+ writer {mb(rec['wrss'][1])} MB) vs {mb(plain['rss'][1])} MB"
    )
    fails = [f"{r['name']}: {f}" for r in results for f in r["failures"]]
    if fails:
        return print_failures(fails)
    print("\nOK: every client byte-identical; every chunk stored exactly once (concatenation per stream)")
    return 0


def report(r: dict, a: argparse.Namespace) -> None:
    print(
        f"\n[{r['name']}] {r['chunks']:,} chunks in {r['wall']:.1f} s = {r['cps']:,.0f} chunks/s "
        f"(target {a.streams * a.rate:,.0f}); byte-identical clients {r['byte_identical']}/{a.streams}"
    )
    print(
        f"  latency upstream send -> client: p50 {r['lat50']:.2f} ms, p99 {r['lat99']:.2f} ms, "
        f"max {r['latmax']:.1f} ms; upstream worst lag behind schedule {r['late'] * 1e3:.1f} ms"
    )
    print(f"  mitmdump RSS MB start/peak/end {mb(r['rss'][0])} / {mb(r['rss'][1])} / {mb(r['rss'][2])}, "
          f"CPU {r['cpu']:.1f} s")  # fmt: skip
    if r["wcpu"] is not None:
        print(f"  writer   RSS MB start/peak/end {mb(r['wrss'][0])} / {mb(r['wrss'][1])} / {mb(r['wrss'][2])}, "
              f"CPU {r['wcpu']:.1f} s")  # fmt: skip
        if "stored_rows" in r:
            print(f"  capture: {r['stored_rows']:,} chunk rows; streams whose stored bytes equal what was sent: "
                  f"{r['stored_identical']}/{a.streams} (checked in {r['check_s']:.1f} s)")  # fmt: skip
    print(
        "  RSS MB over time (proxy/writer): "
        + ", ".join(f"{t:.0f}s {mb(p)}/{mb(w)}" for t, p, w in r["timeline"])
    )
    print(f"  mitmdump exit code after SIGTERM: {r['rc']}; problems: {len(r['failures'])}")


if __name__ == "__main__":
    sys.exit(main())
