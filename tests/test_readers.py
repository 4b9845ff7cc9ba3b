"""The capture folder is hive-partitioned Parquet, readable as is by Polars, pandas (pyarrow) and Spark.

A real mitmdump records a few streams, one of them still open while it is read (so the `streams` table holds a
provisional revision next to the final one). Each reader must find the same rows as the project's own DuckDB
views, keeping the highest `rev` per stream_id the way docs/ecosystem.md shows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pyarrow.dataset as ds
import pytest

from mitm_sse.capture import open_capture
from mitm_sse.store import CaptureDir
from tests.clients import clients_venv
from tests.proxy import Mitmdump
from tests.servers import ScriptedServer

try:
    import polars as pl
except ImportError:  # in the test extra; a venv without it skips the Polars tests
    pl = None
needs_polars = pytest.mark.skipif(pl is None, reason="polars is not installed (pip install polars)")

SHORT = [(0.0, b"event: a\ndata: one\n\n"), (0.02, b"data: two\n\n"), (0.02, b"id: 3\ndata: three\n\n")]
LONG = [(0.0, b"data: first\n\n"), ("stall", 4.0), (0.0, b"data: last\n\n")]
TABLES = ("streams", "chunks", "events")


def _get(client: httpx.Client, url: str) -> bytes:
    with client.stream("GET", url) as r:
        return b"".join(r.iter_raw())


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> dict:
    """Record 3 streams; read the folder with Polars while the long one is still open."""
    tmp = tmp_path_factory.mktemp("readers")
    routes = {"/short": (200, None, SHORT), "/long": (200, None, LONG)}
    out: dict = {"dir": tmp / "capture"}
    with ScriptedServer("h1-chunked", None, routes=routes) as srv, Mitmdump(tmp) as proxy:
        base = f"http://127.0.0.1:{srv.port}"
        with httpx.Client(proxy=proxy.url, timeout=30, trust_env=False) as c:
            bodies: dict[str, bytes] = {}
            t = threading.Thread(
                target=lambda: bodies.setdefault("long", _get(c, base + "/long")), daemon=True
            )
            t.start()
            # The long stream is open: its provisional revision (rev 0, no end yet) is on disk.
            proxy.wait_for("SELECT 1 FROM streams WHERE end_reason IS NULL AND path = '/long'", timeout=30)
            out["live"] = _polars_latest(out["dir"]) if pl is not None else None
            for _ in range(2):
                bodies.setdefault("short", _get(c, base + "/short"))
            t.join(30)
            assert not t.is_alive()
        proxy.wait_for("SELECT count(*) FROM streams WHERE end_reason IS NOT NULL", lambda r: r[0][0] == 3)
    db = open_capture(out["dir"])  # the folder is complete: the proxy has stopped
    out["expected"] = {
        "streams": sorted(db.execute("SELECT stream_id, end_reason, n_events FROM streams").fetchall()),
        "revisions": db.execute("SELECT count(*) FROM streams_revisions").fetchone()[0],
        "chunks": db.execute("SELECT count(*) FROM chunks").fetchone()[0],
        "events": db.execute("SELECT count(*) FROM events").fetchone()[0],
        "bytes": dict(db.execute("SELECT stream_id, sum(size) FROM chunks GROUP BY ALL").fetchall()),
    }
    db.close()
    out["bodies"] = bodies
    return out


def _polars_latest(root: Path) -> pl.DataFrame:
    """The README's Polars recipe: scan each table's hive-partitioned files, keep the last revision."""

    def scan(table: str) -> pl.LazyFrame:
        return pl.scan_parquet(
            f"{root}/{table}/*/*.parquet", hive_partitioning=True, missing_columns="insert"
        )

    streams = scan("streams").sort("rev", "t_updated_ns").unique("stream_id", keep="last")
    return streams.select("stream_id", "rev", "path", "end_reason", "day").collect()


def test_layout_is_hive_partitioned(capture):
    root = capture["dir"]
    for table in TABLES:
        files = [p.relative_to(root / table) for p in (root / table).rglob("*.parquet")]
        live = [f for f in files if not f.name.startswith(".")]
        assert live, table
        for f in live:
            assert re.fullmatch(r"day=\d{4}-\d{2}-\d{2}", f.parts[0]) and len(f.parts) == 2, f
        assert not list((root / table).rglob("*.tmp"))
    # Nothing else a reader could trip on: the views file and the bookkeeping live outside the table folders.
    assert {p.name for p in root.iterdir() if p.is_dir()} >= set(TABLES)


@needs_polars
def test_polars_reads_while_recording_and_after(capture):
    live = capture["live"]
    (row,) = live.filter(pl.col("path") == "/long").rows(named=True)
    assert row["rev"] == 0 and row["end_reason"] is None  # provisional: the stream was still open

    final = _polars_latest(capture["dir"])
    assert final.schema["day"] == pl.Date  # the partition key comes back as a column
    got = sorted((r["stream_id"], r["end_reason"]) for r in final.rows(named=True))
    assert got == [(sid, end) for sid, end, _ in capture["expected"]["streams"]]
    assert all(r["rev"] == 1 for r in final.rows(named=True))
    raw = pl.scan_parquet(f"{capture['dir']}/streams/*/*.parquet", hive_partitioning=True).collect()
    assert raw.height == capture["expected"]["revisions"] > final.height  # revisions, not streams

    chunks = pl.scan_parquet(f"{capture['dir']}/chunks/*/*.parquet", hive_partitioning=True)
    per = chunks.group_by("stream_id").agg(pl.col("size").sum()).collect()
    assert dict(per.iter_rows()) == capture["expected"]["bytes"]
    events = pl.scan_parquet(f"{capture['dir']}/events/*/*.parquet", hive_partitioning=True)
    assert events.select(pl.len()).collect().item() == capture["expected"]["events"]
    # chunks are the bytes as received
    long_id = final.filter(pl.col("path") == "/long")["stream_id"][0]
    data = chunks.filter(pl.col("stream_id") == long_id).sort("seq").select("data").collect()["data"]
    assert b"".join(data) == capture["bodies"]["long"]


def test_pandas_reads_folder_and_snapshot(capture):
    import pandas as pd

    root = capture["dir"]
    # A table folder as is (pyarrow skips ".superseded.parquet": files starting with "." are ignored).
    streams = pd.read_parquet(root / "streams")
    assert "day" in streams.columns and len(streams) == capture["expected"]["revisions"]
    latest = streams.sort_values(["rev", "t_updated_ns"]).drop_duplicates("stream_id", keep="last")
    got = sorted(zip(latest.stream_id, latest.end_reason, latest.n_events, strict=True))
    assert got == capture["expected"]["streams"]
    assert len(pd.read_parquet(root / "chunks")) == capture["expected"]["chunks"]

    # A consistent file list from mitm-sse (no half-compacted state), read through pyarrow.dataset.
    files = CaptureDir(root).snapshot()
    events = ds.dataset(
        files["events"], format="parquet", partitioning="hive", partition_base_dir=str(root / "events")
    ).to_table()
    assert events.num_rows == capture["expected"]["events"] and "day" in events.column_names
    df = events.to_pandas()
    short = df[df.event == "a"]
    assert len(short) == 2 and set(short.data) == {"one"}


def _spark_python() -> tuple[str | None, str]:
    py = clients_venv() / "bin" / "python"
    if shutil.which("java") is None:
        return None, "no Java runtime (Spark needs one)"
    if not py.exists():
        return None, f"no client venv at {clients_venv()} (run scripts/install-clients.sh)"
    r = subprocess.run([str(py), "-c", "import pyspark"], capture_output=True, timeout=60)
    if r.returncode != 0:
        return None, f"pyspark not installed in {clients_venv()} (run scripts/install-clients.sh)"
    return str(py), ""


def test_spark_reads_capture(capture, tmp_path):
    py, why = _spark_python()
    if py is None:
        pytest.skip(why)
    env = {
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "HOME": str(tmp_path),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOCAL_DIRS": str(tmp_path),
        "JAVA_TOOL_OPTIONS": f"-Djava.io.tmpdir={tmp_path}",
    }
    script = Path(__file__).parent / "clients" / "spark_read.py"
    r = subprocess.run([py, str(script), str(capture["dir"])], env=env, capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    out = json.loads(r.stdout)
    exp = capture["expected"]
    assert out["streams_revisions"] == exp["revisions"] and out["streams"] == len(exp["streams"])
    assert out["chunks"] == exp["chunks"] and out["events"] == exp["events"]
    assert out["day_type"] == "date" and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", d) for d in out["days"])
    got = sorted((r["stream_id"], r["end_reason"], r["n_events"]) for r in out["latest"])
    assert got == exp["streams"]
    assert {r["stream_id"]: r["bytes"] for r in out["latest"]} == exp["bytes"]


def publish(capture: str, lake: str, source: str) -> None:
    """docs/ecosystem.md's recipe, verbatim: mirror live files into lake/<table>/source=<source>/day=.../."""
    import os

    for table, files in CaptureDir(Path(capture).expanduser()).snapshot().items():
        want = {Path(lake, table, f"source={source}", Path(f).parent.name, Path(f).name): f for f in files}
        for dest, src in want.items():
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name("." + dest.name + ".tmp")  # dot files are skipped by every reader
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        for old in Path(lake, table, f"source={source}").glob("day=*/*.parquet"):
            if old not in want:  # merged away by a compaction since
                old.unlink()


