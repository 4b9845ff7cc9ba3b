"""Analysis helpers shared by the notebooks and the CLI: frames, percentiles, SLOs, bootstrap CIs, plots.

The notebooks keep no logic of their own: every number they show comes from a function here, so it is
tested and usable from any script. pandas and matplotlib are imported lazily, so `mitm-sse ls` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from .capture import open_capture

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

Source = str | os.PathLike[str] | duckdb.DuckDBPyConnection | None

LATENCY_METRICS = ("ttfb_ms", "ttft_ms", "e2e_ms", "itl_p50_ms", "itl_p95_ms", "tpot_ms", "tokens_per_s")
LABELS = {
    "ttfb_ms": "TTFB (ms)",
    "ttft_ms": "TTFT (ms)",
    "e2e_ms": "end-to-end (ms)",
    "itl_p50_ms": "ITL, stream median (ms)",
    "itl_p95_ms": "ITL, stream p95 (ms)",
    "itl_ms": "ITL (ms)",
    "tpot_ms": "TPOT (ms)",
    "tokens_per_s": "output tokens/s",
}


def capture_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The capture to analyse: `path` if given, else $MITM_SSE_DIR, else ~/.mitm-sse."""
    from .capture import resolve_dir

    return resolve_dir(path or os.environ.get("MITM_SSE_DIR") or None)


def connect(source: Source = None) -> duckdb.DuckDBPyConnection:
    """A connection with the capture views: pass a folder, or an open_capture connection (returned as is)."""
    if isinstance(source, duckdb.DuckDBPyConnection):
        return source
    return open_capture(capture_path(source))


def load_latency(source: Source = None, where: str = "", params: Sequence[Any] = ()) -> pd.DataFrame:
    """One row per stream from the `stream_latency` view (plus a `t_request` timestamp column)."""
    con = connect(source)
    cond = f"WHERE {where}" if where else ""
    df = con.execute(f"SELECT * FROM stream_latency {cond} ORDER BY t_request_ns", list(params)).fetchdf()
    import pandas as pd

    df["t_request"] = pd.to_datetime(df["t_request_ns"], unit="ns", utc=True)
    return df


def load_itl_gaps(source: Source = None, stream_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Every gap between consecutive content events (`itl_gaps` view) joined with the stream's labels."""
    con = connect(source)
    cond, params = "", []
    if stream_ids is not None:
        cond, params = "WHERE g.stream_id IN (SELECT unnest(?))", [list(stream_ids)]
    return con.execute(
        f"""SELECT g.stream_id, g.seq, g.itl_ms, s.session, s.host, s.model, s.provider
            FROM itl_gaps g JOIN stream_latency s USING (stream_id) {cond}""",
        params,
    ).fetchdf()


def percentiles(
    df: pd.DataFrame,
    by: str | Sequence[str] | None = ("model",),
    metrics: Sequence[str] = LATENCY_METRICS,
    qs: Sequence[float] = (0.5, 0.9, 0.99),
) -> pd.DataFrame:
    """Percentiles (linear interpolation, as DuckDB's quantile_cont) per group: columns `<metric>_p50`..."""
    import pandas as pd

    keys = [by] if isinstance(by, str) else list(by or [])
    groups = df.groupby(keys, dropna=False) if keys else [((), df)]
    rows = []
    for key, g in groups:
        row: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=False))
        row["streams"] = len(g)
        for m in metrics:
            col = g[m].dropna()
            for q in qs:
                row[f"{m.removesuffix('_ms')}_p{round(q * 100)}"] = col.quantile(q) if len(col) else None
        rows.append(row)
    frames = pd.DataFrame(rows)
    return frames.sort_values("streams", ascending=False, kind="stable").reset_index(drop=True)


