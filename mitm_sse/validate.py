"""`mitm-sse replay --validate`: are the recordings still what the live service sends?

Each recorded request is sent again to the live upstream, and the live response's *shape* is compared with
the recording's: the status, the event types in order (runs of the same type collapsed, since a new
answer has a different number of deltas) and the JSON field structure of the event data (field paths and
value types, per event type, over the whole stream; null matches any type). Texts and numbers are not
compared: they change on every call.

Secrets never reach disk, so a recorded header or query parameter whose value is "[REDACTED]" is filled in
from, in this order: `--header NAME=VALUE` / `--param NAME=VALUE`, then the environment variables
`MITM_SSE_HEADER_<NAME>` / `MITM_SSE_PARAM_<NAME>` (upper case, `-` as `_`, e.g.
`MITM_SSE_HEADER_X_API_KEY`). A stream that would need a value nobody gave is skipped, never sent with
"[REDACTED]" (or `--drop-redacted` sends it without that header / parameter).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click

from .matching import REDACTED

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)
DROP_REQUEST = HOP_BY_HOP | {"content-length", "accept-encoding", "proxy-authorization"}


class MissingSecret(Exception):
    pass


# ---- shapes ---------------------------------------------------------------------------------------------
@dataclass
class Shape:
    status: int
    events: list[str] = field(default_factory=list)  # event types in order, runs collapsed
    fields: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # type -> path -> value types
    truncated: bool = False


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def json_paths(v: Any, prefix: str = "", out: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Field paths of a JSON value with the types seen at each (list items share the path `[]`)."""
    out = {} if out is None else out
    out.setdefault(prefix or "$", set()).add(_json_type(v))
    if isinstance(v, dict):
        for k, x in v.items():
            json_paths(x, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(v, list):
        for x in v:
            json_paths(x, f"{prefix}[]", out)
    return out


def shape_of(status: int, events: Iterable[tuple[str, str]], truncated: bool = False) -> Shape:
    sh = Shape(status=status, truncated=truncated)
    for etype, data in events:
        if not sh.events or sh.events[-1] != etype:
            sh.events.append(etype)
        try:
            obj = json.loads(data)
        except ValueError:
            obj = data if data else None
        if obj is None:
            continue
        paths = sh.fields.setdefault(etype, {})
        for p, types in json_paths(obj).items():
            paths.setdefault(p, set()).update(types)
    return sh


def compare(recorded: Shape, live: Shape) -> list[str]:
    """What differs, in words; [] when the live response has the recorded shape."""
    diffs: list[str] = []
    if recorded.status != live.status:
        diffs.append(f"status {live.status} (recorded {recorded.status})")
    rec_ev, live_ev = recorded.events, live.events
    if live.truncated:  # an endless feed was cut by --max-seconds: compare what we saw
        rec_ev = rec_ev[: len(live_ev)]
    if rec_ev != live_ev:
        diffs.append(f"event types {_seq(live_ev)} (recorded {_seq(recorded.events)})")
    for etype in sorted(set(recorded.fields) & set(live.fields)):
        rf, lf = recorded.fields[etype], live.fields[etype]
        gone = sorted(set(rf) - set(lf))
        new = sorted(set(lf) - set(rf))
        if gone and not live.truncated:
            diffs.append(f"{etype}: fields gone: {', '.join(gone[:8])}")
        if new:
            diffs.append(f"{etype}: new fields: {', '.join(new[:8])}")
        for p in sorted(set(rf) & set(lf)):
            a, b = rf[p] - {"null"}, lf[p] - {"null"}
            if a and b and not (a & b):
                diffs.append(f"{etype}: {p} is {'/'.join(sorted(b))} (recorded {'/'.join(sorted(a))})")
    return diffs


def _seq(ev: list[str], n: int = 8) -> str:
    return "[" + ", ".join(ev[:n]) + (", ..." if len(ev) > n else "") + "]"


# ---- requests -------------------------------------------------------------------------------------------
def _env_name(kind: str, name: str) -> str:
    return f"MITM_SSE_{kind}_" + "".join(c if c.isalnum() else "_" for c in name.upper())


def fill_secrets(
    url: str,
    headers: Mapping[str, str],
    given_headers: Mapping[str, str],
    given_params: Mapping[str, str],
    env: Mapping[str, str],
    drop_redacted: bool = False,
) -> tuple[str, dict[str, str]]:
    """Replace every "[REDACTED]" header / query value; MissingSecret names what is needed."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name in DROP_REQUEST:
            continue
        if value == REDACTED:
            value = given_headers.get(name) or env.get(_env_name("HEADER", name))
            if value is None:
                if drop_redacted:
                    continue
                raise MissingSecret(
                    f"header {name}: give --header {name}=VALUE or set {_env_name('HEADER', name)}"
                )
        out[name] = value
    parts = urlsplit(url)
    if REDACTED in parts.query or "%5BREDACTED%5D" in parts.query:
        pairs = []
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if v == REDACTED:
                v = given_params.get(k) or env.get(_env_name("PARAM", k))
                if v is None:
                    if drop_redacted:
                        continue
                    raise MissingSecret(
                        f"query parameter {k}: give --param {k}=VALUE or set {_env_name('PARAM', k)}"
                    )
            pairs.append((k, v))
        url = urlunsplit(parts._replace(query=urlencode(pairs)))
    if any(REDACTED in v for v in out.values()) or REDACTED in url:  # belt and braces
        raise MissingSecret("a redacted value is left in the request")
    return url, out


def map_url(url: str, maps: list[tuple[str, str]]) -> str:
    for old, new in maps:
        if url.startswith(old):
            return new + url[len(old) :]
    return url


@dataclass
class Live:
    status: int
    content_type: str
    content_encoding: str | None
    body: list[bytes]
    truncated: bool


def send(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    timeout: float,
    max_seconds: float,
    context: ssl.SSLContext | None = None,
) -> Live:
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    try:
        hdrs = dict(headers)
        hdrs["accept-encoding"] = "identity"  # shapes do not depend on it, and we need not decode
        conn.request(method, target, body=body, headers=hdrs)
        resp = conn.getresponse()
        out: list[bytes] = []
        deadline = time.monotonic() + max_seconds
        truncated = False
        while True:
            data = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
            if not data:
                break
            out.append(data)
            if time.monotonic() > deadline:
                truncated = True
                break
        return Live(
            resp.status,
            resp.getheader("content-type", "") or "",
            resp.getheader("content-encoding"),
            out,
            truncated,
        )
    finally:
        conn.close()


def live_events(live: Live) -> list[tuple[str, str]]:
    from .contentdecode import make_decoder
    from .sse import make_parser, stream_kind

    dec = make_decoder(live.content_encoding)
    raw = [dec(b) if dec else b for b in live.body]
    kind = stream_kind(live.content_type)
    if kind is None:
        text = b"".join(raw).decode("utf-8", "replace")
        return [("body", text)] if text else []
    parser = make_parser(kind)
    evs = []
    for b in raw:
        evs.extend(parser.feed(b))
    if not live.truncated:
        evs.extend(parser.close())
    return [(e.event, e.data) for e in evs]


# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class Result:
    stream_id: str
    method: str
    url: str
    verdict: str  # same | changed | error | skipped
    differences: list[str] = field(default_factory=list)
    status: int | None = None
    recorded_status: int | None = None


def recorded_streams(con: Any, session: str | None, stream_ids: list[str] | None) -> list[dict[str, Any]]:
    sql = """
        SELECT stream_id, kind, method, url, status, request_headers_json, request_body, request_body_raw
        FROM streams WHERE end_reason IS NOT NULL AND end_reason <> 'client_disconnected'
    """
    params: list[Any] = []
    if session is not None:
        sql += " AND session = ?"
        params.append(session)
    if stream_ids:
        sql += " AND stream_id IN ?"
        params.append(stream_ids)
    sql += " ORDER BY t_request_ns"
    cols = ["stream_id", "kind", "method", "url", "status", "headers", "body", "body_raw"]
    return [dict(zip(cols, r, strict=True)) for r in con.execute(sql, params).fetchall()]


def recorded_shape(con: Any, row: dict[str, Any]) -> Shape:
    if row["kind"] == "body":
        from .contentdecode import make_decoder

        enc, ctype = con.execute(
            "SELECT content_encoding, content_type FROM streams WHERE stream_id = ?", [row["stream_id"]]
        ).fetchone()
        data = b"".join(
            d or b""
            for (d,) in con.execute(
                "SELECT data FROM chunks WHERE stream_id = ? ORDER BY seq", [row["stream_id"]]
            ).fetchall()
        )
        dec = make_decoder(enc)
        text = (dec(data) if dec else data).decode("utf-8", "replace")
        return shape_of(row["status"], [("body", text)] if text else [])
    evs = con.execute(
        "SELECT event, data FROM events WHERE stream_id = ? ORDER BY seq", [row["stream_id"]]
    ).fetchall()
    return shape_of(row["status"], evs)


def validate(
    capture: str | None,
    session: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    maps: list[tuple[str, str]] | None = None,
    stream_ids: list[str] | None = None,
    limit: int | None = None,
    timeout: float = 60.0,
    max_seconds: float = 60.0,
    drop_redacted: bool = False,
    insecure: bool = False,
    env: Mapping[str, str] | None = None,
) -> list[Result]:
    from .capture import open_capture

    env = os.environ if env is None else env
    given_h = {k.lower(): v for k, v in (headers or {}).items()}
    context = ssl._create_unverified_context() if insecure else ssl.create_default_context()
    con = open_capture(capture)
    results: list[Result] = []
    try:
        rows = recorded_streams(con, session, stream_ids)
        for row in rows[:limit] if limit else rows:
            url = map_url(row["url"], maps or [])
            res = Result(row["stream_id"], row["method"], url, "same", recorded_status=row["status"])
            results.append(res)
            try:
                req_headers = json.loads(row["headers"] or "{}")
                url, req_headers = fill_secrets(url, req_headers, given_h, params or {}, env, drop_redacted)
            except MissingSecret as e:
                res.verdict, res.differences = "skipped", [str(e)]
                continue
            res.url = _redact_url(url)
            body = row["body_raw"] if row["body_raw"] is not None else (row["body"] or "").encode()
            try:
                live = send(row["method"], url, req_headers, body or None, timeout, max_seconds, context)
                live_shape = shape_of(live.status, live_events(live), live.truncated)
            except Exception as e:  # network, TLS, decoding: report per stream, go on
                res.verdict, res.differences = "error", [f"{type(e).__name__}: {e}"]
                continue
            res.status = live.status
            res.differences = compare(recorded_shape(con, row), live_shape)
            if res.differences:
                res.verdict = "changed"
    finally:
        con.close()
    return results


def _redact_url(url: str) -> str:
    """For the report: never print the secrets we filled in."""
    parts = urlsplit(url)
    from .recorder import DEFAULT_REDACT_PARAMS

    secret = {p.strip() for p in DEFAULT_REDACT_PARAMS.split(",")}
    if not parts.query:
        return url
    pairs = [(k, REDACTED if k.lower() in secret else v) for k, v in parse_qsl(parts.query, True)]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="[]")))


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{v!r}: expected NAME=VALUE", param_hint=what)
        out[name.strip()] = value
    return out


def _print_table(results: list[Result]) -> None:
    width = min(60, max((len(f"{r.method} {r.url}") for r in results), default=10))
    for r in results:
        req = f"{r.method} {r.url}"
        req = req if len(req) <= width else req[: width - 3] + "..."
        first = r.differences[0] if r.differences else ""
        click.echo(f"{r.verdict:8} {r.stream_id:26} {req:{width}}  {first}")
        for d in r.differences[1:]:
            click.echo(f"{'':8} {'':26} {'':{width}}  {d}")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    click.echo(", ".join(f"{n} {v}" for v, n in sorted(counts.items())) or "no recorded streams")


def replay(
    validate_: bool,
    capture_dir: str | None,
    session: str | None,
    as_json: bool,
    header: tuple[str, ...],
    param: tuple[str, ...],
    map_urls: tuple[str, ...],
    stream_id: tuple[str, ...],
    limit: int | None,
    timeout: float,
    max_seconds: float,
    drop_redacted: bool,
    insecure: bool,
) -> None:
    """Replay recorded streams: mock them (mitmdump -s mitm_sse/mock.py), or --validate them against the
    live upstream to find stale recordings.

    Redacted secrets are filled from --header/--param or MITM_SSE_HEADER_<NAME> / MITM_SSE_PARAM_<NAME>.
    """
    if not validate_:
        from pathlib import Path

        script = Path(__file__).with_name("mock.py")
        click.echo("To answer requests from recordings, run the mock addon:\n")
        click.echo(f"  mitmdump -s {script}" + (f" --set sse_dir={capture_dir}" if capture_dir else ""))
        click.echo("\nTo check recordings against the live service: mitm-sse replay --validate")
        return
    maps = []
    for m in map_urls:
        old, sep, new = m.partition("=")
        if not sep:
            raise click.BadParameter(f"{m!r}: expected FROM=TO", param_hint="--map-url")
        maps.append((old, new))
    try:
        results = validate(
            capture_dir,
            session,
            headers=_pairs(header, "--header"),
            params=_pairs(param, "--param"),
            maps=maps,
            stream_ids=list(stream_id) or None,
            limit=limit,
            timeout=timeout,
            max_seconds=max_seconds,
            drop_redacted=drop_redacted,
            insecure=insecure,
        )
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps([asdict(r) for r in results], indent=2))
    else:
        _print_table(results)
    if any(r.verdict in ("changed", "error") for r in results):
        sys.exit(1)


_OPTIONS = [
    click.option(
        "--validate", "validate_", is_flag=True, help="Resend recorded requests and compare shapes."
    ),
    click.option("--dir", "capture_dir", default=None, help="Capture folder (default $MITM_SSE_DIR)."),
    click.option("--session", default=None, help="Only streams recorded in this session."),
    click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
    click.option("--header", multiple=True, help="NAME=VALUE for a redacted header (repeatable)."),
    click.option("--param", multiple=True, help="NAME=VALUE for a redacted query parameter (repeatable)."),
    click.option(
        "--map-url",
        "map_urls",
        multiple=True,
        help="FROM=TO: send requests whose URL starts with FROM to TO instead (repeatable).",
    ),
    click.option("--stream-id", multiple=True, help="Only these streams (repeatable)."),
    click.option("--limit", type=int, default=None, help="At most N streams."),
    click.option("--timeout", type=float, default=60.0, show_default=True, help="Socket timeout (s)."),
    click.option(
        "--max-seconds",
        type=float,
        default=60.0,
        show_default=True,
        help="Stop reading an endless stream after this long and compare what arrived.",
    ),
    click.option("--drop-redacted", is_flag=True, help="Send without the redacted values nobody supplied."),
    click.option("--insecure", is_flag=True, help="Do not verify upstream TLS certificates."),
]


def _build_command() -> click.Command:
    func = replay
    for opt in reversed(_OPTIONS):
        func = opt(func)
    return click.command("replay")(func)


# Registered by the main CLI (mitm_sse/cli.py): main.add_command(replay_cmd)
replay_cmd = _build_command()
