"""`mitm-sse demo`: the whole pipeline on one machine, with no network and no API key.

A fake LLM server (mitm_sse.fakellm, OpenAI and Anthropic formats) and a real `mitmdump -s record.py`
subprocess listen on free 127.0.0.1 ports; concurrent streaming requests go through the proxy with httpx,
exactly as an app using HTTPS_PROXY would; then the capture is read back and summarised. Everything started
here is stopped here, and the proxy gets its own temporary confdir so the user's ~/.mitmproxy is untouched.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .mitmdump_proc import MitmdumpProcess

PROXY_START_TIMEOUT = 30.0
FLUSH_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0

# (wire format, model): two fake models per provider with different speeds, so the stats table has contrast.
PLAN = (
    ("openai", "fake-gpt-fast"),
    ("anthropic", "fake-claude"),
    ("openai", "fake-gpt"),
    ("anthropic", "fake-claude-fast"),
)
PROMPTS = (
    "Explain server-sent events in two sentences.",
    "Write a haiku about latency.",
    "What is the weather in Paris?",  # sent with a tool: the answer is a streamed tool call
    "Summarise why time to first token matters.",
)
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class DemoError(Exception):
    """Something the demo needs did not start; the message says what."""


@dataclass
class DemoResult:
    dir: Path
    sent: int = 0
    ok: int = 0
    failed: int = 0
    captured: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def default_demo_dir() -> Path:
    from .store import default_dir

    return default_dir() / f"demo-{dt.datetime.now():%Y%m%d-%H%M%S}"


class RecordingProxy(MitmdumpProcess):
    """`mitmdump -s record.py` on a free loopback port with its own confdir; stop() flushes the capture
    (SIGTERM: the recorder's `done` hook ends open streams and writes the last segment)."""

    error = DemoError
    start_timeout = PROXY_START_TIMEOUT
    start_attempts = 3
    stop_timeout = 15.0

    def __init__(self, capture: Path, session: str = "demo") -> None:
        self.capture = capture
        self.session = session
        confdir = Path(tempfile.mkdtemp(prefix="mitm-sse-demo-conf-"))
        record = Path(__file__).resolve().parent / "record.py"
        args = ["-s", str(record), "--set", f"sse_dir={capture}", "--set", f"sse_session={session}"]
        super().__init__(confdir, args, confdir / "mitmdump.log")

    def executable(self) -> list[str]:
        from .cli import mitmdump_path

        return [mitmdump_path()]

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.confdir, ignore_errors=True)


