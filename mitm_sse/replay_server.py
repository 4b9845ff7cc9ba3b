"""The in-process replay server: plays recorded chunks on an absolute schedule over HTTP/1.1.

mitmproxy has no API for an addon to stream a response it makes itself, so the Mock addon rewrites a
matched flow to this server (127.0.0.1, ephemeral port, started on mitmproxy's own event loop) with a
one-time token naming the job. mitmproxy then treats us as an ordinary upstream and, with
`flow.response.stream = True`, forwards each chunk the moment it arrives, to HTTP/1.1 and HTTP/2 clients.

Timing: chunk i is written at t0 + (t_i - t_request)/speed, where t0 is when the proxy had the client's
request. Every deadline is computed from t0, never from the previous write, so sleeps that overshoot do
not accumulate drift. speed 0 writes everything at once.

A client that leaves makes mitmproxy close our connection: a watcher on the read side sees the EOF and
cancels the replay task immediately, even in the middle of a long recorded gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .matching import REDACTED, Recording

log = logging.getLogger("mitm_sse")

TOKEN_HEADER = "x-mitm-sse-replay"
MOCK_HEADER = "x-mitm-sse-mock"  # added to mocked responses: the stream_id that was replayed
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",  # recomputed: the framing is ours
        "alt-svc",  # would send the client to the real host over HTTP/3, around the mock
    }
)
JOB_TTL_S = 120.0  # a job whose connection never arrives (client left first) is forgotten after this
MAX_HEAD = 256 * 1024

Chunks = list[tuple[int, bytes | None]]  # (t_ns, data)


@dataclass
class Job:
    recording: Recording
    t0: float  # time.monotonic() when the proxy had the client's request
    speed: float  # 0 = instant
    loop_s: float | None = None  # None: play once; else loop for this many seconds (math.inf: forever)
    head_only: bool = False
    created: float = field(default_factory=time.monotonic)


def response_head(rec: Recording, framing: str, length: int = 0) -> bytes:
    """Status line and headers: recorded ones minus hop-by-hop and length, plus our own framing."""
    try:
        reason = http.HTTPStatus(rec.status).phrase
    except ValueError:
        reason = "Unknown"
    lines = [f"HTTP/1.1 {rec.status} {reason}"]
    for name, value in rec.response_headers:
        if name.lower() in HOP_BY_HOP or value == REDACTED:
            continue
        lines.append(f"{name}: {value}")
    lines.append(f"{MOCK_HEADER}: {rec.stream_id}")
    if framing == "chunked":
        lines.append("transfer-encoding: chunked")
    elif framing == "length":
        lines.append(f"content-length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class ReplayServer:
    def __init__(self, load_chunks: Callable[[Recording], Awaitable[Chunks]]) -> None:
        self.load_chunks = load_chunks
        self.jobs: dict[str, Job] = {}
        self.port = 0
        self.active = 0  # replays being played right now
        self.started = 0
        self.finished = 0
        self.cancelled = 0  # replays stopped because the client left
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)
        self._server = None

    def register(self, job: Job) -> str:
        now = time.monotonic()
        for tok in [t for t, j in self.jobs.items() if now - j.created > JOB_TTL_S]:
            del self.jobs[tok]
        token = os.urandom(12).hex()
        self.jobs[token] = job
        return token

    def stats(self) -> dict[str, int]:
        return {
            "active_replays": self.active,
            "started": self.started,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "pending_jobs": len(self.jobs),
            "connections": len(self._conns),
        }

    # ---- connections --------------------------------------------------------------------------------
    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # each chunk leaves as its own segment, now
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:  # keep-alive: mitmproxy reuses this connection for later flows of the client
                req = await _read_request(reader)
                if req is None:
                    return
                token, method = req
                job = self.jobs.pop(token, None) if token else None
                if job is None:
                    body = b"mitm-sse: unknown or expired replay token\n"
                    writer.write(
                        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                    continue
                job.head_only = job.head_only or method == "HEAD"
                if not await self._serve(job, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _serve(self, job: Job, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Play one job; returns whether the connection can carry another request."""
        self.active += 1
        self.started += 1
        play = asyncio.ensure_future(self._play(job, writer))
        # mitmproxy sends nothing more on this connection until the response is over (no pipelining),
        # so any read completing now is the EOF of a client that left.
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((play, watch), return_when=asyncio.FIRST_COMPLETED)
            if not play.done():
                self.cancelled += 1
                play.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await play
                return False
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            if watch.done() and not watch.cancelled() and watch.exception() is None and watch.result():
                return False  # unexpected bytes mid-response: do not try to resync
            try:
                return play.result()
            except (ConnectionError, OSError):
                self.cancelled += 1
                return False
        except asyncio.CancelledError:
            play.cancel()
            watch.cancel()
            raise
        finally:
            self.active -= 1
            self.finished += 1

    async def _play(self, job: Job, writer: asyncio.StreamWriter) -> bool:
        rec = job.recording
        loop = asyncio.get_running_loop()
        # loop.time() is time.monotonic() for asyncio's default loops; convert once to be safe.
        t0 = job.t0 + (loop.time() - time.monotonic())
        speed = job.speed
        t_req = rec.t_request_ns or rec.t_headers_ns

        def due(t_ns: int) -> float:
            return t0 if speed <= 0 else t0 + max(0, t_ns - t_req) / 1e9 / speed

        async def until(deadline: float) -> None:
            d = deadline - loop.time()
            if d > 0:
                await asyncio.sleep(d)

        chunks = await self.load_chunks(rec)
        no_body = job.head_only or rec.status in (204, 304) or 100 <= rec.status < 200
        if no_body:
            await until(due(rec.t_headers_ns))
            writer.write(response_head(rec, "none"))
            await writer.drain()
            return not rec.faulted
        # A complete, whole recorded body gets a content-length (what the recorded server most likely
        # sent); streams, faults and loops are chunked so the cut / endless body is expressible.
        whole = rec.kind == "body" and not rec.faulted
        if whole:
            body = b"".join(d for _, d in chunks if d)
            await until(due(rec.t_headers_ns))
            writer.write(response_head(rec, "length", len(body)))
            await until(due(chunks[-1][0]) if chunks else 0)
            writer.write(body)
            await writer.drain()
            return True
        await until(due(rec.t_headers_ns))
        writer.write(response_head(rec, "chunked"))
        await writer.drain()
        if job.loop_s is None or not chunks:
            await self._write_chunks(writer, chunks, due, until, 0.0, math.inf)
            if rec.faulted:
                # Replay the fault: cut after the last recorded chunk, at the recorded end time.
                if rec.t_end_ns:
                    await until(due(rec.t_end_ns))
                reset_connection(writer)
                return False
        else:
            # Loop: the gap from the last chunk to the next round's first is the recorded headers→first
            # chunk gap; rounds are laid on the same absolute clock.
            span = (chunks[-1][0] - rec.t_headers_ns) + max(0, chunks[0][0] - rec.t_headers_ns)
            period = span / 1e9 / speed if speed > 0 else 0.0
            stop_at = due(rec.t_headers_ns) + job.loop_s
            n = 0
            while loop.time() < stop_at:
                if not await self._write_chunks(writer, chunks, due, until, n * period, stop_at):
                    break
                n += 1
                if period == 0:
                    await asyncio.sleep(0)  # instant loop: let everything else run between rounds
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _write_chunks(writer, chunks: Chunks, due, until, shift: float, stop_at: float) -> bool:
        for t_ns, data in chunks:
            deadline = due(t_ns) + shift
            if deadline > stop_at:
                return False
            await until(deadline)
            if not data:
                continue  # dropped at record time (only its size is known) or empty
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        return True


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST: the proxy sees a broken body, as it did when recording."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str | None, str] | None:
    """Read one request from mitmproxy; returns (token, method), or None on a clean close."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    token = None
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == TOKEN_HEADER:
            token = value.strip()
        elif name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    # The body was already matched in the request hook: read it off the wire and drop it.
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
    elif length:
        await reader.readexactly(length)
    return token, method
