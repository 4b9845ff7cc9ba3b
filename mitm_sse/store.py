"""The capture folder: layout, atomic Parquet segments, compaction, consistent snapshots and locks.

Why Parquet segments and not a live DuckDB file: a .duckdb file held read-write by the proxy cannot be opened
by any other process, even read-only. Segments are written to a temporary name, fsynced and renamed, so a
reader (or a SIGKILL) never sees a half-written file. Compaction merges small segments so that a session of
hours stays a few files; it swaps files under an exclusive flock, and `snapshot()` lists files under a
shared one, so a reader's file list is never mid-swap (a glob racing a compaction can miss or double rows).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa

# pyarrow is imported inside the functions that write or read Parquet: the proxy process uses this module
# only for the layout and the checks, and must not pay pyarrow's ~100 MB.
TABLE_NAMES = ("streams", "chunks", "events")

log = logging.getLogger("mitm_sse")

DIR_MODE = 0o700
FILE_MODE = 0o600
EMPTY_PARTITION = "day=1970-01-01"  # holds one empty file per table so globs always match something
COMPACT_MIN_FILES = 24  # merge a partition's small files once this many are sealed
# Files above this are left alone: a merged file stops being rewritten once it is this big, so compaction
# costs O(new data), not O(capture) (a 64 MB bound rewrote growing files every 30 s and grew the writer's
# memory by hundreds of MB on a long feed; 16 MB still stepped it up at each merge).
COMPACT_SMALL_BYTES = 4 * 1024 * 1024
COMPACT_MIN_AGE_S = 5.0  # only files this old take part (readers may be planning on the newest)
# Compacted inputs stay on disk this long, listed as superseded, so that a reader holding an older snapshot
# (an open_capture() connection, a notebook) can still read them; new snapshots and the glob views skip them.
SUPERSEDED_GRACE_S = 600.0
SUPERSEDED = ".superseded.parquet"  # per table folder; not matched by the */*.parquet globs


def _superseded_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("t", pa.float64())])


def default_dir() -> Path:
    env = os.environ.get("MITM_SSE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".mitm-sse"


class StoreError(Exception):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaptureDir:
    """A capture folder. Safe to use from several processes (recorders and readers) at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()

    # ---- layout -------------------------------------------------------------------------------------
    def ensure(self, files: bool = True) -> None:
        """Create the layout (0700 folders) and check it is writable; StoreError with the reason if not.

        files=False skips the empty Parquet files (and so pyarrow): the proxy's early check.
        """
        try:
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} exists and is not a directory")
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            for name in (*TABLE_NAMES, "instances"):
                (self.path / name).mkdir(mode=DIR_MODE, exist_ok=True)
            probe = self.path / f".probe-{os.getpid()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            os.write(fd, b"ok")
            os.close(fd)
            probe.unlink()
            if not files:
                return
            from .schema import TABLES

            for table, schema in TABLES.items():
                empty = self.path / table / EMPTY_PARTITION / "empty.parquet"
                if not empty.exists():
                    self._write_atomic(empty, schema.empty_table())
                if not (self.path / table / SUPERSEDED).exists():
                    self._write_atomic(self.path / table / SUPERSEDED, _superseded_schema().empty_table())
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"capture folder {self.path} is not usable: {e.strerror or e}") from None

    def table_dir(self, table: str) -> Path:
        return self.path / table

    def glob(self, table: str) -> str:
        return str(self.path / table / "*" / "*.parquet")

    def superseded_path(self, table: str) -> Path:
        return self.path / table / SUPERSEDED

    def _read_superseded(self, table: str) -> dict[str, float]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(self.superseded_path(table))
        except (OSError, pa.ArrowException):
            return {}
        return dict(zip(t.column("path").to_pylist(), t.column("t").to_pylist(), strict=True))

    def _write_superseded(self, table: str, entries: dict[str, float]) -> None:
        import pyarrow as pa

        data = pa.table({"path": list(entries), "t": list(entries.values())}, schema=_superseded_schema())
        self._write_atomic(self.superseded_path(table), data)

    # ---- writing ------------------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def _tmp_file(final: Path) -> Iterator[tuple[Path, object]]:
        """A 0600 temporary file beside `final`, fsynced when the block ends (removed if it fails).

        The caller renames it into place: readers and a SIGKILL only ever see whole files.
        """
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                yield tmp, f
                f.flush()
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            os.close(fd)

    def _write_atomic(self, final: Path, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        final.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with self._tmp_file(final) as (tmp, f):
            pq.write_table(table, f, compression="zstd", row_group_size=256 * 1024)
        os.rename(tmp, final)
        _fsync_dir(final.parent)

    def write_segment(self, table: str, data: pa.Table, name: str) -> Path:
        """Write one immutable segment of `table` into today's (UTC) partition."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        final = self.path / table / f"day={day}" / f"{name}.parquet"
        self._write_atomic(final, data)
        return final

    def cleanup_tmp(self) -> int:
        """Remove temporary files left by a killed writer. Returns how many."""
        n = 0
        for table in TABLE_NAMES:
            for tmp in (self.path / table).glob("*/*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    n += 1
        return n

    # ---- locking & snapshots ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def snapshot(self) -> dict[str, list[str]]:
        """A consistent list of every table's live files (never mid-compaction, superseded files left out)."""
        try:
            ctx = self._lock(fcntl.LOCK_SH)
            ctx.__enter__()
        except OSError:
            ctx = None  # read-only folder of someone else's: no compaction can run there anyway
        try:
            out = {}
            for t in TABLE_NAMES:
                gone = self._read_superseded(t)
                out[t] = sorted(p for p in map(str, (self.path / t).glob("*/*.parquet")) if p not in gone)
            return out
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)

    # ---- compaction ---------------------------------------------------------------------------------
    def compact(self, table: str, instance: str, now: float | None = None) -> int:
        """Merge sealed small segments of each partition of `table`. Returns how many files were merged."""
        now = time.time() if now is None else now
        self._purge_superseded(table, now)
        gone = self._read_superseded(table)
        merged = 0
        for part in sorted(p for p in (self.path / table).iterdir() if p.is_dir()):
            if part.name == EMPTY_PARTITION:
                continue
            candidates = []
            for f in sorted(part.glob("*.parquet")):
                if str(f) in gone:
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                if st.st_size < COMPACT_SMALL_BYTES and now - st.st_mtime >= COMPACT_MIN_AGE_S:
                    candidates.append(f)
            if len(candidates) < COMPACT_MIN_FILES:
                continue
            merged += self._merge(part, candidates, table, instance, now)
        return merged

    def _merge(self, part: Path, files: list[Path], table: str, instance: str, now: float) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .schema import TABLES

        schema = TABLES[table]
        out = part / f"c-{time.time_ns():020d}-{instance}.parquet"
        with self._tmp_file(out) as (tmp, f), pq.ParquetWriter(f, schema, compression="zstd") as w:
            # Streamed in batches (memory bounded by ~64k rows, not by a file), regrouped so the output has
            # large row groups even when the inputs are many tiny segments.
            pending: list[pa.Table] = []
            rows = 0
            for src in files:
                reader = pq.ParquetFile(src, pre_buffer=False)
                for batch in reader.iter_batches(batch_size=16 * 1024, use_threads=False):
                    pending.append(_conform(pa.Table.from_batches([batch]), schema))
                    rows += batch.num_rows
                    if rows >= 64 * 1024:
                        w.write_table(pa.concat_tables(pending))
                        pending, rows = [], 0
            if pending:
                w.write_table(pa.concat_tables(pending))
        with self._lock(fcntl.LOCK_EX):
            # Both in one critical section: a snapshot sees either the inputs or the merged file, never both.
            entries = self._read_superseded(table)
            entries.update({str(src): now for src in files})
            self._write_superseded(table, entries)
            os.rename(tmp, out)
            _fsync_dir(part)
        return len(files)

    def _purge_superseded(self, table: str, now: float) -> None:
        entries = self._read_superseded(table)
        old = [p for p, t in entries.items() if now - t >= SUPERSEDED_GRACE_S]
        if not old:
            return
        with self._lock(fcntl.LOCK_EX):
            entries = self._read_superseded(table)
            for p in old:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                entries.pop(p, None)
            self._write_superseded(table, entries)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast an older segment to the current schema (missing columns become NULL)."""
    import pyarrow as pa

    if t.schema.equals(schema):
        return t
    cols = []
    for field in schema:
        if field.name in t.column_names:
            cols.append(t.column(field.name).cast(field.type))
        else:
            cols.append(pa.nulls(len(t), field.type))
    return pa.Table.from_arrays(cols, schema=schema)


class InstanceLock:
    """Held by a running recorder. A lock file nobody holds belongs to a recorder that died (SIGKILL)."""

    def __init__(self, capture: CaptureDir, instance: str) -> None:
        self.path = capture.path / "instances" / f"{instance}.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = -1


def new_instance_id() -> str:
    """Names a recorder's writer: its lock file, its segments, its stream rows."""
    return f"{os.getpid():x}{os.urandom(3).hex()}"


def dead_instances(capture: CaptureDir) -> list[tuple[str, Path]]:
    """Instances whose lock file is not held by a live process."""
    out = []
    for lf in (capture.path / "instances").glob("*.lock"):
        try:
            fd = os.open(lf, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # held: alive
        os.close(fd)
        out.append((lf.stem, lf))
    return out