def build_request(i: int, base_url: str) -> tuple[str, dict[str, str], dict[str, Any], str]:
    """(url, headers, json body, model) of the i-th demo request."""
    fmt, model = PLAN[i % len(PLAN)]
    prompt = PROMPTS[(i + i // len(PLAN)) % len(PROMPTS)]  # every model meets every prompt
    with_tool = prompt is PROMPTS[2]
    max_tokens = 48
    if fmt == "openai":
        body: dict[str, Any] = {
            "model": model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        if with_tool:
            body["tools"] = [{"type": "function", "function": WEATHER_TOOL}]
        # The key is fake; it is here to show that credentials are redacted before they reach disk.
        headers = {"authorization": "Bearer sk-demo-not-a-real-key"}
        return f"{base_url}/v1/chat/completions", headers, body, model
    body = {
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    if with_tool:
        body["tools"] = [
            {
                "name": WEATHER_TOOL["name"],
                "description": WEATHER_TOOL["description"],
                "input_schema": WEATHER_TOOL["parameters"],
            }
        ]
    headers = {"x-api-key": "sk-ant-demo-not-a-real-key", "anthropic-version": "2023-06-01"}
    return f"{base_url}/v1/messages", headers, body, model


def _stream_one(client: Any, i: int, base_url: str, tick: Any) -> tuple[bool, str]:
    url, headers, body, model = build_request(i, base_url)
    with client.stream("POST", url, json=body, headers=headers) as r:
        n = 0
        for chunk in r.iter_raw():
            n += len(chunk)
            tick(0)
        if r.status_code != 200:
            return False, f"{model}: HTTP {r.status_code}"
    return True, model


def _count_complete(capture: Path) -> int:
    from .capture import open_capture

    try:
        con = open_capture(capture)
        return con.execute("SELECT count(*) FROM streams WHERE end_reason IS NOT NULL").fetchone()[0]
    except Exception:  # folder not created yet, or a segment being renamed: just poll again
        return 0


def run_demo(
    dir_: Path | None = None,
    n_requests: int = 24,
    concurrency: int = 6,
    speed: float = 1.0,
    seed: int | None = None,
    console: Any = None,
    show_stats: bool = True,
) -> DemoResult:
    """Run the demo and print its report; returns what happened (the CLI exits non-zero if nothing was kept)."""
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cli import _console
    from .fakellm import FakeLLMServer

    console = console or _console()
    capture = Path(dir_).expanduser().absolute() if dir_ else default_demo_dir()
    capture.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = DemoResult(capture)
    t_start = time.monotonic()
    server = FakeLLMServer(speed=speed, seed=seed if seed is not None else int(time.time()))
    proxy = RecordingProxy(capture)
    try:
        try:
            server.start()
        except (OSError, RuntimeError) as e:
            raise DemoError(f"the fake LLM server did not start: {e}") from None
        base = server.url
        with console.status("starting the recording proxy (mitmdump)…"):
            proxy.start()
        console.print(
            f"fake LLM on {base}, recording proxy on http://127.0.0.1:{proxy.port}, capture in {capture}",
            soft_wrap=True,
        )
        lock = threading.Lock()
        with (
            httpx.Client(
                proxy=f"http://127.0.0.1:{proxy.port}",
                trust_env=False,  # a user's HTTP(S)_PROXY must not divert the demo
                timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10.0),
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            ) as client,
            Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[chunks]} chunks"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            ) as progress,
        ):
            task = progress.add_task("streaming", total=n_requests, chunks=0)
            counter = itertools.count(1)

            def tick(_: int) -> None:
                n = next(counter)
                if n % 10 == 0:
                    with lock:
                        progress.update(task, chunks=n)

            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="demo-client") as pool:
                futures = [pool.submit(_stream_one, client, i, base, tick) for i in range(n_requests)]
                for fut in as_completed(futures):
                    result.sent += 1
                    try:
                        ok, what = fut.result()
                    except httpx.HTTPError as e:
                        ok, what = False, f"{type(e).__name__}: {e}"
                    if ok:
                        result.ok += 1
                    else:
                        result.failed += 1
                        result.errors.append(what)
                    progress.update(task, advance=1)
        # The writer flushes every 0.5 s; wait until every stream's final row is on disk, then stop the proxy
        # (SIGTERM makes it flush whatever is left, so nothing is lost either way).
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while time.monotonic() < deadline and _count_complete(capture) < result.ok:
            time.sleep(0.2)
        proxy.stop()
        result.captured = _count_complete(capture)
    finally:
        proxy.cleanup()
        server.stop()
    result.seconds = time.monotonic() - t_start
    _report(console, result, show_stats)
    return result


def _report(console: Any, result: DemoResult, show_stats: bool) -> None:
    from .capture import open_capture
    from .cli import render_stats, stats_rows

    for e in result.errors[:5]:
        console.print(f"[red]request failed:[/red] {e}")
    console.print(
        f"{result.ok}/{result.sent} streams completed, {result.captured} recorded in {result.seconds:.1f} s"
    )
    if result.captured == 0:
        return
    if show_stats:
        con = open_capture(result.dir)
        cols, rows = stats_rows(con, ["model"])
        render_stats(console, ["model"], cols, rows, title="latency by model")
    d = str(result.dir)
    q = d if " " not in d else f'"{d}"'
    console.print(f"\n[bold]capture:[/bold] {d}")
    console.print("next:")
    for cmd in (
        f"mitm-sse ls --dir {q}",
        f"mitm-sse show --dir {q} <ID>           # events, text, timeline of one stream",
        f"mitm-sse stats --dir {q} --by model --pooled-itl",
        f'mitm-sse sql --dir {q} "SELECT model, median(ttft_ms) FROM stream_latency GROUP BY ALL"',
        f"duckdb {Path(q) / 'capture.duckdb'}",
        f"MITM_SSE_DIR={q} jupyter lab notebooks/latency.ipynb",
    ):
        console.print(f"  {cmd}", markup=False, soft_wrap=True)


if __name__ == "__main__":  # python -m mitm_sse.demo
    sys.exit(0 if run_demo(n_requests=8, concurrency=4, speed=4).captured else 1)
