"""Load: one long-lived "continuous SSE" stream (live-feed pattern) through the recording mitmdump.

    python bench/load_longlived.py [--chunks 1000000] [--rate 0] [--query-every 5] [--quick]

The upstream (raw asyncio HTTP/1.1, own process, 127.0.0.1) sends one stream of `--chunks` HTTP chunks that
alternate an SSE keep-alive comment (`: keep-alive`) and a small `data: {"n":N,...}` event, as fast as the
proxy takes them (`--rate 0`, the default) or paced at `--rate` chunks/s, and hashes what it sent. A raw
asyncio client reads it through `mitmdump -s mitm_sse/record.py` and hashes what it got.

While the stream is open:
- RSS of mitmdump and of its writer child is sampled every second from /proc (issue 5: growth under 50 MB);
- every `--query-every` seconds another process opens the capture (`open_capture(dir)`, a snapshot) and
  counts the chunks and events of the still-open stream: "queryable while open", and it must grow.
After the stream ends and the proxy is stopped with SIGTERM, the capture must hold exactly what was sent:
the concatenation of chunks.data ordered by seq equals the upstream's bytes, seq is 0..n-1 without
duplicates, one event per data event sent, the stream ended `complete`.

Only correctness fails the run (exit 1); memory and rates are printed (shared, noisy machines).
`--quick`: 200,000 chunks at 20,000 chunks/s, queried every second (under 20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
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

ROOT = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT = 30.0  # no progress for this long fails the stream
KEEPALIVE = b": keep-alive\n\n"

QUERY = r"""
import json, os, sys, time
t = time.perf_counter()
from mitm_sse import open_capture
from mitm_sse.store import CaptureDir
con = open_capture(sys.argv[1])
row = con.execute("SELECT stream_id, end_reason FROM streams WHERE path LIKE '/live/%'").fetchall()[0]
out = {"stream": None}
if row:
    sid = row[0]
    c = con.execute("SELECT count(*), coalesce(max(seq), -1), coalesce(sum(size), 0) FROM chunks "
                    "WHERE stream_id = ?", [sid]).fetchall()[0]
    e = con.execute("SELECT count(*) FROM events WHERE stream_id = ?", [sid]).fetchall()[0][0]
    out = {"stream": sid, "end_reason": row[1], "chunks": c[0], "max_seq": c[1], "bytes": c[2], "events": e}
