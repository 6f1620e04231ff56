"""Usable budget under concurrency: calibrated reservations against a hard gate.

An agent's LLM calls ask for max_tokens=16,000 and write ~300 tokens. A run's
ceiling is worth 10 real calls after a warm-up of 5 observed calls. Then 10,
50 or 200 callers reserve at once: how much of what was left do the calls
admitted before the first block use (at their real cost), and after they
commit, how far past the ceiling did spend go (0 unless outputs grow)?

The calibrated run's exposure allowance is sized for 10 concurrent worst
cases past what is left: the operator's chosen bound on the damage if every
call suddenly writes its full max_tokens (the "grown" rows do exactly that).

Run: `.venv/bin/python bench/calibrated.py` (an in-process server on the
memory backend; one process, no network). Prints the setup, then one row
per mode, caller count and output size.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / d) for d in ("server", "clients/python")]

from runcap import AsyncRuncapClient, LlmCall, RunPolicy, TokenUsage  # noqa: E402
from runcap.v1 import budget_pb2  # noqa: E402
from runcap_server.app import RuncapServer  # noqa: E402
from runcap_server.settings import Settings  # noqa: E402

PROVIDER, MODEL = "openai", "gpt-4o"  # 2.5 and 10 micro-USD per input and output token
INPUT_TOKENS, MAX_TOKENS, REAL_OUTPUT = 20_000, 16_000, 300
REAL_COST = INPUT_TOKENS * 25 // 10 + REAL_OUTPUT * 10  # 53,000 micro-USD
WORST_CASE = INPUT_TOKENS * 25 // 10 + MAX_TOKENS * 10  # 210,000
WARM_UP, FITS = 5, 10
LIMIT = (WARM_UP + FITS) * REAL_COST
# Room for FITS concurrent worst cases past what is left after the warm-up.
ALLOWANCE = FITS * WORST_CASE - FITS * REAL_COST


@dataclass(frozen=True)
class Result:
    mode: str
    callers: int
    output: int
    admitted: int
    share: float  # of what was left, used by the admitted calls at real cost
    overshoot: int  # micro-USD past the ceiling after they commit


CALL = LlmCall(PROVIDER, MODEL, input_tokens=INPUT_TOKENS, max_output_tokens=MAX_TOKENS)


async def scenario(client: AsyncRuncapClient, mode: str, callers: int, output: int) -> Result:
    """One run: warm up, then `callers` concurrent reserves, then commits
    writing `output` tokens each."""
    policy = (
        RunPolicy(enforcement_mode="calibrated", exposure_allowance_micros=ALLOWANCE)
        if mode == "calibrated"
        else RunPolicy(enforcement_mode="hard_gate")
    )
    run_id = (await client.create_run(limit_micros=LIMIT, policy=policy)).run.run_id
    for _ in range(WARM_UP):  # sequential, small outputs: the estimator's samples
        answer = await client.reserve_once(run_id, llm_call=CALL)
        if answer.decision == budget_pb2.DECISION_ALLOW:
            usage = TokenUsage(input_tokens=INPUT_TOKENS, output_tokens=REAL_OUTPUT)
            await client.commit(run_id, answer.reservation_id, usage=usage)
    left = LIMIT - (await client.get_run(run_id)).state.committed_micros
    answers = await asyncio.gather(
        *(client.reserve_once(run_id, llm_call=CALL) for _ in range(callers))
    )
    held = [a.reservation_id for a in answers if a.decision == budget_pb2.DECISION_ALLOW]
    usage = TokenUsage(input_tokens=INPUT_TOKENS, output_tokens=output)
    await asyncio.gather(*(client.commit(run_id, r, usage=usage) for r in held))
    committed = (await client.get_run(run_id)).state.committed_micros
    return Result(
        mode,
        callers,
        output,
        len(held),
        len(held) * REAL_COST / left if left > 0 else 0.0,
        max(0, committed - LIMIT),
    )


async def measure(callers: tuple[int, ...]) -> list[Result]:
    settings = Settings(listen_addr="127.0.0.1:0", backend="memory")
    server = RuncapServer(settings)
    port = await server.start()
    try:
        async with AsyncRuncapClient(f"127.0.0.1:{port}") as client:
            results = []
            for count in callers:
                for mode in ("hard_gate", "calibrated"):
                    for output in (REAL_OUTPUT, MAX_TOKENS):
                        results.append(await scenario(client, mode, count, output))
            return results
    finally:
        await server.stop()


def main() -> None:
    print("calibrated reservations vs hard gate (bench/calibrated.py)")
    cores = os.cpu_count()
    print(f"  python {platform.python_version()}, {cores} cores, memory backend, 1 process")
    print(
        f"  {PROVIDER}/{MODEL}: {INPUT_TOKENS:,} input tokens, max_tokens {MAX_TOKENS:,}, "
        f"real output {REAL_OUTPUT}: real cost {REAL_COST:,}, worst case {WORST_CASE:,} micro-USD"
    )
    print(
        f"  ceiling {LIMIT:,} = {WARM_UP} warm-up + {FITS} real calls; calibrated allowance "
        f"{ALLOWANCE:,} ({ALLOWANCE / LIMIT:.1f}x the limit)"
    )
    print()
    print("mode        callers  output  admitted  share of what was left  overshoot")
    for r in asyncio.run(measure((10, 50, 200))):
        print(
            f"{r.mode:<11} {r.callers:>7}  {r.output:>6}  {r.admitted:>8}  "
            f"{r.share:>21.0%}  {r.overshoot:>9,}"
        )


if __name__ == "__main__":
    main()
