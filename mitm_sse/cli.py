"""`mitm-sse`: record, mock, and look at captured SSE streams from the command line.

Every command takes `--dir` (default $MITM_SSE_DIR or ~/.mitm-sse). Tables are for people (rich); `--json`
and `--csv` are for scripts. A user error (no capture, bad SQL, unknown ID) is one line on stderr and exit
code 1 (2 for bad usage), never a traceback. See docs/cli.md.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import __version__
from .metrics import GROUPS, QUANTILES, summary_column

DIR_HELP = "Capture folder (default: $MITM_SSE_DIR or ~/.mitm-sse)."


class UserError(click.ClickException):
    """One line on stderr, exit code 1."""


def _dir_option(f: Callable) -> Callable:
    return click.option("--dir", "dir_", type=click.Path(path_type=Path), default=None, help=DIR_HELP)(f)


def _capture_dir(dir_: Path | None) -> Path:
    from .capture import resolve_dir

    return resolve_dir(dir_)


def _user_errors(f: Callable) -> Callable:
    """Turn the errors a user can cause into one clear line (click prints 'Error: ...', exit 1)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import duckdb

        try:
            return f(*args, **kwargs)
        except FileNotFoundError as e:
            raise UserError(str(e) if not e.filename else f"{e.strerror}: {e.filename}") from None
        except duckdb.Error as e:
            raise UserError(" ".join(str(e).split())) from None
        except BrokenPipeError:  # `mitm-sse ls | head`
            sys.stderr.close()
            sys.exit(0)

    return wrapper


def _open(dir_: Path | None):
    from .capture import open_capture

    return open_capture(_capture_dir(dir_))


# ---- formatting ---------------------------------------------------------------------------------------
def fmt_ms(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f} s"
    if abs(v) >= 1000:
        return f"{v / 1000:.2f} s"
    if abs(v) >= 100:
        return f"{v:.0f} ms"
    return f"{v:.1f} ms"


def fmt_num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def fmt_time(ns: Any) -> str:
    if ns is None:
        return "–"
    t = dt.datetime.fromtimestamp(ns / 1e9)
    if t.date() == dt.date.today():
        return t.strftime("%H:%M:%S")
    return t.strftime("%m-%d %H:%M")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, dt.datetime | dt.date | dt.time | dt.timedelta):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):  # numpy scalar
        return v.item()
    return v


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(_jsonable(obj), ensure_ascii=False, indent=2, default=str))


def _print_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if x is None else _jsonable(x) for x in r])
    click.echo(buf.getvalue(), nl=False)


def _console():
    from rich.console import Console

    # Piped output (CliRunner, `| less`) gets a generous width instead of rich's 80 columns.
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((140, 24)).columns, 140)
    return Console(width=width, highlight=False)


