"""Shared test fixtures: no test may leave a mitmdump (or its writer process) running, even when it fails."""

from __future__ import annotations

import pytest

from tests import proxy as proxy_mod


@pytest.fixture(autouse=True)
def _stop_leftover_proxies():
    yield
    for p in list(proxy_mod.RUNNING):
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass
