"""Finding this environment's `mitmdump`, and running it on a free 127.0.0.1 port until it listens.

Used by `mitm-sse demo` (a recording proxy), `mitm-sse doctor` (the loopback test) and the CLI's `record` /
`mock` commands (the executable only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def sibling_mitmdump() -> Path:
    """Where this interpreter's environment installs mitmdump (it may not exist)."""
    return Path(sys.executable).parent / ("mitmdump.exe" if os.name == "nt" else "mitmdump")


def find_mitmdump() -> str | None:
    """mitmdump of this environment (next to the interpreter), else the one on PATH, else None."""
    sibling = sibling_mitmdump()
    if sibling.is_file():
        return str(sibling)
    return shutil.which("mitmdump")


def mitmdump_command() -> list[str]:
    """How to start the mitmdump of this Python environment (the one that can import mitm_sse)."""
    exe = sibling_mitmdump()
    if exe.is_file():
        return [str(exe)]
    return [
        sys.executable,
        "-c",
        "import sys; from mitmproxy.tools.main import mitmdump; sys.exit(mitmdump())",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MitmdumpProcess:
    """A mitmdump subprocess on a free 127.0.0.1 port with its own confdir and its output in a log file;
    stopped (SIGTERM, then SIGKILL) by stop() or on leaving the `with` block.

    `args` come after the listen address and confdir (scripts, `--set` options...). Subclasses may change the
    class attributes and `executable()`.
    """

    error: type[Exception] = RuntimeError  # raised when it does not start
    start_timeout = 20.0
    start_attempts = 2  # another try if the free port was taken between our probe and mitmdump's bind
    stop_timeout = 5.0

    def __init__(self, confdir: Path, args: list[str] | None = None, log_path: Path | None = None) -> None:
        self.confdir = confdir
        self.args = args or []
        self.log_path = log_path or confdir / "mitmdump.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def executable(self) -> list[str]:
        return mitmdump_command()

    def command(self) -> list[str]:
        return [
            *self.executable(),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
            "--set",
            "termlog_verbosity=warn",
            "--flow-detail",
            "0",
            *self.args,
        ]

    def start(self, timeout: float | None = None) -> int:
        """Start it and wait until it accepts connections; returns the port."""
        timeout = self.start_timeout if timeout is None else timeout
        for _attempt in range(self.start_attempts):
            self.port = free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
                ):
                    return self.port
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise self.error(f"mitmdump did not listen within {timeout:.0f} s: {self._tail()}")
            if "address already in use" not in self.log_tail().lower():
                break
        raise self.error(f"mitmdump exited with code {self.proc.returncode}: {self._tail()}")

    def log_tail(self, n: int = 4) -> str:
        """The last n lines of its output, joined with " | "; "" if there are none."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def _tail(self) -> str:
        return self.log_tail(5) or "(no output)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> MitmdumpProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