def _table(title: str | None, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]):
    """columns: (header, 'left'|'right')."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for i, (head, justify) in enumerate(columns):
        # Long free text (paths, SQL cells, event data) folds; short fields (ids, numbers) keep their width,
        # so a narrow terminal squeezes the free text, never a number.
        wrap = head in WRAPPING_COLUMNS
        longest = max((len(r[i]) for r in rows), default=0)
        t.add_column(
            head,
            justify=justify,
            overflow="fold" if wrap else "ellipsis",
            no_wrap=not wrap,
            min_width=None if wrap else min(longest, 30),
        )
    for r in rows:
        t.add_row(*r)
    return t


WRAPPING_COLUMNS = frozenset({"data / text", "path"})


def _output_mode(as_json: bool, as_csv: bool) -> str:
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    return "json" if as_json else "csv" if as_csv else "table"


def _filters(session: str | None, host: str | None, model: str | None) -> tuple[str, list[str]]:
    """The --session/--host/--model filters as an SQL condition ("" for none) and its parameters."""
    conds, params = [], []
    for col, val in (("session", session), ("host", host), ("model", model)):
        if val is not None:
            conds.append(f"{col} = ?")
            params.append(val)
    return " AND ".join(conds), params


# ---- group --------------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mitm-sse")
def main() -> None:
    """Record, analyse and replay Server-Sent Events streams (LLM APIs) through mitmproxy."""


# ---- ls -----------------------------------------------------------------------------------------------
@main.command("ls")
@_dir_option
@click.option("-n", "--limit", default=20, show_default=True, help="How many streams (newest first).")
@click.option("--session", help="Only this session label.")
@click.option("--host", help="Only this host.")
@click.option("--model", help="Only this model.")
@click.option("--json", "as_json", is_flag=True, help="JSON array on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@_user_errors
def ls_cmd(
    dir_: Path | None,
    limit: int,
    session: str | None,
    host: str | None,
    model: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Recent streams: time, host, path, model, status, chunks, TTFT, total."""
    mode = _output_mode(as_json, as_csv)
    con = _open(dir_)
    cond, params = _filters(session, host, model)
    where = f"WHERE {cond}" if cond else ""
    cur = con.execute(
        f"""SELECT stream_id, t_request_ns, session, method, host, path, provider, model, status, end_reason,
                   n_chunks, n_events, output_tokens, ttfb_ms, ttft_ms, e2e_ms, tokens_per_s
            FROM stream_latency {where}
            ORDER BY t_request_ns DESC NULLS LAST, stream_id DESC LIMIT ?""",
        [*params, limit],
    )
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    if mode == "json":
        _print_json([dict(zip(cols, r, strict=True)) for r in rows])
        return
    if mode == "csv":
        _print_csv(cols, rows)
        return
    console = _console()
    if not rows:
        console.print(f"no streams in {_capture_dir(dir_)}" + (" matching the filters" if cond else ""))
        return
    out = []
    for r in rows:
        d = dict(zip(cols, r, strict=True))
        end = d["end_reason"]
        status = str(d["status"] or "")
        if end is None:
            status += " open"
        elif end != "complete":
            status += " " + SHORT_END.get(end, end)
        out.append(
            [
                fmt_time(d["t_request_ns"]),
                d["stream_id"],
                d["host"] or "",
                d["path"] or "",
                d["model"] or "",
                status,
                fmt_num(d["n_chunks"]),
                fmt_ms(d["ttft_ms"]),
                fmt_ms(d["e2e_ms"]),
            ]
        )
    cols_spec = [
        ("time", "left"),
        ("id", "left"),
        ("host", "left"),
        ("path", "left"),
        ("model", "left"),
        ("status", "left"),
        ("chunks", "right"),
        ("TTFT", "right"),
        ("total", "right"),
    ]
    console.print(_table(None, cols_spec, out))


SHORT_END = {
    "client_disconnected": "client left",
    "server_error": "server error",
    "proxy_shutdown": "proxy stop",
    "proxy_crashed": "proxy crash",
}


# ---- stats --------------------------------------------------------------------------------------------
def _parse_by(by: str) -> list[str]:
    keys = [b.strip() for b in by.split(",") if b.strip()] if by else []
    bad = [k for k in keys if k not in GROUPS]
    if bad:
        raise click.BadParameter(
            f"unknown {', '.join(bad)}; choose from {', '.join(GROUPS)}", param_hint="--by"
        )
    return keys


def stats_rows(
    con, by: Sequence[str], session: str | None = None, host: str | None = None, model: str | None = None
) -> tuple[list[str], list[tuple]]:
    """The `stats` computation (columns, rows): the code path the CLI and bench/bench_stats.py time."""
    from .metrics import summary_sql

    cond, params = _filters(session, host, model)
    cur = con.execute(summary_sql(list(by), cond), params)
    return [d[0] for d in cur.description], cur.fetchall()


STATS_TABLE = [  # (header, column) shown in the terminal; --json/--csv give every column
    ("streams", "streams"),
    ("errors", "errors"),
    ("TTFB\np50", summary_column("ttfb_ms", "p50")),
    *((f"TTFT\n{q}", summary_column("ttft_ms", q)) for _, q in QUANTILES),
    *((f"ITL\n{q}", summary_column("itl_p50_ms", q)) for _, q in QUANTILES),
    ("TPOT\np50", summary_column("tpot_ms", "p50")),
    ("tok/s\np50", summary_column("tokens_per_s", "p50")),
    ("E2E\np50", summary_column("e2e_ms", "p50")),
    ("E2E\np99", summary_column("e2e_ms", "p99")),
]


STATS_TABLE_NARROW = [  # for terminals under 120 columns
    ("streams", "streams"),
    ("errors", "errors"),
    ("TTFT\np50", summary_column("ttft_ms", "p50")),
    ("TTFT\np99", summary_column("ttft_ms", "p99")),
    ("ITL\np50", summary_column("itl_p50_ms", "p50")),
    ("ITL\np99", summary_column("itl_p50_ms", "p99")),
    ("tok/s\np50", summary_column("tokens_per_s", "p50")),
    ("E2E\np50", summary_column("e2e_ms", "p50")),
]


