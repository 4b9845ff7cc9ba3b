"""The capture folder: compaction keeps every row exactly once, readers never see a half-swapped folder."""

from __future__ import annotations

import os
import threading
import time

import duckdb
import pyarrow as pa

from mitm_sse import open_capture, refresh
from mitm_sse.capture import write_views_db
from mitm_sse.schema import CHUNKS
from mitm_sse.store import SUPERSEDED_GRACE_S, CaptureDir


def _chunk_table(start: int, n: int) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "stream_id": ["s"] * n,
            "seq": list(range(start, start + n)),
            "t_ns": list(range(start, start + n)),
            "delta_ns": [1] * n,
            "size": [3] * n,
            "data": [b"abc"] * n,
        },
        schema=CHUNKS,
    )


def test_compaction_is_exact_and_readers_see_consistent_snapshots(tmp_path):
    cap = CaptureDir(tmp_path / "cap")
    cap.ensure()
    total = 0
    stop = threading.Event()
    seen: list[tuple[int, int]] = []  # (rows written before the read started, rows the reader saw)
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            before = total
            try:
                con = open_capture(cap.path)
                n, dup = con.execute("SELECT count(*), count(*) - count(DISTINCT seq) FROM chunks").fetchone()
                con.close()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return
            seen.append((before, n))
            assert dup == 0, "a row was read twice"

    t = threading.Thread(target=reader)
    t.start()
    try:
        for round_ in range(6):
            for _ in range(30):
                cap.write_segment("chunks", _chunk_table(total, 100), f"s-{time.time_ns():020d}-test-{total}")
                total += 100
            merged = cap.compact("chunks", "test", now=time.time() + 3600)
            assert merged >= 24, (round_, merged)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert seen and all(n >= before for before, n in seen)
    assert len(cap.snapshot()["chunks"]) <= 8  # 180 segments became a handful of live files
    # Superseded inputs stay readable for older snapshots during the grace period, then go.
    assert len(list((cap.path / "chunks").glob("*/*.parquet"))) > 100
    cap.compact("chunks", "test", now=time.time() + 3600 + SUPERSEDED_GRACE_S)
    files = list((cap.path / "chunks").glob("*/*.parquet"))
    assert len(files) <= 8
    con = open_capture(cap.path)
    assert con.execute("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM chunks").fetchone() == (
        total,
        total,
        0,
        total - 1,
    )
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600


def test_refresh_and_views_db(tmp_path):
    cap = CaptureDir(tmp_path / "cap")
    cap.ensure()
    con = open_capture(cap.path)
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    cap.write_segment("chunks", _chunk_table(0, 5), "s-1")
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0  # a snapshot
    refresh(con)
    assert con.execute("SELECT count(*) FROM chunks").fetchone()[0] == 5
    assert write_views_db(cap)
    db = duckdb.connect(str(cap.path / "capture.duckdb"), read_only=True)
    cap.write_segment("chunks", _chunk_table(5, 5), "s-2")
    assert db.execute("SELECT count(*) FROM chunks").fetchone()[0] == 10  # glob views: always current
    db.close()
    for i in range(30):
        cap.write_segment("chunks", _chunk_table(10 + i, 1), f"s-x{i}")
    cap.compact("chunks", "test", now=time.time() + 60)
    db = duckdb.connect(str(cap.path / "capture.duckdb"), read_only=True)
    # Superseded files are still on disk but the glob views leave them out.
    assert db.execute("SELECT count(*), count(DISTINCT seq) FROM chunks").fetchone() == (40, 40)
    assert oct(os.stat(cap.path / "capture.duckdb").st_mode & 0o777) == "0o600"


def test_open_capture_errors_clearly(tmp_path):
    try:
        open_capture(tmp_path / "nothing-here")
    except FileNotFoundError as e:
        assert "no mitm-sse capture" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")


def test_migrations_recorded_once(tmp_path):
    from mitm_sse.migrations import MIGRATIONS, applied, migrate

    cap = CaptureDir(tmp_path / "cap")
    cap.ensure()
    assert migrate(cap) == [m.__name__ for m in MIGRATIONS]
    assert migrate(cap) == []
    assert applied(cap) == [m.__name__ for m in MIGRATIONS]
    assert oct(os.stat(cap.path / "migrations.json").st_mode & 0o777) == "0o600"
