"""The writer in its own process, and the proxy-side client that feeds it.

Why a process and not only a thread: parsing, JSON decoding and Parquet encoding need the GIL. In the proxy's
process they compete with mitmproxy's event loop: measured here, an in-process writer cost 25-40 % of the
proxy's throughput at saturation, and one hostile chunk (100,000 events, a 10 MB line) would stall every flow
while it is parsed. In a child process the proxy only pays for a queue put per chunk (the tap) and, on a
shipper thread, for pickling batches into a pipe.

Protocol on the child's stdin: frames of <u32 little-endian length><pickle of a list of writer messages>.
The child answers on stdout: "ready\n" once started, "<token>\n" for each SYNC after flushing. On EOF without
a STOP (the proxy was killed), the child writes everything it got and marks open streams proxy_crashed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from .messages import CHUNK, END, OPEN, STOP, SYNC
from .store import CaptureDir

log = logging.getLogger("mitm_sse")

_HEADER = struct.Struct("<I")
MAX_BATCH = 4096  # messages per frame
CHILD_QUEUE_MAX = 50_000  # messages the child holds before it stops reading from the proxy
SHIP_INTERVAL = 0.005  # seconds the shipper waits for more messages before sending a partial batch


class WriterClient:
    """Proxy side of the writer: q.put, alive, sync, stop, and the tap's backlog counters."""

    def __init__(self, capture: CaptureDir, instance: str, flush_interval: float = 0.5) -> None:
        self.capture = capture
        self.instance = instance
        self.flush_interval = flush_interval
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.enqueued_bytes = 0  # chunk bytes put on q (written by the event loop only)
        self.dequeued_bytes = 0  # pickled bytes shipped to the child (written by the shipper only)
        self.alive = False
        self.proc: subprocess.Popen | None = None
        self._shipper: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._syncs: dict[str, threading.Event] = {}
        self._ready = threading.Event()
        self._tokens = itertools.count()
        self._stopping = False

    def start(self, timeout: float = 20.0) -> None:
        self.capture.ensure(files=False)  # the child creates the Parquet files: the proxy never loads pyarrow
        cmd = [sys.executable, "-m", "mitm_sse.writer_proc", str(self.capture.path), self.instance,
               str(self.flush_interval)]  # fmt: skip
        env = dict(os.environ)
        # The child must import this very package, also when mitmdump loaded it from a checkout.
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # Arrow's default mimalloc pool keeps freed batches: measured +59 MB on a saturated feed, against +30 MB
        # with the system allocator at the same throughput (bench/load_longlived.py). A user's choice wins.
        env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env, close_fds=True,
            start_new_session=True,  # Ctrl-C in the terminal goes to the proxy, which then stops us in order
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_child, name="mitm-sse-writer-reader", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self._kill()
            raise OSError(f"the writer process did not start within {timeout:.0f} s")
        self.alive = True
        self._shipper = threading.Thread(target=self._ship, name="mitm-sse-shipper", daemon=True)
        self._shipper.start()

    # ---- proxy -> child -----------------------------------------------------------------------------
    def _ship(self) -> None:
        get, get_nowait = self.q.get, self.q.get_nowait
        assert self.proc is not None and self.proc.stdin is not None
        out = self.proc.stdin
        stop_msg = (STOP,)
        while True:
            try:
                first = get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            # Let a batch build up while this thread sleeps (and holds no GIL): one pickle and one pipe
            # write per SHIP_INTERVAL instead of per chunk. Cheap per message: no Python-level inspection.
            if first != stop_msg:
                time.sleep(SHIP_INTERVAL)
            batch = [first]
            append = batch.append
            try:
                while len(batch) < MAX_BATCH:
                    append(get_nowait())
            except queue.Empty:
                pass
            stop = stop_msg in batch
            try:
                payload = pickle.dumps(batch, protocol=5)
                out.write(_HEADER.pack(len(payload)))
                out.write(payload)
                out.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._died("the writer process is gone")
                return
            except Exception:
                log.exception("mitm-sse: could not ship %d messages to the writer; they are lost", len(batch))
            # Counts framing too, so the backlog (enqueued - shipped) errs low: the cap is a safety net.
            self.dequeued_bytes += len(payload)
            if stop:
                break
        with contextlib.suppress(OSError, ValueError):
            out.close()

    def _died(self, why: str) -> None:
        if self.alive and not self._stopping:
            log.error("mitm-sse: %s: streams now pass through UNRECORDED (traffic is not affected)", why)
        self.alive = False

    # ---- child -> proxy -----------------------------------------------------------------------------
    def _read_child(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line == "ready":
                self._ready.set()
            elif line in self._syncs:
                self._syncs.pop(line).set()
        rc = self.proc.wait()
        if rc != 0 or not self._stopping:
            self._died(f"the writer process exited (code {rc})")
        for ev in list(self._syncs.values()):
            ev.set()

    # ---- lifecycle ----------------------------------------------------------------------------------
    def sync(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written to Parquet."""
        if not self.alive:
            return False
        token = f"sync-{next(self._tokens)}"
        ev = threading.Event()
        self._syncs[token] = ev
        self.q.put((SYNC, token))
        return ev.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        self._stopping = True
        self.q.put((STOP,))
        if self._shipper is not None:
            self._shipper.join(timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("mitm-sse: the writer process did not finish within %.0f s; killing it", timeout)
            self._kill()
        self.alive = False
        self.proc = None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


class _SyncReply:
    """Stands in for the threading.Event a SYNC carries in-process: answers the proxy on stdout."""

    __slots__ = ("token", "out", "lock")

    def __init__(self, token: str, out: Any, lock: threading.Lock) -> None:
        self.token, self.out, self.lock = token, out, lock

    def set(self) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.out.write(f"{self.token}\n".encode())
            self.out.flush()


def child_main(argv: list[str]) -> int:
    from .writer import Writer

    path, instance = argv[0], argv[1]
    flush = float(argv[2]) if len(argv) > 2 else 0.5
    # The proxy is latency-critical, the writer is not (it buffers): when CPU is short, the proxy goes first.
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(level=logging.INFO, format="[mitm-sse writer] %(levelname)s %(message)s")
    out = sys.stdout.buffer
    out_lock = threading.Lock()
    w = Writer(CaptureDir(path), instance, flush_interval=flush)
    w.start()
    with out_lock:
        out.write(b"ready\n")
        out.flush()
    inp = sys.stdin.buffer
    put = w.q.put
    clean = False
    try:
        while True:
            head = inp.read(4)
            if len(head) < 4:
                break
            (n,) = _HEADER.unpack(head)
            payload = inp.read(n)
            if len(payload) < n:
                break
            # Back-pressure: never hold more than a bounded backlog here. While the writer catches up we stop
            # reading, the pipe fills, and the proxy's shipper waits; beyond its own cap the proxy's tap stores
            # only chunk sizes. So a slow disk can never make either process grow without bound.
            while w.q.qsize() > CHILD_QUEUE_MAX and w.alive:
                time.sleep(0.005)
            for m in pickle.loads(payload):
                kind = m[0]
                if kind == SYNC:
                    put((SYNC, _SyncReply(m[1], out, out_lock)))
                elif kind == STOP:
                    clean = True
                else:
                    put(m)
            if clean:
                break
    except Exception:
        log.exception("reading from the proxy failed")
    if not clean:
        # The proxy went away without saying goodbye (killed): keep everything it sent.
        w.crash_reason = ("proxy_crashed", "the proxy process ended without closing this stream")
    w.stop(timeout=120)
    return 0


__all__ = ["WriterClient", "child_main", "OPEN", "CHUNK", "END"]

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