out["ms"] = (time.perf_counter() - t) * 1e3
files = [os.path.getsize(f) for f in CaptureDir(sys.argv[1]).snapshot()["chunks"] if os.path.exists(f)]
out["files"], out["largest"] = len(files), max(files, default=0)
print(json.dumps(out))
"""


# ---- upstream (its own process) ---------------------------------------------------------------------
def upstream_main(conn) -> None:
    """Child process: serve /live/<n>/<rate>; report (chunks, data events, bytes, sha256, error)."""
    sent: dict[str, tuple] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i, nbytes, events, h = 0, 0, 0, hashlib.sha256()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
            _, _, n, rate = head.split(b" ", 2)[1].decode().split("/")
            n, rate = int(n), float(rate)
            writer.write(SSE_RESPONSE_HEAD)
            t0 = time.monotonic()
            for i in range(n):  # noqa: B007 (i is reported on failure)
                if rate > 0:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if i % 2:
                    body = b'data: {"n":%d,"t":%d,"price":%d.%02d}\n\n' % (
                        i,
                        time.time_ns(),
                        i % 997,
                        i % 100,
                    )
                    events += 1
                else:
                    body = KEEPALIVE
                h.update(body)
                nbytes += len(body)
                writer.write(b"%x\r\n%s\r\n" % (len(body), body))
                if writer.transport.get_write_buffer_size() > 64 * 1024:
                    await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            writer.write(b"0\r\n\r\n")
            await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
            sent["live"] = (n, events, nbytes, h.hexdigest(), None)
        except Exception as e:  # noqa: BLE001 (reported to the parent, which fails the run)
            sent["live"] = (i, events, nbytes, h.hexdigest(), repr(e))
        finally:
            writer.close()

    asyncio.run(serve_until_stopped(conn, handle, sent))


# ---- client and queries (this process) -------------------------------------------------------------------
async def client(proxy_port: int, up_port: int, n: int, rate: float, progress: dict) -> dict:
    h = hashlib.sha256()
    w = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(IDLE_TIMEOUT) as cm:
            r, w = await open_sse(proxy_port, up_port, f"/live/{n}/{rate}", limit=1 << 20)
            progress["t_start"] = time.monotonic()
            last = b""
            for _ in range(4 * n + 16):  # bounded: at most a few HTTP chunks per sent chunk
                data = await read_chunk(r)
                if data is None:
                    break
                cm.reschedule(loop.time() + IDLE_TIMEOUT)
                h.update(data)
                progress["bytes"] += len(data)
                # sent chunks are whole SSE blocks; a block end may be split between two reads
                progress["blocks"] += (last + data).count(b"\n\n")
                last = data[-1:]
            else:
                raise RuntimeError("too many HTTP chunks")
            progress["t_end"] = time.monotonic()
    except Exception as e:  # noqa: BLE001
        progress["error"] = repr(e) or type(e).__name__
    finally:
        if w is not None:
            w.close()
    progress["sha"] = h.hexdigest()
    return progress


async def querier(sse_dir: Path, every: float, progress: dict, sampler: Sampler, log: list) -> None:
    """Query the capture from another process while the stream is open (bounded: at most 100 queries)."""
    for _ in range(100):
        await asyncio.sleep(every)
        if "t_end" in progress or "error" in progress:
            return
        t = time.monotonic()
        at_client = progress["blocks"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", QUERY, str(sse_dir), cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            log.append({"t": t, "error": "query timed out after 60 s"})
            continue
        finally:
            if proc.returncode is None:  # timed out or cancelled: never leave it running
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            log.append({"t": t, "error": err.decode(errors="replace")[-500:]})
            continue
        q = json.loads(out)
        q.update(t=t, client=at_client, rss=sampler.samples[-1][1:3] if sampler.samples else (None, None))
        log.append(q)


async def drive(a: argparse.Namespace, proxy: Mitmdump, up_port: int, progress: dict, sampler: Sampler):
    log: list = []
    q = asyncio.create_task(querier(proxy.sse_dir, a.query_every, progress, sampler, log))
    try:
        await asyncio.wait_for(
            client(proxy.port, up_port, a.chunks, a.rate, progress), a.max_seconds + 2 * IDLE_TIMEOUT
        )
    finally:
        q.cancel()
        try:
            await q
        except asyncio.CancelledError:
            pass
    return log


# ---- final check ----------------------------------------------------------------------------------------
def check_capture(path: Path, sent: tuple, fails: list[str]) -> dict:
    n, events, nbytes, sha, _ = sent
    con = open_capture(path)
    rows = con.execute(
        "SELECT stream_id, end_reason, n_chunks, n_events, n_bytes FROM streams WHERE path LIKE '/live/%'"
    ).fetchall()
    if len(rows) != 1:
        fails.append(f"capture: {len(rows)} stream rows, want 1")
        return {}
    sid, reason, n_chunks, n_events, n_bytes = rows[0]
    if reason != "complete" or n_events != events or n_bytes != nbytes:
        fails.append(f"capture: end_reason={reason} n_events={n_events} (sent {events}) n_bytes={n_bytes} "
                     f"(sent {nbytes})")  # fmt: skip
    cnt, dist, lo, hi = con.execute(
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM chunks WHERE stream_id = ?", [sid]
    ).fetchall()[0]
    if cnt != dist or lo != 0 or hi != cnt - 1 or cnt != n_chunks:
        fails.append(f"capture: {cnt} chunk rows, {dist} distinct seq, seq {lo}..{hi}, n_chunks {n_chunks}")
    ev, ev_dist = con.execute(
        "SELECT count(*), count(DISTINCT data) FROM events WHERE stream_id = ?", [sid]
    ).fetchall()[0]
    if ev != events or ev_dist != events:
        fails.append(f"capture: {ev} events ({ev_dist} distinct), sent {events}")
    h = hashlib.sha256()
    nulls = 0
    reader = con.sql(f"SELECT data FROM chunks WHERE stream_id = '{sid}' ORDER BY seq").to_arrow_reader(65536)
    for batch in reader:
        for data in batch.column(0).to_pylist():
            if data is None:
                nulls += 1
            else:
                h.update(data)
    if nulls:
        fails.append(f"capture: {nulls} chunks stored without data")
    if h.hexdigest() != sha:
        fails.append("capture: concatenated chunks.data differ from what the upstream sent")
    con.close()
    return {"rows": cnt, "events": ev, "identical": h.hexdigest() == sha}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=0.0, help="chunks/s (0: as fast as the proxy takes them)")
    ap.add_argument("--query-every", type=float, default=5.0, help="seconds between capture queries")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="give up after this long")
    ap.add_argument(
        "--quick", action="store_true", help="200,000 chunks at 20,000/s, a query every second (< 20 s)"
    )
    a = ap.parse_args()
    if a.quick:  # paced, so the stream stays open long enough for several queries (~10 s)
        a.chunks, a.query_every, a.rate = 200_000, 1.0, a.rate or 20_000
    print(f"load_longlived: 1 stream x {a.chunks:,} chunks (keep-alive comments and data events alternating), "
          f"{'as fast as the proxy takes them' if not a.rate else f'{a.rate:g} chunks/s'}")  # fmt: skip
    print(machine_line())
    fails: list[str] = []
    progress = {"blocks": 0, "bytes": 0}
    with upstream_process(upstream_main) as (parent, up_port):
        with tempfile.TemporaryDirectory(prefix="load-longlived-") as d:
            proxy = Mitmdump(Path(d), script="record")
            try:
                proxy.start()
                sampler = Sampler(
                    proxy.proc.pid, a.max_seconds + 4 * IDLE_TIMEOUT, extra=lambda: progress["blocks"]
                )
                try:
                    time.sleep(1.0)
                    idle = sampler.sample()
                    sampler.start()
                    log = asyncio.run(drive(a, proxy, up_port, progress, sampler))
                    time.sleep(1.5)  # the writer's last flush interval
                    end = sampler.sample()
                finally:
                    sampler.halt.set()
                    sampler.join(5)
                rc = proxy.stop()
            except BaseException:
                print(f"--- mitmdump log tail ---\n{proxy.log()[-3000:]}", file=sys.stderr)
                raise
            finally:
                proxy.stop()
            parent.send("dump")
            sent = parent.recv().get("live")
            if rc != 0:
                fails.append(f"mitmdump exited with {rc} after SIGTERM")
            if progress.get("error"):
                fails.append(f"client: {progress['error']}")
            if sent is None:
                fails.append("the upstream has no record of the stream")
                stored = {}
            else:
                if sent[4]:
                    fails.append(f"upstream: {sent[4]}")
                if (
                    progress["sha"] != sent[3]
                    or progress["bytes"] != sent[2]
                    or progress["blocks"] != sent[0]
                ):
                    fails.append(f"client got {progress['blocks']} blocks / {progress['bytes']} B, sent "
                                 f"{sent[0]} / {sent[2]} B, hash {'equal' if progress['sha'] == sent[3] else 'DIFFERENT'}")  # fmt: skip
                t = time.monotonic()
                stored = check_capture(proxy.sse_dir, sent, fails)
                stored["check_s"] = time.monotonic() - t

    t0 = progress.get("t_start", idle[0])
    dur = progress.get("t_end", end[0]) - t0
    print(f"\nstream: {progress['blocks']:,} chunks / {progress['bytes'] / 1e6:.1f} MB at the client in {dur:.1f} s "
          f"= {progress['blocks'] / max(dur, 1e-9):,.0f} chunks/s; byte-identical: "
          f"{'yes' if sent and progress.get('sha') == sent[3] else 'NO'}")  # fmt: skip
    print("\ntimeline (queries from another process while the stream is open):")
    print("      t   at client   stored chunks  stored events  end_reason   query ms   RSS MB proxy / writer"
          "   chunks files (largest MB)")  # fmt: skip
    for q in log:
        if "error" in q:
            print(f"  {q['t'] - t0:5.0f}s  query failed: {q['error']}")
            continue
        print(f"  {q['t'] - t0:5.0f}s  {q['client']:10,}  {q.get('chunks', 0):13,}  {q.get('events', 0):13,}  "
              f"{str(q.get('end_reason')):10} {q['ms']:9.0f}   {mb(q['rss'][0])} / {mb(q['rss'][1])}"
              f"   {q.get('files', 0)} ({q.get('largest', 0) / 1e6:.1f})")  # fmt: skip
    ok_q = [q for q in log if "error" not in q and q.get("stream")]
    grows = len(ok_q) >= 2 and all(x["chunks"] < y["chunks"] for x, y in zip(ok_q, ok_q[1:], strict=False))
    is_open = bool(ok_q) and all(q.get("end_reason") is None for q in ok_q)
    print(f"  queryable while open: {len(ok_q)} snapshots of the open stream, counts growing: "
          f"{'yes' if grows else 'no'}, end_reason NULL while open: {'yes' if is_open else 'no'}")  # fmt: skip
    if not grows or not is_open:
        fails.append("the open stream was not visible and growing in the snapshots")

    samples = sampler.samples
    warm = next((s for s in samples if s[0] >= t0 + 5), samples[0] if samples else idle)
    print("\nmemory (RSS, sampled every second from /proc):")
    for label, i in (("mitmdump", 1), ("writer  ", 2)):
        vals = [s[i] for s in samples if s[i] is not None]
        peak = max(vals, default=None)
        growth = (peak - idle[i]) / 1024 if peak is not None and idle[i] is not None else float("nan")
        drift = (end[i] - warm[i]) / 1024 if end[i] is not None and warm[i] is not None else float("nan")
        print(f"  {label} idle {mb(idle[i])}, 5 s in {mb(warm[i])}, peak {mb(peak)}, end {mb(end[i])} MB: "
              f"growth (peak - idle) {growth:+.1f} MB [{'under' if growth < 50 else 'OVER'} 50 MB], "
              f"end - 5 s in {drift:+.1f} MB")  # fmt: skip
    cpu_p = (end[3] or 0) - (idle[3] or 0)
    cpu_w = (end[4] or 0) - (idle[4] or 0)
    print(f"  CPU: mitmdump {cpu_p:.1f} s, writer {cpu_w:.1f} s over {dur:.1f} s")
    if samples:
        step = max(1, len(samples) // 12)
        print(
            f"  RSS every ~{step} s (proxy/writer MB): "
            + ", ".join(f"{s[0] - t0:.0f}s {mb(s[1])}/{mb(s[2])}" for s in samples[::step])
        )
    if stored:
        print(f"\ncapture after SIGTERM: {stored.get('rows', 0):,} chunk rows, {stored.get('events', 0):,} events, "
              f"stored bytes identical to sent: {'yes' if stored.get('identical') else 'NO'} "
              f"(checked in {stored['check_s']:.1f} s); mitmdump exit code {rc}")  # fmt: skip
    if fails:
        return print_failures(fails)
    print(
        "\nOK: byte-identical at the client and in the store, every chunk stored once, queryable while open"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
