"""Request matching for the mock: canonical request keys, the recording index, and miss explanations.

A request matches a recording when method, host, port, path, query and body are equal after
canonicalisation:
- query: parameters sorted; parameters named in `sse_redact_params` compare as "[REDACTED]" on both sides
  (the recorder never stored their values); ignored parameters dropped.
- body: JSON bodies are parsed and re-serialised with sorted keys and no whitespace, ignored fields
  removed; any other body compares byte for byte.
- headers: none by default; `sse_mock_headers` lists header names that must match too.

Ignore syntax (`sse_mock_ignore`, comma-separated):
    metadata.user_id      a JSON body field, dotted path; `*` matches any key or list item (messages.*.id)
    body:metadata.user_id the same, explicit
    query:ts              a query parameter
    header:x-request-id   a header (only meaningful for names listed in sse_mock_headers)

Pure Python (no mitmproxy, no DuckDB) so it is cheap to test and to reuse from `replay --validate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

REDACTED = "[REDACTED]"
_MISSING = object()


@dataclass(frozen=True)
class IgnoreSpec:
    body_paths: tuple[tuple[str, ...], ...] = ()
    query: frozenset[str] = frozenset()
    headers: frozenset[str] = frozenset()


def parse_ignore(spec: str) -> IgnoreSpec:
    """Parse `sse_mock_ignore`; ValueError with a readable message on bad input."""
    body: list[tuple[str, ...]] = []
    query: set[str] = set()
    headers: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        kind, sep, name = item.partition(":")
        if not sep:
            kind, name = "body", item
        kind, name = kind.strip().lower(), name.strip()
        if not name:
            raise ValueError(f"empty name in {item!r}")
        if kind == "body":
            parts = tuple(name.split("."))
            if any(not p for p in parts):
                raise ValueError(f"bad JSON path {name!r} (use dotted keys, e.g. metadata.user_id)")
            body.append(parts)
        elif kind == "query":
            query.add(name)
        elif kind == "header":
            headers.add(name.lower())
        else:
            raise ValueError(f"unknown kind {kind!r} in {item!r} (use body:, query: or header:)")
    return IgnoreSpec(tuple(body), frozenset(query), frozenset(headers))


def _drop_path(obj: Any, path: tuple[str, ...]) -> None:
    if not path:
        return
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        keys = list(obj) if head == "*" else ([head] if head in obj else [])
        for k in keys:
            if rest:
                _drop_path(obj[k], rest)
            else:
                del obj[k]
    elif isinstance(obj, list):
        if head == "*":
            idx = range(len(obj))
        elif head.isdigit() and int(head) < len(obj):
            idx = range(int(head), int(head) + 1)
        else:
            return
        if rest:
            for i in idx:
                _drop_path(obj[i], rest)
        elif head != "*":
            obj[int(head)] = None  # keep positions of later items stable
        else:
            obj.clear()


def canonical_body(body: bytes | None, ignore: IgnoreSpec) -> tuple[str, Any]:
    """('json', parsed-and-pruned) for JSON bodies, ('raw', bytes) otherwise, ('none', b'') if empty."""
    if not body:
        return ("none", b"")
    stripped = body.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            obj = json.loads(body)
        except ValueError:
            return ("raw", bytes(body))
        for p in ignore.body_paths:
            _drop_path(obj, p)
        return ("json", obj)
    return ("raw", bytes(body))


def _body_key(canon: tuple[str, Any]) -> str | bytes:
    kind, val = canon
    if kind == "json":
        return "j" + json.dumps(val, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return val


def canonical_query(query: str, ignore: IgnoreSpec, redact_params: frozenset[str]) -> tuple:
    pairs = []
    for k, v in parse_qsl(query or "", keep_blank_values=True):
        if k in ignore.query:
            continue
        if k.lower() in redact_params:
            v = REDACTED
        pairs.append((k, v))
    return tuple(sorted(pairs))


@dataclass
class RequestView:
    """What matching needs of a request (live or recorded)."""

    method: str
    host: str
    port: int
    path: str
    query: str
    body: bytes | None
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names

    def describe(self) -> dict[str, Any]:
        body = self.body or b""
        return {
            "method": self.method,
            "host": self.host,
            "port": self.port,
            "path": self.path,
            "query": self.query,
            "body": body[:2000].decode("utf-8", "replace"),
        }


@dataclass
class Recording:
    """One recorded response the mock can play (a row of the `streams` view)."""

    stream_id: str
    session: str
    kind: str
    request: RequestView
    status: int
    response_headers: list[tuple[str, str]]
    content_encoding: str | None
    t_request_ns: int
    t_headers_ns: int
    t_end_ns: int
    end_reason: str
    error: str | None
    n_chunks: int
    url: str = ""

    @property
    def faulted(self) -> bool:
        return self.end_reason != "complete"


@dataclass(frozen=True)
class MatchConfig:
    ignore: IgnoreSpec = IgnoreSpec()
    redact_params: frozenset[str] = frozenset()
    match_headers: frozenset[str] = frozenset()  # lower-case
    redact_headers: frozenset[str] = frozenset()  # lower-case


def request_key(req: RequestView, cfg: MatchConfig) -> tuple:
    # Headers the recorder redacts (sse_redact) compare as "any value" on both sides, like query params.
    headers = tuple(
        (h, None if h in cfg.redact_headers or req.headers.get(h) == REDACTED else req.headers.get(h))
        for h in sorted(cfg.match_headers - cfg.ignore.headers)
    )
    return (
        req.method.upper(),
        req.host.lower(),
        int(req.port),
        req.path,
        canonical_query(req.query, cfg.ignore, cfg.redact_params),
        _body_key(canonical_body(req.body, cfg.ignore)),
        headers,
    )


class Index:
    """Recordings grouped by request key, in recorded order, with a per-key replay cursor."""

    def __init__(self, cfg: MatchConfig, cycle: bool = False) -> None:
        self.cfg = cfg
        self.cycle = cycle
        self.by_key: dict[tuple, list[Recording]] = {}
        self.recordings: dict[str, Recording] = {}
        self.cursor: dict[tuple, int] = {}

    def __len__(self) -> int:
        return len(self.recordings)

    def add(self, rec: Recording) -> bool:
        if rec.stream_id in self.recordings:
            return False
        self.recordings[rec.stream_id] = rec
        lst = self.by_key.setdefault(self._key(rec.request), [])
        lst.append(rec)
        lst.sort(key=lambda r: (r.t_request_ns or 0, r.stream_id))
        return True

    def _key(self, req: RequestView) -> tuple:
        return request_key(req, self.cfg)

    def lookup(self, req: RequestView) -> tuple | None:
        key = self._key(req)
        return key if key in self.by_key else None

    def take(self, key: tuple) -> Recording:
        """The next recording for this key: recorded order, then the last repeats (or all cycle)."""
        lst = self.by_key[key]
        i = self.cursor.get(key, 0)
        self.cursor[key] = i + 1
        if i < len(lst):
            return lst[i]
        return lst[i % len(lst)] if self.cycle else lst[-1]

    def closest(self, req: RequestView, limit: int = 1) -> list[tuple[Recording, list[str]]]:
        """Recordings nearest to `req`, each with a human-readable list of what differs."""
        scored = []
        for rec in self.recordings.values():
            diffs, score = explain(req, rec.request, self.cfg)
            scored.append((score, rec.t_request_ns or 0, rec, diffs))
        scored.sort(key=lambda s: (s[0], -s[1]))
        return [(rec, diffs) for _, _, rec, diffs in scored[:limit]]


# Weights: a different host is "further" than a different body field.
_W = {"method": 8, "host": 16, "port": 8, "path": 12, "query": 3, "body": 2, "header": 1}


def explain(live: RequestView, rec: RequestView, cfg: MatchConfig) -> tuple[list[str], int]:
    diffs: list[str] = []
    score = 0
    if live.method.upper() != rec.method.upper():
        diffs.append(f"method: {live.method} (recorded {rec.method})")
        score += _W["method"]
    if live.host.lower() != rec.host.lower():
        diffs.append(f"host: {live.host} (recorded {rec.host})")
        score += _W["host"]
    if int(live.port) != int(rec.port):
        diffs.append(f"port: {live.port} (recorded {rec.port})")
        score += _W["port"]
    if live.path != rec.path:
        diffs.append(f"path: {live.path} (recorded {rec.path})")
        score += _W["path"]
    lq = dict(canonical_query(live.query, cfg.ignore, cfg.redact_params))
    rq = dict(canonical_query(rec.query, cfg.ignore, cfg.redact_params))
    for k in sorted(set(lq) | set(rq)):
        if lq.get(k) != rq.get(k):
            diffs.append(f"query {k}: {lq.get(k)!r} (recorded {rq.get(k)!r})")
            score += _W["query"]
    lb = canonical_body(live.body, cfg.ignore)
    rb = canonical_body(rec.body, cfg.ignore)
    if _body_key(lb) != _body_key(rb):
        if lb[0] == rb[0] == "json":
            paths = list(json_diff(lb[1], rb[1]))
            for p in paths[:10]:
                diffs.append(f"body {p}")
            if len(paths) > 10:
                diffs.append(f"body: {len(paths) - 10} more differences")
            score += _W["body"] * min(len(paths), 10)
        else:
            diffs.append(f"body: {len(live.body or b'')} bytes (recorded {len(rec.body or b'')} bytes)")
            score += _W["body"] * 5
    for h in sorted(cfg.match_headers - cfg.ignore.headers):
        lv, rv = live.headers.get(h), rec.headers.get(h)
        if lv != rv and rv != REDACTED and h not in cfg.redact_headers:
            diffs.append(f"header {h}: {lv!r} (recorded {rv!r})")
            score += _W["header"]
    return diffs, score


def json_diff(a: Any, b: Any, path: str = "") -> Iterable[str]:
    """Dotted paths where the live value `a` differs from the recorded `b`."""
    here = path or "(root)"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                yield f"{p}: not in the recording"
            elif k not in a:
                yield f"{p}: missing (recorded {_short(b[k])})"
            else:
                yield from json_diff(a[k], b[k], p)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{here}: {len(a)} items (recorded {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            yield from json_diff(x, y, f"{path}.{i}" if path else str(i))
    elif a != b or type(a) is not type(b):
        yield f"{here}: {_short(a)} (recorded {_short(b)})"


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."
