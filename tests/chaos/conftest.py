"""The fault suite (`make chaos`): collected only when asked for.

`make test` leaves these tests out: they are collected only with a marker
expression that names `chaos` (`pytest -m chaos`) or when tests/chaos (or a
file in it) is named on the command line. RUNCAP_CHAOS=short (CI's `make chaos
CHAOS=short`) scales every fault down to its short form.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAOS_DIR = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if "chaos" in (config.option.markexpr or ""):
        return None
    for arg in config.args:
        named = Path(arg.split("::", 1)[0]).resolve()
        if named == CHAOS_DIR or CHAOS_DIR in named.parents:
            return None
    return True
