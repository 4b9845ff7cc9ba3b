"""Helpers to run real client applications against a test proxy, configured only by environment.

The client apps (the `openai` / `anthropic` SDK scripts here, curl, Chromium) are separate programs: the SDKs live
in their own venv (scripts/install-clients.sh; they need h11/httpx versions mitmproxy 11 does not allow) and
every client gets a minimal environment with just the proxy and the CA set, as a real app would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_HINT = "run scripts/install-clients.sh"


def clients_venv() -> Path:
    return Path(os.environ.get("MITM_SSE_CLIENTS_VENV") or Path.home() / ".cache/mitm-sse/venv-clients")


def sdk_python() -> tuple[str | None, str]:
    """(python of the client venv, or None, and the reason it is missing)."""
    py = clients_venv() / "bin" / "python"
    if not py.exists():
        return None, f"no client venv at {clients_venv()} ({INSTALL_HINT})"
    r = subprocess.run([str(py), "-c", "import openai, anthropic"], capture_output=True, timeout=60)
    if r.returncode != 0:
        return None, f"openai/anthropic not importable in {clients_venv()} ({INSTALL_HINT})"
    return str(py), ""


def which(name: str) -> str | None:
    return shutil.which(name)


def route_args(routes: dict[str, int]) -> list[str]:
    """mitmproxy map_remote options sending https://HOST to http://127.0.0.1:PORT (needs lazy connections)."""
    args: list[str] = []
    for host, port in routes.items():
        pattern = "https://" + host.replace(".", r"\.")
        args += ["--map-remote", f"|{pattern}|http://127.0.0.1:{port}"]  # no trailing "|"
    return args


def client_env(proxy_url: str, ca: str, home: Path, **extra: str) -> dict[str, str]:
    """A fresh environment: PATH, HOME, the proxy and the CA, and nothing else from the test process."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "HTTP_PROXY": proxy_url,
        "http_proxy": proxy_url,
        "NO_PROXY": "",
        "no_proxy": "",
        "SSL_CERT_FILE": ca,
        "CURL_CA_BUNDLE": ca,
    }
    env.update(extra)
    return env
