"""mitm-sse: record, analyse and replay Server-Sent Events through mitmproxy."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["open_capture", "refresh", "__version__"]

if TYPE_CHECKING:
    from .capture import open_capture, refresh


def __getattr__(name: str):  # lazy: `import mitm_sse` inside mitmproxy must not import duckdb
    if name in ("open_capture", "refresh"):
        from . import capture

        return getattr(capture, name)
    raise AttributeError(name)
