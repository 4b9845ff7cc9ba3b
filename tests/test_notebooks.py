"""Both notebooks run headless, end to end, against a fresh demo capture, and render their figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def demo_capture(tmp_path_factory: pytest.TempPathFactory, run_demo) -> Path:
    cap = tmp_path_factory.mktemp("nb") / "demo"
    run_demo(cap, requests=16, concurrency=8, speed=10, seed=7)
    return cap


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory):
    """A `python3` kernelspec that runs this very interpreter (whatever kernels the machine has installed)."""
    jp = tmp_path_factory.mktemp("jupyter")
    spec = jp / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (mitm-sse tests)",
                "language": "python",
            }
        )
    )
    return {"JUPYTER_PATH": str(jp), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def _run(
    name: str, capture: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> nbformat.NotebookNode:
    for k, v in {**env, "MITM_SSE_DIR": str(capture)}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb,
        kernel_name="python3",
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(capture)}},
    ).execute()
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for o in _outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o["text"])
        elif "data" in o and "text/plain" in o["data"]:
            parts.append(o["data"]["text/plain"])
    return "\n".join(parts)


def _figures(nb: nbformat.NotebookNode) -> int:
    return sum(1 for o in _outputs(nb) if "image/png" in o.get("data", {}))


def test_latency_notebook(demo_capture: Path, kernel_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _run("latency.ipynb", demo_capture, kernel_env, monkeypatch)
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"]
    text = _text(nb)
    assert "16 streams in" in text and "SLO (TTFT < 1000 ms" in text
    assert "fake-claude" in text and "ttft_p99" in text
    assert _figures(nb) >= 3  # distributions, percentile bars, timeline


def test_compare_notebook(demo_capture: Path, kernel_env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _run("compare.ipynb", demo_capture, kernel_env, monkeypatch)
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"]
    text = _text(nb)
    assert "A = 'fake-" in text and "ci_lo" in text and "median" in text
    assert _figures(nb) >= 3  # one CDF per metric