@needs_polars
def test_publish_to_lake_and_read_two_sources(capture, tmp_path):
    lake = tmp_path / "lake"
    for source in ("alice", "ci-17"):
        publish(str(capture["dir"]), str(lake), source)
    publish(str(capture["dir"]), str(lake), "alice")  # re-running changes nothing
    stale = lake / "chunks" / "source=alice" / "day=2000-01-01" / "gone.parquet"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    publish(str(capture["dir"]), str(lake), "alice")
    assert not stale.exists()

    streams = pl.scan_parquet(f"{lake}/streams/*/*/*.parquet", hive_partitioning=True)
    latest = streams.sort("rev", "t_updated_ns").unique(["source", "stream_id"], keep="last").collect()
    assert sorted(latest["source"].unique()) == ["alice", "ci-17"]
    assert latest.height == 2 * len(capture["expected"]["streams"])
    chunks = pl.scan_parquet(f"{lake}/chunks/*/*/*.parquet", hive_partitioning=True)
    assert chunks.select(pl.len()).collect().item() == 2 * capture["expected"]["chunks"]


@needs_polars
def test_docs_snippets(capture):
    """The Polars and snapshot snippets of docs/ecosystem.md run on a real capture."""
    cap = str(capture["dir"])

    def scan(table: str) -> pl.LazyFrame:
        return pl.scan_parquet(f"{cap}/{table}/*/*.parquet", hive_partitioning=True, missing_columns="insert")

    streams = scan("streams").sort("rev", "t_updated_ns").unique("stream_id", keep="last")
    events = scan("events")
    (
        streams.filter(pl.col("t_first_content_ns").is_not_null())
        .with_columns(ttft_ms=(pl.col("t_first_content_ns") - pl.col("t_request_ns")) / 1e6)
        .group_by("model")
        .agg(pl.len(), pl.col("ttft_ms").median())
        .collect()
    )
    (
        events.filter(pl.col("content_kind") == "text")
        .group_by("stream_id")
        .agg(pl.col("delta_text").sort_by("seq").str.join(""))
        .collect()
    )
    files = CaptureDir(cap).snapshot()
    chunks = pl.read_parquet(files["chunks"], hive_partitioning=True)
    assert chunks.height == capture["expected"]["chunks"]