# ---- SLOs ---------------------------------------------------------------------------------------------
def slo_check(
    df: pd.DataFrame,
    ttft_ms: float | None = 1000.0,
    itl_ms: float | None = 100.0,
    tpot_ms: float | None = None,
    e2e_ms: float | None = None,
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Share of streams meeting every given threshold (vLLM's "goodput" criterion), per group.

    A stream meets the ITL objective when its own p95 gap is under `itl_ms` (one slow stall in a long answer
    is allowed, a stuttering stream is not). A stream without the metric (no content) fails that objective.
    Returns one row per group: streams, met, attainment (0..1) and the share meeting each objective alone.
    """
    import pandas as pd

    checks = {
        "ttft": ("ttft_ms", ttft_ms),
        "itl": ("itl_p95_ms", itl_ms),
        "tpot": ("tpot_ms", tpot_ms),
        "e2e": ("e2e_ms", e2e_ms),
    }
    ok_cols = {}
    for name, (col, limit) in checks.items():
        if limit is not None:
            ok_cols[f"{name}_ok"] = (df[col] < limit).fillna(False)
    ok = pd.DataFrame(ok_cols, index=df.index)
    ok["met"] = ok.all(axis=1) if ok_cols else True
    keys = [by] if isinstance(by, str) else list(by or [])
    for k in keys:
        ok[k] = df[k]
    if not keys:  # one overall row
        keys = ["_all"]
        ok["_all"] = "all"
    agg = {"streams": ("met", "size"), "met": ("met", "sum")}
    agg.update({c: (c, "mean") for c in ok_cols})
    out = ok.groupby(keys, dropna=False).agg(**agg).reset_index().drop(columns=["_all"], errors="ignore")
    out["attainment"] = out["met"] / out["streams"]
    return out


# ---- comparing two groups -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MedianDiff:
    """median(b) - median(a) with a percentile-bootstrap confidence interval."""

    median_a: float
    median_b: float
    diff: float
    lo: float
    hi: float
    n_a: int
    n_b: int
    confidence: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0 or self.hi < 0


def bootstrap_median_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_boot: int = 4000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> MedianDiff:
    """Percentile bootstrap of median(b) - median(a), resampling each group independently.

    NaNs are dropped. Seeded by default so notebook output is reproducible.
    """
    import numpy as np

    xa = np.asarray(a, dtype=float)
    xb = np.asarray(b, dtype=float)
    xa, xb = xa[~np.isnan(xa)], xb[~np.isnan(xb)]
    if len(xa) == 0 or len(xb) == 0:
        raise ValueError("both groups need at least one value")
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    # Batches bound memory (n_boot x n floats at once could be gigabytes for big groups).
    batch = max(1, min(n_boot, 20_000_000 // max(len(xa), len(xb))))
    for start in range(0, n_boot, batch):
        k = min(batch, n_boot - start)
        ma = np.median(rng.choice(xa, size=(k, len(xa)), replace=True), axis=1)
        mb = np.median(rng.choice(xb, size=(k, len(xb)), replace=True), axis=1)
        diffs[start : start + k] = mb - ma
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    med_a, med_b = float(np.median(xa)), float(np.median(xb))
    return MedianDiff(med_a, med_b, med_b - med_a, float(lo), float(hi), len(xa), len(xb), confidence)


def compare(
    df: pd.DataFrame,
    by: str,
    a: Any,
    b: Any,
    metrics: Sequence[str] = ("ttft_ms", "itl_p50_ms", "tpot_ms", "e2e_ms", "tokens_per_s"),
    n_boot: int = 4000,
    confidence: float = 0.95,
    seed: int | None = 0,
) -> pd.DataFrame:
    """Per metric: medians of group a and b (rows where df[by] == a / b), difference b - a, bootstrap CI."""
    import pandas as pd

    ga, gb = df[df[by] == a], df[df[by] == b]
    if ga.empty or gb.empty:
        missing = a if ga.empty else b
        raise ValueError(f"no streams with {by} = {missing!r} (have: {sorted(map(str, df[by].unique()))})")
    rows = []
    for m in metrics:
        if ga[m].notna().sum() == 0 or gb[m].notna().sum() == 0:
            continue
        r = bootstrap_median_diff(ga[m], gb[m], n_boot=n_boot, confidence=confidence, seed=seed)
        rows.append(
            {
                "metric": m,
                f"median_{a}": r.median_a,
                f"median_{b}": r.median_b,
                "diff": r.diff,
                "ci_lo": r.lo,
                "ci_hi": r.hi,
                "significant": r.significant,
                "n_a": r.n_a,
                "n_b": r.n_b,
            }
        )
    return pd.DataFrame(rows)


# ---- timelines ----------------------------------------------------------------------------------------
def stream_timeline(source: Source, stream_id: str) -> dict[str, Any]:
    """Chunk arrivals and content events of one stream, as offsets (ms) from the proxy's request time.

    Returns {"stream": row dict, "chunks": DataFrame(seq, offset_ms, size), "content": DataFrame(seq,
    offset_ms, content_kind)}.
    """
    con = connect(source)
    row = con.execute(
        "SELECT * FROM streams s JOIN stream_latency USING (stream_id) WHERE stream_id = ?", [stream_id]
    ).fetchdf()
    if row.empty:
        raise KeyError(stream_id)
    st = row.iloc[0].to_dict()
    t0 = st["t_request_ns"] if st.get("t_request_ns") is not None else st["t_headers_ns"]
    chunks = con.execute(
        "SELECT seq, (t_ns - ?) / 1e6 AS offset_ms, size FROM chunks WHERE stream_id = ? ORDER BY seq",
        [t0, stream_id],
    ).fetchdf()
    content = con.execute(
        """SELECT seq, (t_ns - ?) / 1e6 AS offset_ms, content_kind FROM events
           WHERE stream_id = ? AND content_kind IS NOT NULL ORDER BY seq""",
        [t0, stream_id],
    ).fetchdf()
    return {"stream": st, "chunks": chunks, "content": content}


def chunk_arrivals(source: Source, stream_ids: Sequence[str]) -> pd.DataFrame:
    """Chunk arrival offsets (ms from each stream's request) of several streams: stream_id, seq, offset_ms."""
    con = connect(source)
    return con.execute(
        """SELECT c.stream_id, c.seq, (c.t_ns - s.t_request_ns) / 1e6 AS offset_ms, c.size
           FROM chunks c JOIN streams s USING (stream_id)
           WHERE c.stream_id IN (SELECT unnest(?)) ORDER BY c.stream_id, c.seq""",
        [list(stream_ids)],
    ).fetchdf()


BARS = " ▁▂▃▄▅▆▇█"


def text_timeline(offsets_ms: Sequence[float], total_ms: float, width: int = 60) -> str:
    """A one-line histogram of arrivals over [0, total_ms]: each cell's height is its share of the busiest."""
    if width <= 0:
        return ""
    counts = [0] * width
    span = total_ms if total_ms and total_ms > 0 else (max(offsets_ms, default=0) or 1.0)
    for off in offsets_ms:
        i = int(off / span * width) if off >= 0 else 0
        counts[min(max(i, 0), width - 1)] += 1
    peak = max(counts) or 1
    top = len(BARS) - 1
    # Any arrival shows at least the lowest bar: a lone chunk must stay visible next to a burst.
    return "".join(BARS[0] if c == 0 else BARS[max(1, round(c / peak * top))] for c in counts)


# ---- plots --------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    if (
        "MPLBACKEND" not in os.environ
        and matplotlib.get_backend().lower() not in ("agg", "inline")
        and "inline" not in matplotlib.get_backend()
    ):
        matplotlib.use("Agg")  # headless by default; notebooks keep their inline backend
    import matplotlib.pyplot as plt

    return plt


def plot_distributions(
    df: pd.DataFrame,
    metrics: Sequence[str] = ("ttft_ms", "itl_p50_ms", "tokens_per_s"),
    by: str | None = "model",
    itl: pd.DataFrame | None = None,
) -> Figure:
    """Histograms of per-stream metrics, one panel per metric, one colour per group.

    When `itl` (from load_itl_gaps) is given, the ITL panel shows every gap pooled instead of stream medians.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        data, col = (itl, "itl_ms") if (itl is not None and m.startswith("itl")) else (df, m)
        groups = (
            [(str(k), g[col].dropna()) for k, g in data.groupby(by, dropna=False)]
            if by
            else [("all", data[col].dropna())]
        )
        for label, vals in groups:
            if len(vals):
                ax.hist(vals, bins=40, alpha=0.55, label=f"{label} (n={len(vals)})")
        ax.set_xlabel(LABELS.get(col, col))
        ax.set_ylabel("count")
        if by:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_percentiles(
    df: pd.DataFrame, metric: str = "ttft_ms", by: str = "model", qs: Sequence[float] = (0.5, 0.9, 0.99)
) -> Figure:
    """Grouped bars of a metric's percentiles per group."""
    import numpy as np

    plt = _plt()
    table = percentiles(df, by=by, metrics=[metric], qs=qs)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(table) + 2), 3.6))
    x = np.arange(len(table))
    w = 0.8 / len(qs)
    for i, q in enumerate(qs):
        col = f"{metric.removesuffix('_ms')}_p{round(q * 100)}"
        ax.bar(x + i * w, table[col].astype(float), width=w, label=f"p{round(q * 100)}")
    ax.set_xticks(x + w * (len(qs) - 1) / 2, table[by].astype(str), rotation=15)
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.legend()
    fig.tight_layout()
    return fig


