"""After a recorder was killed (SIGKILL, power loss): close the streams it left open.

Its provisional stream rows (rev 0) never got a final row. On the next start we write one, with the counts
of what did reach disk and end_reason 'proxy_crashed', so every stream in the capture has an end.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import duckdb

from .capture import views_sql

if TYPE_CHECKING:
    from .writer import Writer

log = logging.getLogger("mitm_sse")


def close_orphans(writer: Writer, instances: list[str]) -> int:
    con = duckdb.connect(":memory:")
    try:
        con.execute(views_sql(writer.capture.snapshot()))
        inst = ", ".join("'" + i.replace("'", "''") + "'" for i in instances)
        cur = con.execute(
            f"""
            WITH open AS (
                SELECT * FROM streams WHERE instance IN ({inst}) AND end_reason IS NULL
            ), c AS (
                SELECT stream_id, count(*) AS n, sum(size) AS b, max(t_ns) AS t_last, min(t_ns) AS t_first
                FROM chunks WHERE stream_id IN (SELECT stream_id FROM open) GROUP BY 1
            ), e AS (
                SELECT stream_id, count(*) AS n FROM events
                WHERE stream_id IN (SELECT stream_id FROM open) GROUP BY 1
            )
            SELECT open.*, c.n AS _n, c.b AS _b, c.t_last AS _t_last, c.t_first AS _t_first, e.n AS _e
            FROM open LEFT JOIN c USING (stream_id) LEFT JOIN e USING (stream_id)
            """
        )
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()
    for r in rows:
        row = {k: v for k, v in r.items() if not k.startswith("_")}
        row["rev"] = 1
        row["end_reason"] = "proxy_crashed"
        row["error"] = "the recorder stopped without closing this stream (killed?); kept what reached disk"
        row["n_chunks"] = r["_n"] or 0
        row["n_bytes"] = r["_b"] or 0
        row["n_events"] = r["_e"] or 0
        row["t_end_ns"] = r["_t_last"] or row.get("t_headers_ns") or time.time_ns()
        row["t_first_chunk_ns"] = r["_t_first"]
        writer._add_stream_row(row)
    if rows:
        log.warning("mitm-sse: marked %d streams of a killed recorder as proxy_crashed", len(rows))
    return len(rows)
