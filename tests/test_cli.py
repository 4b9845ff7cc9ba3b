"""The mitm-sse CLI through click's CliRunner, and as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from mitm_sse.capture import open_capture
from mitm_sse.cli import check_read_only, main
from tests.test_metrics import write_known_capture

A, B, C = "a" * 24, "b" * 24, "c" * 24


@pytest.fixture(scope="module")
def cap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "capture"
    write_known_capture(path)
    return path


def run(*args: str, ok: bool = True):
    res = CliRunner().invoke(main, list(args))
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res


def one_line_error(res, code: int = 1) -> str:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
    err = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(err) == 1, res.output
    return err[0]


# ---- ls -----------------------------------------------------------------------------------------------
def test_ls_table_json_csv(cap: Path) -> None:
    out = run("ls", "--dir", str(cap)).output
    for sid in (A, B, C):
        assert sid in out
    assert "/v1/chat/completions" in out and "300 ms" in out and "client left" in out
    rows = json.loads(run("ls", "--dir", str(cap), "--json").output)
    assert [r["stream_id"] for r in rows] == [C, B, A]  # newest first
    assert rows[2]["ttft_ms"] == pytest.approx(300.0)
    lines = run("ls", "--dir", str(cap), "--csv").output.splitlines()
    assert lines[0].startswith("stream_id,t_request_ns,session") and len(lines) == 4
    assert [
        r["stream_id"] for r in json.loads(run("ls", "--dir", str(cap), "--session", "s2", "--json").output)
    ] == [C, B]
    assert len(json.loads(run("ls", "--dir", str(cap), "-n", "1", "--json").output)) == 1
    assert (
        json.loads(run("ls", "--dir", str(cap), "--host", "feed.example", "--json").output)[0]["stream_id"]
        == C
    )


def test_dir_from_environment(cap: Path) -> None:
    res = CliRunner().invoke(main, ["ls", "--json"], env={"MITM_SSE_DIR": str(cap)})
    assert res.exit_code == 0 and len(json.loads(res.output)) == 3


def test_missing_capture_is_one_line(tmp_path: Path) -> None:
    for cmd in ("ls", "stats", "show"):
        args = [cmd, "--dir", str(tmp_path / "nope")] + (["abc"] if cmd == "show" else [])
        assert "no mitm-sse capture" in one_line_error(run(*args, ok=False))


# ---- stats --------------------------------------------------------------------------------------------
def test_stats_values(cap: Path) -> None:
    rows = json.loads(run("stats", "--dir", str(cap), "--by", "session", "--json").output)
    by = {r["session"]: r for r in rows}
    assert by["s1"]["ttft_p50"] == pytest.approx(300.0)
    assert by["s2"]["ttft_p50"] == pytest.approx(250.0) and by["s2"]["errors"] == 1
    out = run("stats", "--dir", str(cap)).output
    assert "api.openai.com" in out and "TTFT" in out
    csv_lines = run("stats", "--dir", str(cap), "--by", "", "--csv").output.splitlines()
    assert csv_lines[0].startswith("streams,errors") and len(csv_lines) == 2
    pooled = json.loads(run("stats", "--dir", str(cap), "--by", "host", "--pooled-itl", "--json").output)
    assert pooled["pooled_itl"][0]["gaps"] == 5
    assert "pooled inter-token latency" in run("stats", "--dir", str(cap), "--pooled-itl").output


def test_stats_bad_group_is_usage_error(cap: Path) -> None:
    res = run("stats", "--dir", str(cap), "--by", "colour", ok=False)
    assert res.exit_code == 2 and "colour" in res.output and "Traceback" not in res.output


def test_stats_empty_capture(tmp_path: Path) -> None:
    from mitm_sse.store import CaptureDir

    CaptureDir(tmp_path).ensure()
    assert "no streams" in run("stats", "--dir", str(tmp_path)).output
    assert "no streams" in run("ls", "--dir", str(tmp_path)).output


# ---- sql ----------------------------------------------------------------------------------------------
def test_sql_read_only_queries(cap: Path) -> None:
    rows = json.loads(
        run(
            "sql", "--dir", str(cap), "SELECT stream_id, ttft_ms FROM stream_latency ORDER BY 1", "--json"
        ).output
    )
    assert rows[0] == {"stream_id": A, "ttft_ms": 300.0}
    for q in (
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "DESCRIBE streams",
        "SHOW TABLES",
        "SUMMARIZE stream_latency",
        "EXPLAIN SELECT * FROM chunks",
        "FROM events LIMIT 2",
        "SELECT 1; SELECT 2",
    ):
        run("sql", "--dir", str(cap), q)
    assert run("sql", "--dir", str(cap), "SELECT data FROM chunks LIMIT 1", "--csv").output.startswith(
        "data\n"
    )


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT 1) TO '/tmp/mitm-sse-should-not-exist.csv'",
        "ATTACH '/tmp/mitm-sse-x.duckdb' AS x",
        "INSTALL httpfs",
        "LOAD json",
        "SET threads = 1",
        "PRAGMA version",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW streams",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/mitm-sse-should-not-exist.csv'",
        "SELECT 1; DROP VIEW streams",
        "CALL pragma_version()",
    ],
)
def test_sql_refuses_writes(cap: Path, query: str) -> None:
    err = one_line_error(run("sql", "--dir", str(cap), query, ok=False))
    assert "read-only" in err
    assert not Path("/tmp/mitm-sse-should-not-exist.csv").exists()


def test_sql_cannot_read_outside_the_capture(cap: Path) -> None:
    err = one_line_error(run("sql", "--dir", str(cap), "SELECT * FROM read_csv('/etc/passwd')", ok=False))
    assert "Permission" in err or "disabled" in err


def test_sql_bad_query_is_one_line(cap: Path) -> None:
    assert "syntax error" in one_line_error(run("sql", "--dir", str(cap), "SELEC 1", ok=False))
    assert "nosuch" in one_line_error(run("sql", "--dir", str(cap), "SELECT * FROM nosuch", ok=False))


def test_check_read_only_returns_statements() -> None:
    assert len(check_read_only("select 1; select 2")) == 2


# ---- show ---------------------------------------------------------------------------------------------
def test_show_prefix(cap: Path) -> None:
    out = run("show", "--dir", str(cap), "aaaa").output
    assert A in out and "Hello world" in out and "chunk arrivals" in out
    assert "TTFT 300 ms" in out and "H headers" in out
    d = json.loads(run("show", "--dir", str(cap), "aaaa", "--json").output)
    assert d["reconstruction"]["text"] == "Hello world"
    assert d["latency"]["tpot_ms"] == pytest.approx(50.0)
    assert [round(e["offset_ms"]) for e in d["events"]][:3] == [200, 300, 350]
    assert "sk-" not in json.dumps(d)


def test_show_unknown_and_ambiguous(cap: Path) -> None:
    assert "no stream" in one_line_error(run("show", "--dir", str(cap), "zzz", ok=False))
    assert A in run("show", "--dir", str(cap), A[-8:]).output  # suffix, as plots label streams
    assert "ambiguous" in one_line_error(run("show", "--dir", str(cap), "", ok=False))


# ---- export -------------------------------------------------------------------------------------------
def test_export_duckdb(cap: Path, tmp_path: Path) -> None:
    out = tmp_path / "s2.duckdb"
    res = run("export", "--dir", str(cap), str(out), "--session", "s2")
    assert "exported 2 streams" in res.output
    con = duckdb.connect(str(out), read_only=True)
    assert con.execute("SELECT count(*) FROM streams").fetchone()[0] == 2
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 7  # B 5 + C 2
    ttft = con.execute("SELECT ttft_ms FROM stream_latency WHERE stream_id = ?", [B]).fetchone()[0]
    assert ttft == pytest.approx(400.0)
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert tables == {"streams", "chunks", "events"}  # real tables: the file stands alone
    con.close()
    assert "exists" in one_line_error(run("export", "--dir", str(cap), str(out), ok=False))
    run("export", "--dir", str(cap), str(out), "--stream", "aaa", "--force")
    assert duckdb.connect(str(out), read_only=True).execute("SELECT count(*) FROM streams").fetchone()[0] == 1


def test_export_parquet_capture_folder(cap: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    run("export", "--dir", str(cap), str(out))
    con = open_capture(out)
    assert con.execute("SELECT count(*) FROM streams").fetchone()[0] == 3
    assert (
        con.execute("SELECT count(*) FROM events").fetchone()[0]
        == open_capture(cap).execute("SELECT count(*) FROM events").fetchone()[0]
    )
    assert len(json.loads(run("ls", "--dir", str(out), "--json").output)) == 3


def test_export_unknown_session(cap: Path, tmp_path: Path) -> None:
    assert "no streams in session" in one_line_error(
        run("export", "--dir", str(cap), str(tmp_path / "x.duckdb"), "--session", "nope", ok=False)
    )


# ---- record / mock ------------------------------------------------------------------------------------
def test_record_command_line(tmp_path: Path) -> None:
    out = run(
        "record",
        "--dir",
        str(tmp_path),
        "-p",
        "9999",
        "--filter",
        "~d api.openai.com",
        "--session",
        "x",
        "--set",
        "sse_record=all",
        "--dry-run",
        "--",
        "--mode",
        "upstream:http://127.0.0.1:3128",
    ).output
    assert "mitmdump" in out and "record.py" in out
    for part in ("--listen-port 9999", f"sse_dir={tmp_path}", "sse_session=x", "sse_record=all"):
        assert part in out
    assert "'sse_filter=~d api.openai.com'" in out
    assert out.strip().endswith("--mode upstream:http://127.0.0.1:3128")


def test_mock_command_line(tmp_path: Path) -> None:
    out = run("mock", "--dir", str(tmp_path), "--mode", "new", "--speed", "0", "--dry-run").output
    assert "mock.py" in out and "sse_mode=new" in out and "sse_mock_speed=0" in out


# ---- as real processes --------------------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mitm_sse.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_real_process(cap: Path) -> None:
    p = _cli("stats", "--dir", str(cap), "--by", "session", "--json")
    assert p.returncode == 0, p.stderr
    assert {r["session"] for r in json.loads(p.stdout)} == {"s1", "s2"}
    p = _cli("sql", "--dir", str(cap), "DELETE FROM streams")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("Error:") and "Traceback" not in p.stderr
    p = _cli("show", "--dir", str(cap), "nope")
    assert p.returncode == 1 and "Traceback" not in p.stderr


def test_real_record_process(tmp_path: Path) -> None:
    """`mitm-sse record` becomes mitmdump with the recorder loaded, listening where asked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "conf"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mitm_sse.cli",
            "record",
            "--dir",
            str(tmp_path / "cap"),
            "-p",
            str(port),
            "--",
            "--set",
            f"confdir={conf}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        listening = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                listening = True
                break
            except OSError:
                time.sleep(0.1)
        assert listening, proc.stdout.read() if proc.poll() is not None else "not listening"
        deadline = time.monotonic() + 10
        while not (tmp_path / "cap" / "streams").is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "cap" / "streams").is_dir()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
