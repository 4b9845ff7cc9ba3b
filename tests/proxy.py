"""A real `mitmdump` subprocess for tests: loopback only, its own confdir (CA) and capture folder.

with Mitmdump(tmp_path, script="record") as proxy:
    httpx.get(url, proxy=proxy.url, verify=proxy.ca)
    con = proxy.capture()    # open_capture() after the recorder flushed
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import duckdb

import mitm_sse
from mitm_sse.capture import open_capture
from mitm_sse.mitmdump_proc import find_mitmdump, free_port

PKG = Path(mitm_sse.__file__).resolve().parent
RUNNING: set[Mitmdump] = set()  # stopped by the autouse fixture in conftest.py if a test forgot


def mitmdump_bin() -> str:
    found = find_mitmdump()
    if not found:
        raise RuntimeError("mitmdump not found next to the interpreter or on PATH")
    return found


class Mitmdump:
    def __init__(
        self,
        tmp: Path,
        script: str | None = "record",
        options: dict[str, str] | None = None,
        args: list[str] | None = None,
        sse_dir: Path | None = None,
        confdir: Path | None = None,
    ) -> None:
        self.tmp = Path(tmp)
        self.confdir = confdir or self.tmp / "confdir"
        self.sse_dir = sse_dir or self.tmp / "capture"
        self.script = script
        self.options = {"ssl_insecure": "true", "connection_strategy": "lazy", **(options or {})}
        self.args = args or []
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmp / f"mitmdump-{id(self)}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def command(self) -> list[str]:
        cmd = [mitmdump_bin(), "--listen-host", "127.0.0.1", "--listen-port", str(self.port)]
        cmd += ["--set", f"confdir={self.confdir}"]
        if self.script:
            cmd += ["-s", str(PKG / f"{self.script}.py"), "--set", f"sse_dir={self.sse_dir}"]
        for k, v in self.options.items():
            cmd += ["--set", f"{k}={v}"]
        return cmd + self.args

    def start(self, timeout: float = 20.0) -> Mitmdump:
        self.confdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        RUNNING.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        RUNNING.discard(self)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- reading the capture ------------------------------------------------------------------------
    def capture(self) -> duckdb.DuckDBPyConnection:
        return open_capture(self.sse_dir)

    def wait_for(self, sql: str, predicate=bool, timeout: float = 10.0):
        """Poll a query on a fresh snapshot until predicate(result rows) holds; returns the rows."""
        deadline = time.monotonic() + timeout
        rows = None
        while time.monotonic() < deadline:
            try:
                con = open_capture(self.sse_dir)
                rows = con.execute(sql).fetchall()
                con.close()
                if predicate(rows):
                    return rows
            except (duckdb.Error, FileNotFoundError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {sql!r}; last rows: {rows!r}\nproxy log:\n{self.log()}")
