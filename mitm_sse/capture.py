"""Reading a capture: DuckDB views over the Parquet segments, from any process, while the proxy records.

`open_capture(path)` gives an in-memory DuckDB connection with the views `streams`, `chunks`, `events` and
the metric views, bound to an explicit, consistent snapshot of the files (see store.py for why). Call
`refresh(con)` (or open again) to see what was written since.

`write_views_db(path)` maintains `capture.duckdb` in the folder for the duckdb CLI: its views glob the
folder at query time, so they always see the newest data (a query racing a compaction, which takes
milliseconds every few minutes at most, can fail or double-count; re-run it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb

from .metrics import METRIC_VIEWS_SQL
from .store import SUPERSEDED, CaptureDir, default_dir

log = logging.getLogger("mitm_sse")

VIEWS_DB = "capture.duckdb"


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _source(files: list[str] | str) -> str:
    if isinstance(files, list):  # an exact snapshot
        lit = "[" + ", ".join(_q(f) for f in files) + "]"
        return f"read_parquet({lit}, union_by_name = true, hive_partitioning = false)"
    # A glob, evaluated at query time: leave out files a compaction has superseded (see store.py).
    superseded = str(Path(files).parent.parent / SUPERSEDED)
    return (
        f"(SELECT * EXCLUDE (filename) FROM read_parquet({_q(files)}, union_by_name = true, "
        f"hive_partitioning = false, filename = true) "
        f"WHERE filename NOT IN (SELECT path FROM read_parquet({_q(superseded)})))"
    )


def views_sql(sources: dict[str, list[str] | str]) -> str:
    """SQL that (re)creates the contract views over the given files or globs."""
    return f"""
CREATE OR REPLACE VIEW streams_revisions AS SELECT * FROM {_source(sources["streams"])};
CREATE OR REPLACE VIEW streams AS
    SELECT * EXCLUDE (rev) FROM streams_revisions
    QUALIFY row_number() OVER (PARTITION BY stream_id ORDER BY rev DESC, t_updated_ns DESC) = 1;
CREATE OR REPLACE VIEW chunks AS SELECT * FROM {_source(sources["chunks"])};
CREATE OR REPLACE VIEW events AS SELECT * FROM {_source(sources["events"])};
{METRIC_VIEWS_SQL}
"""


def resolve_dir(path: str | os.PathLike[str] | None) -> Path:
    """A capture folder, or the capture.duckdb / any file inside one."""
    p = Path(path).expanduser() if path else default_dir()
    if p.is_file():
        p = p.parent
    return p


def open_capture(path: str | os.PathLike[str] | None = None) -> duckdb.DuckDBPyConnection:
    """Open a capture folder for reading: `streams`, `chunks`, `events`, `stream_latency`, ... views.

    Never takes a lock the recorder needs and never writes to the folder.
    """
    cap = CaptureDir(resolve_dir(path))
    if not (cap.path / "streams").is_dir():
        raise FileNotFoundError(
            f"no mitm-sse capture at {cap.path} (record one with mitmdump -s mitm_sse/record.py)"
        )
    con = duckdb.connect(":memory:")
    con.execute(views_sql(cap.snapshot()))
    con.execute("SET VARIABLE mitm_sse_dir = ?", [str(cap.path)])
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """Rebind a connection from open_capture to the current files."""
    path = con.execute("SELECT getvariable('mitm_sse_dir')").fetchone()[0]
    con.execute(views_sql(CaptureDir(path).snapshot()))
    return con


def write_views_db(capture: CaptureDir) -> bool:
    """(Re)create capture.duckdb with glob views. Returns False if another process holds it open."""
    db = capture.path / VIEWS_DB
    new = not db.exists()
    globs = {t: capture.glob(t) for t in ("streams", "chunks", "events")}
    try:
        con = duckdb.connect(str(db))
    except duckdb.Error as e:
        log.warning("mitm-sse: %s is in use (%s); its views were not refreshed", db, e)
        return False
    try:
        con.execute(views_sql(globs))
    finally:
        con.close()
    if new:
        os.chmod(db, 0o600)
    return True
