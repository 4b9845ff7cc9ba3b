"""Shared test fixtures: no test may leave a mitmdump (or its writer process) running, even when it fails;
`run_demo` runs `mitm-sse demo` into a capture folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import proxy as proxy_mod


@pytest.fixture(autouse=True)
def _stop_leftover_proxies():
    yield
    for p in list(proxy_mod.RUNNING):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def _run_demo(
    cap: Path, *, requests: int, concurrency: int, speed: float, seed: int, env: dict | None = None
) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "mitm_sse.cli", "demo", "--dir", str(cap), "--requests", str(requests),
         "--concurrency", str(concurrency), "--speed", str(speed), "--seed", str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="session")
def run_demo():
    """`run_demo(cap, requests=, concurrency=, speed=, seed=, env=None)`: `mitm-sse demo --dir cap ...` in a
    subprocess, asserted to exit 0; returns the CompletedProcess (stdout, stderr as text)."""
    return _run_demo