def render_stats(
    console, by: Sequence[str], cols: list[str], rows: list[tuple], title: str | None = None
) -> None:
    """The stats table for people (also printed by `mitm-sse demo`)."""
    shown = STATS_TABLE if console.width >= 120 else STATS_TABLE_NARROW
    spec = [(k, "left") for k in by] + [(h, "right") for h, _ in shown]
    out = []
    for r in rows:
        d = dict(zip(cols, r, strict=True))
        cells = [str(d[k]) if d[k] is not None else "" for k in by]
        for _, c in shown:
            v = d[c]
            if c in ("streams", "errors"):
                cells.append(fmt_num(v))
            elif c.startswith("tokens_per_s"):
                cells.append(fmt_num(v))
            else:  # milliseconds, unit in the caption: narrow columns fit an 80-120 column terminal
                cells.append(fmt_num(v, 0 if v is not None and abs(v) >= 100 else 1))
        out.append(cells)
    console.print(_table(title, spec, out))
    console.print(
        "[dim]times in ms, percentiles across streams; ITL = each stream's median gap between content "
        "events (--pooled-itl: every gap pooled, as vLLM)[/dim]"
    )


@main.command("stats")
@_dir_option
@click.option(
    "--by",
    default="host,model",
    show_default=True,
    help=f"Group by: {', '.join(GROUPS)} (comma-separated, or '' for one row).",
)
@click.option("--session", help="Only this session label.")
@click.option("--host", help="Only this host.")
@click.option("--model", help="Only this model.")
@click.option("--pooled-itl", is_flag=True, help="Also ITL percentiles over every gap pooled (scans events).")
@click.option("--json", "as_json", is_flag=True, help="JSON array on stdout (every percentile).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout (every percentile).")
@_user_errors
def stats_cmd(
    dir_: Path | None,
    by: str,
    session: str | None,
    host: str | None,
    model: str | None,
    pooled_itl: bool,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Latency percentiles (p50/p90/p99) grouped by host, model, session, provider, path, status."""
    mode = _output_mode(as_json, as_csv)
    keys = _parse_by(by)
    con = _open(dir_)
    cols, rows = stats_rows(con, keys, session, host, model)
    pcols, prows = [], []
    if pooled_itl:
        from .metrics import pooled_itl_sql

        cond, params = _filters(session, host, model)
        cur = con.execute(pooled_itl_sql(keys, cond), params)
        pcols, prows = [d[0] for d in cur.description], cur.fetchall()
    if mode == "json":
        out: Any = [dict(zip(cols, r, strict=True)) for r in rows]
        if pooled_itl:
            out = {"streams": out, "pooled_itl": [dict(zip(pcols, r, strict=True)) for r in prows]}
        _print_json(out)
        return
    if mode == "csv":
        _print_csv(cols, rows)
        return
    console = _console()
    if not rows or (not keys and rows[0][cols.index("streams")] == 0):
        console.print(f"no streams in {_capture_dir(dir_)}")
        return
    render_stats(console, keys, cols, rows)
    if pooled_itl:
        spec = [(k, "left") for k in keys] + [("gaps", "right"), ("mean", "right")]
        spec += [(f"ITL {q}", "right") for _, q in QUANTILES]
        body = []
        for r in prows:
            d = dict(zip(pcols, r, strict=True))
            body.append(
                [str(d[k]) for k in keys]
                + [fmt_num(d["gaps"]), fmt_ms(d["itl_mean"])]
                + [fmt_ms(d[f"itl_{q}"]) for _, q in QUANTILES]
            )
        console.print(_table("pooled inter-token latency", spec, body))


# ---- sql ----------------------------------------------------------------------------------------------
READ_ONLY_TYPES = ("SELECT", "EXPLAIN")


def check_read_only(query: str) -> list[str]:
    """The statements of `query` if every one only reads; UserError otherwise.

    DuckDB parses DESCRIBE, SHOW, SUMMARIZE, FROM-first and VALUES as SELECT; PRAGMA, SET, COPY, ATTACH,
    INSTALL/LOAD, CALL and every write have their own statement types and are refused. EXPLAIN ANALYZE runs
    its statement, so the statement under an EXPLAIN is checked too.
    """
    import duckdb

    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(" ".join(str(e).split())) from None
    if not stmts:
        raise UserError("empty query")
    out = []
    for s in stmts:
        kind = s.type.name
        if kind not in READ_ONLY_TYPES:
            raise UserError(
                f"only read-only queries are allowed (SELECT, WITH, EXPLAIN, DESCRIBE, SHOW, SUMMARIZE); "
                f"refused a {kind} statement"
            )
        if kind == "EXPLAIN":
            inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", s.query, flags=re.IGNORECASE)
            check_read_only(inner)
        out.append(s.query)
    return out


def _lock_down(con, capture: Path) -> None:
    """Second fence behind the statement check: files outside the capture are out of reach, settings frozen."""
    con.execute("SET allowed_directories = ?", [[str(capture) + os.sep]])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


@main.command("sql")
@_dir_option
@click.argument("query")
@click.option("--limit", default=200, show_default=True, help="Rows shown in the table (JSON/CSV: all).")
@click.option("--json", "as_json", is_flag=True, help="JSON array of objects on stdout.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@_user_errors
def sql_cmd(dir_: Path | None, query: str, limit: int, as_json: bool, as_csv: bool) -> None:
    """Run a read-only SQL query over the views streams, chunks, events, stream_latency, itl_gaps.

    \b
    mitm-sse sql "SELECT model, count(*) FROM streams GROUP BY ALL"
    """
    mode = _output_mode(as_json, as_csv)
    stmts = check_read_only(query)
    con = _open(dir_)
    _lock_down(con, _capture_dir(dir_))
    for s in stmts[:-1]:
        con.execute(s)
    cur = con.execute(stmts[-1])
    if cur.description is None:
        return
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    if mode == "json":
        _print_json([dict(zip(cols, r, strict=True)) for r in rows])
    elif mode == "csv":
        _print_csv(cols, rows)
    else:
        console = _console()
        shown = [[_cell(v) for v in r] for r in rows[:limit]]
        console.print(_table(None, [(c, "left") for c in cols], shown))
        more = len(rows) - len(shown)
        console.print(
            f"[dim]{len(rows)} rows" + (f", {more} not shown (--limit)" if more > 0 else "") + "[/dim]"
        )


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bytes | bytearray):
        s = bytes(v).decode("utf-8", "backslashreplace")
        return s if len(s) <= 80 else s[:77] + "…"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s if len(s) <= 200 else s[:197] + "…"


# ---- show ---------------------------------------------------------------------------------------------
def find_stream(con, prefix: str) -> str:
    """The one stream whose ID starts with `prefix` (UserError if none or several)."""
    rows = con.execute(
        "SELECT stream_id FROM streams WHERE starts_with(stream_id, ?) ORDER BY stream_id LIMIT 6", [prefix]
    ).fetchall()
    if not rows and prefix:
        # IDs begin with the time, so concurrent streams share long prefixes; plots label them by their end.
        rows = con.execute(
            "SELECT stream_id FROM streams WHERE ends_with(stream_id, ?) ORDER BY stream_id LIMIT 6", [prefix]
        ).fetchall()
    if not rows:
        raise UserError(f"no stream with an ID starting with {prefix!r} (see `mitm-sse ls`)")
    if len(rows) > 1:
        ids = ", ".join(r[0] for r in rows[:5])
        raise UserError(f"{prefix!r} is ambiguous: {ids}{', …' if len(rows) > 5 else ''}")
    return rows[0][0]


def _reconstruct(stream: dict[str, Any], events: list[tuple[str, str]]):
    from .providers import RequestInfo, reconstruct

    req_json = None
    body = stream.get("request_body")
    if body and body.lstrip()[:1] == "{":
        try:
            req_json = json.loads(body)
        except ValueError:
            req_json = None
    info = RequestInfo(
        method=stream.get("method") or "",
        host=stream.get("host") or "",
        path=stream.get("path") or "",
        query=stream.get("query") or "",
        content_type=(stream.get("content_type") or "").lower(),
        request_json=req_json if isinstance(req_json, dict) else None,
    )
    return reconstruct(info, events)


@main.command("show")
@_dir_option
@click.argument("stream_id")
@click.option("-e", "--events", "max_events", default=40, show_default=True, help="Events listed (0: all).")
@click.option("--width", default=60, show_default=True, help="Width of the text timeline.")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@_user_errors
def show_cmd(dir_: Path | None, stream_id: str, max_events: int, width: int, as_json: bool) -> None:
    """One stream: metadata, latency, events with timing, the reconstructed text and tool calls, a timeline.

    STREAM_ID may be any unique prefix of the ID shown by `mitm-sse ls`, or a unique suffix (as the
    notebooks' timeline labels show them).
    """
    from .analysis import text_timeline

    con = _open(dir_)
    sid = find_stream(con, stream_id)
    cur = con.execute("SELECT * EXCLUDE (request_body_raw) FROM streams WHERE stream_id = ?", [sid])
    stream = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    cur = con.execute(
        """SELECT ttfb_ms, ttft_ms, e2e_ms, itl_p50_ms, itl_p95_ms, itl_p99_ms, itl_max_ms, tpot_ms,
                  output_tokens, output_tokens_source, tokens_per_s FROM stream_latency WHERE stream_id = ?""",
        [sid],
    )
    lat = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
    t0 = stream["t_request_ns"] or stream["t_headers_ns"]
    ev_rows = con.execute(
        """SELECT seq, chunk_seq, t_ns, event, data, id, retry, delta_text, content_kind
           FROM events WHERE stream_id = ? ORDER BY seq""",
        [sid],
    ).fetchall()
    chunk_rows = con.execute(
        "SELECT seq, t_ns, delta_ns, size FROM chunks WHERE stream_id = ? ORDER BY seq", [sid]
    ).fetchall()
    rec = _reconstruct(stream, [(e[3] or "message", e[4] or "") for e in ev_rows])
    if as_json:
        _print_json(
            {
                "stream": stream,
                "latency": lat,
                "events": [
                    {
                        "seq": e[0],
                        "chunk_seq": e[1],
                        "offset_ms": (e[2] - t0) / 1e6,
                        "event": e[3],
                        "data": e[4],
                        "id": e[5],
                        "retry": e[6],
                        "delta_text": e[7],
                        "content_kind": e[8],
                    }
                    for e in ev_rows
                ],
                "chunks": [{"seq": c[0], "offset_ms": (c[1] - t0) / 1e6, "size": c[3]} for c in chunk_rows],
                "reconstruction": rec.__dict__,
            }
        )
        return

    from rich.markup import escape
    from rich.panel import Panel

    console = _console()
    head = [
        f"[bold]{escape(stream['method'] or '')} {escape(stream['url'] or '')}[/bold]",
        f"status {stream['status']}  ·  {stream['end_reason'] or 'open'}"
        + (f"  ·  error: {escape(stream['error'])}" if stream.get("error") else "")
        + (
            f"  ·  provider error: {escape(stream['provider_error'])}" if stream.get("provider_error") else ""
        ),
        f"started {fmt_time(t0)}  ·  session {stream['session'] or '–'}  ·  provider {stream['provider'] or '–'}"
        f"  ·  model {escape(stream['model'] or '–')}",
        f"tokens in {fmt_num(stream['input_tokens'])} / out {fmt_num(lat['output_tokens'])}"
        f" ({lat['output_tokens_source']})  ·  stop {stream['stop_reason'] or '–'}"
        f"  ·  {fmt_num(stream['n_chunks'])} chunks, {fmt_num(stream['n_events'])} events,"
        f" {fmt_num(stream['n_bytes'])} bytes",
        f"TTFB {fmt_ms(lat['ttfb_ms'])}  ·  TTFT {fmt_ms(lat['ttft_ms'])}  ·  E2E {fmt_ms(lat['e2e_ms'])}"
        f"  ·  ITL p50 {fmt_ms(lat['itl_p50_ms'])} p95 {fmt_ms(lat['itl_p95_ms'])}"
        f" max {fmt_ms(lat['itl_max_ms'])}  ·  TPOT {fmt_ms(lat['tpot_ms'])}"
        f"  ·  {fmt_num(lat['tokens_per_s'])} tok/s",
    ]
    console.print(Panel("\n".join(head), title=sid, title_align="left"))

    # Timeline: one cell per (total / width) ms; bars = chunk arrivals, marks under it = headers, first token.
    total = lat["e2e_ms"] or ((chunk_rows[-1][1] - t0) / 1e6 if chunk_rows else 0.0)
    offs = [(c[1] - t0) / 1e6 for c in chunk_rows]
    if offs and width > 0:
        bars = text_timeline(offs, total, width)
        marks = [" "] * width
        for val, ch in ((lat["ttfb_ms"], "H"), (lat["ttft_ms"], "T")):
            if val is not None and total:
                marks[min(int(val / total * width), width - 1)] = ch
        console.print("[bold]chunk arrivals[/bold]")
        console.print(f"│{bars}│ {fmt_ms(total)}", markup=False)
        console.print(f" {''.join(marks)}  H headers, T first token", markup=False)

    if ev_rows:
        shown = ev_rows if max_events <= 0 else ev_rows[:max_events]
        body, prev = [], None
        for e in shown:
            off = (e[2] - t0) / 1e6
            gap = "" if prev is None else f"+{(e[2] - prev) / 1e6:.1f}"
            prev = e[2]
            txt = e[7] if e[7] is not None else (e[4] or "")
            txt = txt.replace("\n", "⏎")
            body.append(
                [
                    str(e[0]),
                    f"{off:.1f}",
                    gap,
                    escape(e[3] or ""),
                    e[8] or "",
                    escape(txt if len(txt) <= 90 else txt[:89] + "…"),
                ]
            )
        spec = [
            ("#", "right"),
            ("ms", "right"),
            ("gap", "right"),
            ("event", "left"),
            ("kind", "left"),
            ("data / text", "left"),
        ]
        console.print(_table(f"events ({len(ev_rows)})", spec, body))
        if len(shown) < len(ev_rows):
            console.print(f"[dim]… {len(ev_rows) - len(shown)} more events (-e 0 shows all)[/dim]")
    if rec.reasoning:
        console.print(Panel(escape(rec.reasoning), title="reasoning", title_align="left", style="dim"))
    if rec.text:
        console.print(Panel(escape(rec.text), title="text", title_align="left"))
    if rec.refusal:
        console.print(Panel(escape(rec.refusal), title="refusal", title_align="left"))
    for tc in rec.tool_calls:
        console.print(
            Panel(
                escape(tc.get("arguments") or ""),
                title=f"tool call {tc.get('name')} ({tc.get('id')})",
                title_align="left",
            )
        )
    if rec.error:
        console.print(f"[red]provider error:[/red] {escape(str(rec.error))}")


# ---- export -------------------------------------------------------------------------------------------
def _selection(con, sessions: Sequence[str], streams: Sequence[str]) -> list[str]:
    ids: list[str] = []
    if sessions:
        ids += [
            r[0]
            for r in con.execute(
                "SELECT stream_id FROM streams WHERE session IN (SELECT unnest(?))", [list(sessions)]
            ).fetchall()
        ]
        found = {
            r[0]
            for r in con.execute(
                "SELECT DISTINCT session FROM streams WHERE session IN (SELECT unnest(?))", [list(sessions)]
            ).fetchall()
        }
        missing = [s for s in sessions if s not in found]
        if missing:
            raise UserError(f"no streams in session {', '.join(map(repr, missing))}")
    ids += [find_stream(con, p) for p in streams]
    if not sessions and not streams:
        ids = [r[0] for r in con.execute("SELECT stream_id FROM streams").fetchall()]
    return sorted(set(ids))


def export_capture(src: Path, out: Path, stream_ids: Sequence[str], fmt: str) -> dict[str, int]:
    """Copy the given streams (all three tables) to a .duckdb file with real tables, or a Parquet capture folder.

    Returns rows per table.
    """
    from .capture import open_capture, write_views_db
    from .metrics import METRIC_VIEWS_SQL
    from .store import CaptureDir

    con = open_capture(src)
    con.execute("CREATE TEMP TABLE _sel AS SELECT unnest(?::VARCHAR[]) AS stream_id", [list(stream_ids)])
    selects = {
        "streams": "SELECT * FROM streams WHERE stream_id IN (SELECT stream_id FROM _sel)",
        "chunks": "SELECT * FROM chunks WHERE stream_id IN (SELECT stream_id FROM _sel) ORDER BY stream_id, seq",
        "events": "SELECT * FROM events WHERE stream_id IN (SELECT stream_id FROM _sel) ORDER BY stream_id, seq",
    }
    counts = {}
    if fmt == "duckdb":
        con.execute("ATTACH ? AS out", [str(out)])
        for t, q in selects.items():
            con.execute(f"CREATE TABLE out.{t} AS {q}")
            counts[t] = con.execute(f"SELECT count(*) FROM out.{t}").fetchone()[0]
        con.execute("USE out")  # the metric views must bind to out's tables, by unqualified names
        con.execute(METRIC_VIEWS_SQL)
        con.execute("USE memory")
        con.execute("DETACH out")
        os.chmod(out, 0o600)
        return counts
    # Parquet: a capture folder (same layout the recorder writes), so every command and the mock read it.
    cap = CaptureDir(out)
    cap.ensure()
    day = f"day={dt.datetime.now(dt.UTC):%Y-%m-%d}"
    selects["streams"] = (
        "SELECT * FROM streams_revisions WHERE stream_id IN (SELECT stream_id FROM _sel) "
        "QUALIFY row_number() OVER (PARTITION BY stream_id ORDER BY rev DESC, t_updated_ns DESC) = 1"
    )
    for t, q in selects.items():
        part = cap.path / t / day
        part.mkdir(mode=0o700, parents=True, exist_ok=True)
        f = part / "export.parquet"
        con.execute(
            f"COPY ({q}) TO '{str(f).replace(chr(39), chr(39) * 2)}' (FORMAT parquet, COMPRESSION zstd)"
        )
        os.chmod(f, 0o600)
        counts[t] = con.execute(
            f"SELECT count(*) FROM read_parquet('{str(f).replace(chr(39), chr(39) * 2)}')"
        ).fetchone()[0]
    write_views_db(cap)
    return counts


@main.command("export")
@_dir_option
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--session", "sessions", multiple=True, help="Export this session (repeatable).")
@click.option("--stream", "streams", multiple=True, help="Export this stream ID or prefix (repeatable).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["duckdb", "parquet"]),
    default=None,
    help="duckdb: one self-contained file with tables (default for *.duckdb / *.db); "
    "parquet: a capture folder (default otherwise).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing .duckdb file.")
@_user_errors
def export_cmd(
    dir_: Path | None,
    out: Path,
    sessions: tuple[str, ...],
    streams: tuple[str, ...],
    fmt: str | None,
    force: bool,
) -> None:
    """Export chosen sessions or streams (default: everything) to OUT.

    \b
    mitm-sse export run1.duckdb --session run1      # duckdb run1.duckdb "FROM stream_latency"
    mitm-sse export ./run1 --session run1           # a capture folder: mitm-sse ls --dir ./run1
    """
    fmt = fmt or ("duckdb" if out.suffix in (".duckdb", ".db") else "parquet")
    src = _capture_dir(dir_)
    if out.exists():
        if fmt == "duckdb" and out.is_file() and force:
            out.unlink()
            Path(str(out) + ".wal").unlink(missing_ok=True)
        elif fmt == "parquet" and out.is_dir() and not any(out.iterdir()):
            pass
        else:
            raise UserError(
                f"{out} exists" + (" (--force overwrites it)" if fmt == "duckdb" else "; choose a new path")
            )
    from .capture import open_capture

    con = open_capture(src)
    ids = _selection(con, sessions, streams)
    if not ids:
        raise UserError(f"nothing to export: no streams in {src}")
    counts = export_capture(src, out, ids, fmt)
    click.echo(
        f"exported {counts['streams']} streams, {counts['chunks']} chunks, {counts['events']} events to {out}"
        + (f'\n  duckdb {out} "FROM stream_latency"' if fmt == "duckdb" else f"\n  mitm-sse ls --dir {out}")
    )


# ---- record / mock ------------------------------------------------------------------------------------
def mitmdump_path() -> str:
    """mitmdump of this environment (next to the interpreter), else the one on PATH."""
    from .mitmdump_proc import find_mitmdump

    found = find_mitmdump()
    if found is None:
        raise UserError("mitmdump not found next to this Python or on PATH (pip install mitmproxy)")
    return found


def mitmdump_args(
    script: str,
    dir_: Path | None,
    host: str,
    port: int,
    sets: dict[str, str],
    extra: Sequence[str],
) -> list[str]:
    """The mitmdump command line for a mitm-sse script ('record.py' or 'mock.py')."""
    path = Path(__file__).resolve().parent / script
    if not path.is_file():
        raise UserError(f"{path} is missing: this mitm-sse install has no {script}")
    cmd = [mitmdump_path(), "-s", str(path), "--listen-host", host, "--listen-port", str(port)]
    cmd += ["--set", f"sse_dir={_capture_dir(dir_)}"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd + list(extra)


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise click.BadParameter(f"{p!r} is not KEY=VALUE", param_hint="--set")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out


def _launch(cmd: list[str], dry_run: bool, banner: str) -> None:
    if dry_run:
        import shlex

        click.echo(shlex.join(cmd))
        return
    click.echo(banner, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # mitmdump takes over this process: Ctrl-C and signals reach it directly


_PROXY_SETTINGS = {"ignore_unknown_options": True, "allow_interspersed_args": False}


def _proxy_options(f: Callable) -> Callable:
    for deco in reversed(
        [
            _dir_option,
            click.option(
                "--host", default="127.0.0.1", show_default=True, help="Listen address of the proxy."
            ),
            click.option("-p", "--port", default=8080, show_default=True, help="Listen port of the proxy."),
            click.option(
                "--filter", "filter_", help="mitmproxy filter expression, e.g. '~d api.openai.com'."
            ),
            click.option("--session", help="Session label for what is recorded."),
            click.option(
                "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any mitmproxy/mitm-sse option."
            ),
            click.option("--dry-run", is_flag=True, help="Print the mitmdump command instead of running it."),
            click.argument("mitm_args", nargs=-1, type=click.UNPROCESSED),
        ]
    ):
        f = deco(f)
    return f


@main.command("record", context_settings=_PROXY_SETTINGS)
@_proxy_options
@_user_errors
def record_cmd(
    dir_: Path | None,
    host: str,
    port: int,
    filter_: str | None,
    session: str | None,
    sets: tuple[str, ...],
    dry_run: bool,
    mitm_args: tuple[str, ...],
) -> None:
    """Run the recording proxy (mitmdump -s record.py). Arguments after -- go to mitmdump.

    \b
    mitm-sse record --session baseline
    HTTPS_PROXY=http://127.0.0.1:8080 SSL_CERT_FILE=~/.mitmproxy/mitmproxy-ca-cert.pem python app.py
    mitm-sse record -- --mode upstream:http://corp-proxy:3128
    """
    opts: dict[str, str] = {}
    if filter_:
        opts["sse_filter"] = filter_
    if session:
        opts["sse_session"] = session
    opts.update(_parse_sets(sets))
    cmd = mitmdump_args("record.py", dir_, host, port, opts, mitm_args)
    _launch(cmd, dry_run, f"mitm-sse: recording into {_capture_dir(dir_)}; proxy on http://{host}:{port}")


@main.command("mock", context_settings=_PROXY_SETTINGS)
@_proxy_options
@click.option(
    "--mode",
    type=click.Choice(["replay", "new", "all"]),
    help="replay: recordings only; new: record misses, then replay them; all: forward and record (sse_mode).",
)
@click.option("--speed", help="Replay speed: 1 recorded timing, 2 twice as fast, 0 instant (sse_mock_speed).")
@click.option("--miss", help="Answer to a request with no recording in replay mode: 404, 502 or forward.")
@_user_errors
def mock_cmd(
    dir_: Path | None,
    host: str,
    port: int,
    filter_: str | None,
    session: str | None,
    sets: tuple[str, ...],
    dry_run: bool,
    mitm_args: tuple[str, ...],
    mode: str | None,
    speed: str | None,
    miss: str | None,
) -> None:
    """Answer matching requests from the capture with the recorded timing (mitmdump -s mock.py).

    --session replays only that session's recordings. Arguments after -- go to mitmdump.

    \b
    mitm-sse mock --mode new --speed 0       # CI: replay instantly, record what is missing
    """
    opts: dict[str, str] = {}
    for key, val in (
        ("sse_filter", filter_),
        ("sse_mock_session", session),
        ("sse_mode", mode),
        ("sse_mock_speed", speed),
        ("sse_mock_miss", miss),
    ):
        if val:
            opts[key] = val
    opts.update(_parse_sets(sets))
    cmd = mitmdump_args("mock.py", dir_, host, port, opts, mitm_args)
    _launch(cmd, dry_run, f"mitm-sse: mocking from {_capture_dir(dir_)}; proxy on http://{host}:{port}")


# ---- demo ---------------------------------------------------------------------------------------------
@main.command("demo")
@click.option(
    "--dir",
    "dir_",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the demo capture (default: a fresh demo-<time> folder next to the default capture).",
)
@click.option("--requests", "n_requests", default=24, show_default=True, help="Streaming requests to send.")
@click.option("--concurrency", default=6, show_default=True, help="Requests in flight at once.")
@click.option(
    "--speed", default=1.0, show_default=True, help="Fake server speed factor (4 = four times faster)."
)
@click.option("--seed", default=None, type=int, help="Seed the fake server's jitter.")
@_user_errors
def demo_cmd(dir_: Path | None, n_requests: int, concurrency: int, speed: float, seed: int | None) -> None:
    """Record a local fake LLM (OpenAI and Anthropic formats) through a real proxy, then show the stats.

    No network and no API key: everything runs on 127.0.0.1 and stops when done.
    """
    from .demo import DemoError, run_demo

    if n_requests < 1 or concurrency < 1 or speed <= 0:
        raise click.UsageError("--requests and --concurrency must be ≥ 1 and --speed > 0")
    try:
        result = run_demo(dir_, n_requests=n_requests, concurrency=concurrency, speed=speed, seed=seed)
    except DemoError as e:
        raise UserError(str(e)) from None
    if result.captured == 0:
        raise UserError(f"nothing was captured in {result.dir}")


# ---- commands written elsewhere -----------------------------------------------------------------------
try:
    from .doctor import doctor

    main.add_command(doctor, "doctor")
except ImportError:  # optional module: the CLI works without it
    pass
try:
    from .validate import replay_cmd

    main.add_command(replay_cmd, "replay")
except ImportError:
    pass


if __name__ == "__main__":
    main()
