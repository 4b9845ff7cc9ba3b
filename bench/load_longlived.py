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
`--quick`: 200,000 chunks, queried every second (under 20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_sse import open_capture  # noqa: E402
from tests.proxy import Mitmdump  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT = 30.0  # no progress for this long fails the stream
KEEPALIVE = b": keep-alive\n\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
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

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while True:  # commands from the parent; ends on "stop", EOF, or the parent's terminate()
            cmd = await loop.run_in_executor(None, _recv, conn)
            if cmd == "dump":
                conn.send(dict(sent))
            else:
                break
        server.close()

    asyncio.run(main())


def _recv(conn):
    try:
        return conn.recv()
    except EOFError:
        return "stop"


# ---- /proc sampling -------------------------------------------------------------------------------------
def proc_rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def writer_pid(proxy_pid: int) -> int | None:
    """The recorder's writer child of *this* mitmdump (other people's proxies may run on the machine)."""
    try:
        out = subprocess.run(
            ["pgrep", "-P", str(proxy_pid), "-f", "mitm_sse.writer_proc"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(out[0]) if out else None


class Sampler(threading.Thread):
    """Every second: (t, proxy RSS kB, writer RSS kB, proxy CPU s, writer CPU s, client chunks)."""

    def __init__(self, proxy_pid: int, progress: dict, max_s: float) -> None:
        super().__init__(daemon=True)
        self.proxy_pid, self.progress, self.max_s = proxy_pid, progress, max_s
        self.wpid = writer_pid(proxy_pid)
        self.samples: list[tuple] = []
        self.halt = threading.Event()

    def sample(self) -> tuple:
        if self.wpid is None:
            self.wpid = writer_pid(self.proxy_pid)
        s = (time.monotonic(), proc_rss_kb(self.proxy_pid), proc_rss_kb(self.wpid),
             proc_cpu_s(self.proxy_pid), proc_cpu_s(self.wpid), self.progress["blocks"])  # fmt: skip
        self.samples.append(s)
        return s

    def run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self.halt.wait(1.0) and time.monotonic() < end:
            self.sample()


def mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


# ---- client and queries (this process) -------------------------------------------------------------------
async def client(proxy_port: int, up_port: int, n: int, rate: float, progress: dict) -> dict:
    h = hashlib.sha256()
    w = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(IDLE_TIMEOUT) as cm:
            r, w = await asyncio.open_connection("127.0.0.1", proxy_port, limit=1 << 20)
            w.write(
                f"GET http://127.0.0.1:{up_port}/live/{n}/{rate} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{up_port}\r\nAccept: text/event-stream\r\n\r\n".encode()
            )
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0] or b"chunked" not in head.lower():
                raise RuntimeError(f"unexpected response head {head[:200]!r}")
            progress["t_start"] = time.monotonic()
            last = b""
            for _ in range(4 * n + 16):  # bounded: at most a few HTTP chunks per sent chunk
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                data = (await r.readexactly(size + 2))[:-2]
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
    ap.add_argument("--quick", action="store_true", help="200,000 chunks, a query every second (< 20 s)")
    a = ap.parse_args()
    if a.quick:
        a.chunks, a.query_every = 200_000, 1.0
    print(f"load_longlived: 1 stream x {a.chunks:,} chunks (keep-alive comments and data events alternating), "
          f"{'as fast as the proxy takes them' if not a.rate else f'{a.rate:g} chunks/s'}")  # fmt: skip
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({time.strftime('%Y-%m-%d %H:%M')})")  # fmt: skip
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    up = ctx.Process(target=upstream_main, args=(child,), daemon=True)
    up.start()
    fails: list[str] = []
    progress = {"blocks": 0, "bytes": 0}
    try:
        if not parent.poll(20):
            raise RuntimeError("the upstream process did not start")
        up_port = parent.recv()
        with tempfile.TemporaryDirectory(prefix="load-longlived-") as d:
            proxy = Mitmdump(Path(d), script="record")
            try:
                proxy.start()
                sampler = Sampler(proxy.proc.pid, progress, a.max_seconds + 4 * IDLE_TIMEOUT)
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
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        up.join(5)
        if up.is_alive():
            up.kill()
            up.join(5)

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
        print(f"\nFAIL: {len(fails)} problems")
        for f in fails[:40]:
            print("  " + f)
        return 1
    print(
        "\nOK: byte-identical at the client and in the store, every chunk stored once, queryable while open"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
