"""Numbered migrations of a capture folder, in the manner of simonw/llm's `migrations.py`.

Each migration is a function decorated with @migration, applied once, in order, when a recorder starts on a
folder; applied names are kept in `<sse_dir>/migrations.json`. Parquet segments are immutable, so a migration
that changes the data contract rewrites segments (read, transform, write tmp + rename) or relies on
`union_by_name` reads for additive columns. Every change to schema.py needs one, and a CHANGELOG line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from .schema import SCHEMA_VERSION
from .store import FILE_MODE, CaptureDir

log = logging.getLogger("mitm_sse")

MIGRATIONS: list[Callable[[CaptureDir], None]] = []


def migration(fn: Callable[[CaptureDir], None]) -> Callable[[CaptureDir], None]:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(capture: CaptureDir) -> None:
    """Schema v1: streams / chunks / events with the columns of schema.py (nothing to transform)."""


def _state_path(capture: CaptureDir):
    return capture.path / "migrations.json"


def applied(capture: CaptureDir) -> list[str]:
    try:
        return json.loads(_state_path(capture).read_text())["applied"]
    except (OSError, ValueError, KeyError):
        return []


def migrate(capture: CaptureDir) -> list[str]:
    """Apply pending migrations; returns the names applied now."""
    done = applied(capture)
    new = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        fn(capture)
        done.append(fn.__name__)
        new.append(fn.__name__)
    if new or not _state_path(capture).exists():
        tmp = _state_path(capture).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            json.dump({"schema_version": SCHEMA_VERSION, "applied": done, "updated": time.time()}, f)
        os.rename(tmp, _state_path(capture))
        if new:
            log.info("mitm-sse: applied capture migrations %s", ", ".join(new))
    return new