def plot_timeline(source: Source, stream_ids: Sequence[str]) -> Figure:
    """Chunk arrivals of several streams on a shared time axis (ms from each request), with TTFT marked."""
    plt = _plt()
    con = connect(source)
    arr = chunk_arrivals(con, stream_ids)
    lat = (
        con.execute(
            "SELECT stream_id, model, ttft_ms, e2e_ms FROM stream_latency WHERE stream_id IN (SELECT unnest(?))",
            [list(stream_ids)],
        )
        .fetchdf()
        .set_index("stream_id")
    )
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(stream_ids) + 1.5))
    for i, sid in enumerate(stream_ids):
        offs = arr.loc[arr["stream_id"] == sid, "offset_ms"]
        ax.eventplot([offs.to_numpy()], lineoffsets=i, linelengths=0.7, linewidths=0.8)
        if sid in lat.index and lat.at[sid, "ttft_ms"] == lat.at[sid, "ttft_ms"]:  # not NaN
            ax.plot([lat.at[sid, "ttft_ms"]], [i], marker="|", color="red", markersize=14)
    labels = [f"{sid[-8:]} {lat.at[sid, 'model'] if sid in lat.index else ''}" for sid in stream_ids]
    ax.set_yticks(range(len(stream_ids)), labels, fontsize="small")
    ax.set_xlabel("ms since request (red: first token)")
    ax.set_title("chunk arrivals")
    fig.tight_layout()
    return fig


