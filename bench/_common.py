"""Helpers shared by the load scripts: the upstream child process, raw SSE clients, /proc sampling, output.

Not a benchmark itself. The scripts put the repository root on sys.path and import this as `bench._common`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")

# The head an upstream sends before its chunked SSE body.
SSE_RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


# ---- upstream (its own process) ---------------------------------------------------------------------
async def serve_until_stopped(conn, handle: Callable, sent: dict, **server_kw: Any) -> None:
    """In the upstream child: listen on 127.0.0.1, send the port, then answer "dump" with `sent` until told
    to stop (or EOF, or the parent's terminate())."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0, **server_kw)
    conn.send(server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, _recv, conn)
        if cmd == "dump":
            conn.send(dict(sent))
        else:
            break
    server.close()


def _recv(conn):
    try:
        return conn.recv()
    except EOFError:
        return "stop"


@contextlib.contextmanager
def upstream_process(target: Callable, *args: Any) -> Iterator[tuple[Any, int]]:
    """Run `target(conn, *args)` in a spawned child; yields (conn, upstream port). Stopped on exit."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    up = ctx.Process(target=target, args=(child, *args), daemon=True)
    up.start()
    try:
        if not parent.poll(20):
            raise RuntimeError("the upstream process did not start")
        yield parent, parent.recv()
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        up.join(5)
        if up.is_alive():
            up.kill()
            up.join(5)


# ---- clients ------------------------------------------------------------------------------------------
async def open_sse(
    proxy_port: int, up_port: int, path: str, **conn_kw: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """GET http://127.0.0.1:<up_port><path> through the proxy (absolute form); checks for a 200 chunked head."""
    r, w = await asyncio.open_connection("127.0.0.1", proxy_port, **conn_kw)
    try:
        w.write(
            f"GET http://127.0.0.1:{up_port}{path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{up_port}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] or b"chunked" not in head.lower():
            raise RuntimeError(f"unexpected response head {head[:200]!r}")
    except BaseException:
        w.close()
        raise
    return r, w


async def read_chunk(r: asyncio.StreamReader) -> bytes | None:
    """The data of the next HTTP chunk; None after the last (zero-size) chunk."""
    size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
    if size == 0:
        await r.readuntil(b"\r\n")
        return None
    return (await r.readexactly(size + 2))[:-2]


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
    """Every second: (t, proxy RSS kB, writer RSS kB, proxy CPU s, writer CPU s[, extra()]). Stops by itself.

    `recording`: look for the recorder's writer child. `extra`: a value appended to every sample."""

    def __init__(
        self, proxy_pid: int, max_s: float, recording: bool = True, extra: Callable[[], Any] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.proxy_pid, self.recording, self.max_s, self.extra = proxy_pid, recording, max_s, extra
        self.wpid = writer_pid(proxy_pid) if recording else None
        self.samples: list[tuple] = []
        self.halt = threading.Event()

    def sample(self) -> tuple:
        if self.recording and self.wpid is None:
            self.wpid = writer_pid(self.proxy_pid)
        s = (time.monotonic(), proc_rss_kb(self.proxy_pid), proc_rss_kb(self.wpid),
             proc_cpu_s(self.proxy_pid), proc_cpu_s(self.wpid))  # fmt: skip
        if self.extra is not None:
            s += (self.extra(),)
        self.samples.append(s)
        return s

    def run(self) -> None:
        end = time.monotonic() + self.max_s
        while not self.halt.wait(1.0) and time.monotonic() < end:
            self.sample()


# ---- output -------------------------------------------------------------------------------------------
def mb(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def machine_line() -> str:
    return (
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  ({time.strftime('%Y-%m-%d %H:%M')})"
    )


def print_failures(fails: list[str]) -> int:
    """Print the problems (at most 40) and return the exit code: 1 if there are any, else 0."""
    if not fails:
        return 0
    print(f"\nFAIL: {len(fails)} problems")
    for f in fails[:40]:
        print("  " + f)
    return 1
