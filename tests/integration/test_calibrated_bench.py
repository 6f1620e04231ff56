"""The fast version of bench/calibrated.py: with 10 concurrent callers, a
calibrated run uses at least 90% of what is left (a hard gate: 20%), and when
every output suddenly grows to max_tokens, spend passes the ceiling by no more
than the run's exposure allowance."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench" / "calibrated.py"


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_calibrated", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


async def test_calibrated_runs_use_their_budget_and_bound_the_overshoot() -> None:
    bench = _bench()
    results = {(r.mode, r.output): r for r in await bench.measure((10,))}
    small, grown = bench.REAL_OUTPUT, bench.MAX_TOKENS
    hard = results[("hard_gate", small)]
    assert (hard.admitted, hard.overshoot) == (2, 0)  # two worst cases fit what is left
    calibrated = results[("calibrated", small)]
    assert calibrated.share >= 0.9
    assert calibrated.overshoot == 0
    # Every admitted call writes its whole max_tokens: bounded by the allowance.
    burst = results[("calibrated", grown)]
    assert burst.admitted == calibrated.admitted
    assert 0 < burst.overshoot <= bench.ALLOWANCE
    assert results[("hard_gate", grown)].overshoot == 0