def plot_compare(df: pd.DataFrame, by: str, a: Any, b: Any, metric: str = "ttft_ms") -> Figure:
    """Empirical CDFs of one metric for groups a and b."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label in (a, b):
        vals = np.sort(df.loc[df[by] == label, metric].dropna().to_numpy())
        if len(vals):
            ax.step(
                vals, np.arange(1, len(vals) + 1) / len(vals), where="post", label=f"{label} (n={len(vals)})"
            )
    ax.set_xlabel(LABELS.get(metric, metric))
    ax.set_ylabel("share of streams")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def two_groups(df: pd.DataFrame, by: str, a: Any = None, b: Any = None) -> tuple[Any, Any]:
    """The two groups to compare: the ones given, else the two with the most streams (a = the larger)."""
    counts = df[by].value_counts()
    if a is None or b is None:
        top = [g for g in counts.index if g != a and g != b]
        if a is None:
            a, top = top[0] if top else None, top[1:]
        if b is None:
            b = top[0] if top else None
    if a is None or b is None or a == b:
        raise ValueError(
            f"need two different values of {by!r} to compare; the capture has {list(counts.index)}"
        )
    return a, b


def describe_comparison(table: pd.DataFrame, a: Any, b: Any) -> str:
    """One sentence per metric: is b faster or slower than a, and is the difference beyond noise?"""
    lines = []
    for _, r in table.iterrows():
        unit = "" if r["metric"] == "tokens_per_s" else " ms"
        name = LABELS.get(r["metric"], r["metric"])
        verdict = (
            f"{b} is {'higher' if r['diff'] > 0 else 'lower'} by {abs(r['diff']):.1f}{unit}"
            if r["significant"]
            else "no difference beyond noise"
        )
        lines.append(
            f"{name}: median {r[f'median_{a}']:.1f} vs {r[f'median_{b}']:.1f}{unit}; {verdict} "
            f"(CI {r['ci_lo']:.1f} to {r['ci_hi']:.1f})"
        )
    return "\n".join(lines)


def show(fig: Figure) -> None:
    """Display a figure in a notebook and free it (figures kept open pile up in long sessions)."""
    from IPython.display import display

    display(fig)
    _plt().close(fig)
