"""The hook's settings, read from RUNCAP_* environment variables (the proxy
loads a callback by name, so the environment is where its settings live)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final

from runcap._shared import DEFAULT_TARGET, EnforcementModeName

_MODES: Final = ("hard_gate", "soft_gate", "advisory", "actuals_only")
_TRUE: Final = ("1", "true", "yes", "on")
_FALSE: Final = ("0", "false", "no", "off", "")


@dataclass(frozen=True, slots=True)
class HookSettings:
    """How the LiteLLM hook talks to runcap and answers the proxy's clients.

    Attributes:
        target: The runcap server (RUNCAP_TARGET).
        api_key: The key the hook presents to runcap (RUNCAP_API_KEY). An
            operator key: the hook charges runs to its callers' scopes.
        create_runs: Create a run for a request that names none, or names one
            runcap does not know (RUNCAP_LITELLM_CREATE_RUNS, default true).
            When false such a request is refused with 400.
        run_limit_micros: The ceiling of the runs the hook creates
            (RUNCAP_LITELLM_RUN_LIMIT, USD, default 5.00).
        run_mode: Their enforcement mode (RUNCAP_LITELLM_RUN_MODE).
        auto_downgrade: Their calls that do not fit are downgraded to the
            priciest model that fits, among those the caller may use here
            (RUNCAP_LITELLM_AUTO_DOWNGRADE, default false). With neither
            set, the runs get the policy of the caller's scopes (key, user,
            team; runcap's SetScopePolicy), else the server's defaults.
        block_status: The HTTP status of a budget block
            (RUNCAP_LITELLM_BLOCK_STATUS, default 402).
        fail_open: Forward calls while runcap is unreachable, unbudgeted and
            logged as a warning (RUNCAP_LITELLM_FAIL_OPEN, default false: 503).
        reservation_ttl_s: How long a hold lives when the proxy never settles
            it, for example when LiteLLM drops an event
            (RUNCAP_LITELLM_RESERVATION_TTL_S, default 900).
        timeout_s: The deadline of each call to runcap
            (RUNCAP_LITELLM_TIMEOUT_S, default 2).
        problem_type_base: The prefix of the problem `type` URIs
            (RUNCAP_LITELLM_PROBLEM_TYPE_BASE).
    """

    target: str = DEFAULT_TARGET
    api_key: str | None = None
    create_runs: bool = True
    run_limit_micros: int = 5_000_000
    run_mode: EnforcementModeName | None = None
    auto_downgrade: bool = False
    block_status: int = 402
    fail_open: bool = False
    reservation_ttl_s: float = 900.0
    timeout_s: float = 2.0
    problem_type_base: str = "urn:runcap:problem:"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HookSettings:
        """The settings in `env`; ValueError names the variable that is wrong."""
        mode = env.get("RUNCAP_LITELLM_RUN_MODE", "").strip().lower() or None
        if mode is not None and mode not in _MODES:
            raise ValueError(f"RUNCAP_LITELLM_RUN_MODE={mode!r}: expected one of {_MODES}")
        status = _number(env, "RUNCAP_LITELLM_BLOCK_STATUS", "402")
        if not (400 <= status <= 599) or status != int(status):
            raise ValueError(f"RUNCAP_LITELLM_BLOCK_STATUS={status}: expected an HTTP error status")
        return cls(
            target=env.get("RUNCAP_TARGET", "").strip() or DEFAULT_TARGET,
            api_key=env.get("RUNCAP_API_KEY", "").strip() or None,
            create_runs=_flag(env, "RUNCAP_LITELLM_CREATE_RUNS", default=True),
            run_limit_micros=_usd(env, "RUNCAP_LITELLM_RUN_LIMIT", "5.00"),
            run_mode=mode,  # type: ignore[arg-type]
            auto_downgrade=_flag(env, "RUNCAP_LITELLM_AUTO_DOWNGRADE", default=False),
            block_status=int(status),
            fail_open=_flag(env, "RUNCAP_LITELLM_FAIL_OPEN", default=False),
            reservation_ttl_s=_positive(env, "RUNCAP_LITELLM_RESERVATION_TTL_S", "900"),
            timeout_s=_positive(env, "RUNCAP_LITELLM_TIMEOUT_S", "2"),
            problem_type_base=env.get("RUNCAP_LITELLM_PROBLEM_TYPE_BASE", "urn:runcap:problem:"),
        )


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    text = env.get(name)
    if text is None:
        return default
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={text!r}: expected true or false")


def _number(env: Mapping[str, str], name: str, default: str) -> float:
    text = env.get(name, default)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number") from None


def _positive(env: Mapping[str, str], name: str, default: str) -> float:
    value = _number(env, name, default)
    if not value > 0:
        raise ValueError(f"{name}={value}: expected a positive number of seconds")
    return value


def _usd(env: Mapping[str, str], name: str, default: str) -> int:
    text = env.get(name, default).strip().removeprefix("$")
    try:
        micros = Decimal(text) * 1_000_000
    except InvalidOperation:
        raise ValueError(f"{name}={text!r}: expected a USD amount such as 5.00") from None
    if micros != micros.to_integral_value() or micros <= 0:
        raise ValueError(f"{name}={text!r}: expected a positive amount in whole micro-USD")
    return int(micros)
