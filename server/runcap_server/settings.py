"""Settings: one frozen object, from RUNCAP_* environment variables and flags.

Every setting has a documented default (README, "Configuration"). Durations
accept a number with a unit: 250ms, 30s, 10m, 24h.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from runcap_server.validation import ID_PATTERN, ID_RULE

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
BACKENDS = ("sqlite", "memory", "redis")
FAIL_OPEN = ("never", "advisory", "always")
LOG_FORMATS = ("text", "json")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def parse_duration_ms(text: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 250ms, 30s, 10m or 24h")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Settings:
    listen_addr: str = field(default="127.0.0.1:50051", metadata={"env": "LISTEN_ADDR"})
    backend: str = field(default="sqlite", metadata={"env": "BACKEND"})
    sqlite_path: str = field(default="./runcap.db", metadata={"env": "SQLITE_PATH"})
    # FULL survives power loss; NORMAL survives process crashes only.
    sqlite_synchronous: str = field(default="FULL", metadata={"env": "SQLITE_SYNCHRONOUS"})
    redis_url: str = field(default="", metadata={"env": "REDIS_URL"})
    # Comma-separated host:port of some cluster nodes; the rest are discovered.
    redis_cluster_nodes: str = field(default="", metadata={"env": "REDIS_CLUSTER_NODES"})
    redis_max_connections: int = field(default=64, metadata={"env": "REDIS_MAX_CONNECTIONS"})
    redis_namespace: str = field(default="rc", metadata={"env": "REDIS_NAMESPACE"})
    # Concurrent script calls share a round trip per Redis node (false: one pooled call each).
    redis_pipelining: bool = field(default=True, metadata={"env": "REDIS_PIPELINING"})
    # `runcap serve`'s event loop: auto is uvloop when it is installed, else asyncio's.
    event_loop: str = field(default="auto", metadata={"env": "EVENT_LOOP"})
    closed_run_retention_ms: int = field(
        default=30 * 86_400_000, metadata={"env": "CLOSED_RUN_RETENTION"}
    )
    default_ttl_ms: int = field(default=600_000, metadata={"env": "DEFAULT_TTL"})
    max_ttl_ms: int = field(default=86_400_000, metadata={"env": "MAX_TTL"})
    # Cardinality limits (open_runs.py): open runs per principal (0: no limit), and
    # how long a run may stay open before the server closes it (0: forever).
    max_open_runs: int = field(default=10_000, metadata={"env": "MAX_OPEN_RUNS"})
    run_ttl_ms: int = field(default=7 * 86_400_000, metadata={"env": "RUN_TTL"})
    sweep_interval_ms: int = field(default=250, metadata={"env": "SWEEP_INTERVAL"})
    watch_heartbeat_ms: int = field(default=15_000, metadata={"env": "WATCH_HEARTBEAT"})
    watch_queue_size: int = field(default=1024, metadata={"env": "WATCH_QUEUE_SIZE"})
    log_retention: int = field(default=10_000, metadata={"env": "LOG_RETENTION"})
    shutdown_grace_ms: int = field(default=10_000, metadata={"env": "SHUTDOWN_GRACE"})
    max_connection_age_ms: int = field(default=1_800_000, metadata={"env": "MAX_CONNECTION_AGE"})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL"})
    # text, or json: one object a line with time, level, logger, message, trace_id.
    log_format: str = field(default="text", metadata={"env": "LOG_FORMAT"})
    # host:port of a Prometheus scrape endpoint (/metrics); empty: none.
    metrics_addr: str = field(default="", metadata={"env": "METRICS_ADDR"})
    # A second port serving only grpc.health.v1, in plaintext, for probes that
    # cannot speak TLS or present a key (empty: health on the main port only).
    health_addr: str = field(default="", metadata={"env": "HEALTH_ADDR"})
    # host:port of the web dashboard (HTTP; HTTPS when the API speaks TLS); empty: none.
    http_addr: str = field(default="", metadata={"env": "HTTP_ADDR"})
    tenant: str = field(default="default", metadata={"env": "TENANT"})
    # The price table file; empty: the one shipped with the server.
    price_table: str = field(default="", metadata={"env": "PRICE_TABLE"})
    # LLM calls: the output tokens priced when a request gives no maximum (0:
    # the request must give one), and a cap on any request's maximum (0: none).
    default_max_output_tokens: int = field(default=0, metadata={"env": "DEFAULT_MAX_OUTPUT_TOKENS"})
    max_output_tokens: int = field(default=0, metadata={"env": "MAX_OUTPUT_TOKENS"})
    # When the storage is unreachable, Reserve fails closed (never), or answers
    # a warning that holds nothing for advisory runs (advisory) or for every
    # run (always). Failing open is logged and counted.
    fail_open: str = field(default="never", metadata={"env": "FAIL_OPEN"})
    # The API keys (JSON, `runcap keys`); every call must then carry one.
    api_keys_file: str = field(default="", metadata={"env": "API_KEYS_FILE"})
    # No authentication at all, for a first run on one machine (`runcap serve
    # --insecure-dev`); `serve` refuses to start with neither this nor keys.
    insecure_dev: bool = field(default=False, metadata={"env": "INSECURE_DEV"})
    # TLS: the server's certificate chain and private key (PEM files); both or
    # neither (plaintext). With a client CA too, clients must present a
    # certificate it issued (mTLS), and the keys file may map certificates to
    # principals (docs/auth.md, "mTLS").
    tls_cert_file: str = field(default="", metadata={"env": "TLS_CERT_FILE"})
    tls_key_file: str = field(default="", metadata={"env": "TLS_KEY_FILE"})
    tls_client_ca_file: str = field(default="", metadata={"env": "TLS_CLIENT_CA_FILE"})
    # Alerts (docs/alerts.md): whether this process runs the alert engine
    # (rules are managed either way), and how it delivers: attempts per alert,
    # the exponential back-off between them, each request's timeout, how long
    # an engine keeps an alert it took before another may take it over, how
    # often it looks for rules, runs and due retries, after how long without
    # storage it pages the BACKEND_DOWN rules, and how long alerts are kept.
    alerts: bool = field(default=True, metadata={"env": "ALERTS"})
    alerts_max_attempts: int = field(default=8, metadata={"env": "ALERTS_MAX_ATTEMPTS"})
    alerts_retry_base_ms: int = field(default=1_000, metadata={"env": "ALERTS_RETRY_BASE"})
    alerts_retry_max_ms: int = field(default=300_000, metadata={"env": "ALERTS_RETRY_MAX"})
    alerts_timeout_ms: int = field(default=10_000, metadata={"env": "ALERTS_TIMEOUT"})
    alerts_lease_ms: int = field(default=60_000, metadata={"env": "ALERTS_LEASE"})
    alerts_poll_ms: int = field(default=1_000, metadata={"env": "ALERTS_POLL"})
    alerts_backend_down_after_ms: int = field(
        default=30_000, metadata={"env": "ALERTS_BACKEND_DOWN_AFTER"}
    )
    alerts_retention_ms: int = field(default=30 * 86_400_000, metadata={"env": "ALERTS_RETENTION"})
    # The dashboard's base URL for links in alerts (http://host:8080); empty: no links.
    dashboard_url: str = field(default="", metadata={"env": "DASHBOARD_URL"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"RUNCAP_BACKEND must be one of {', '.join(BACKENDS)}")
        # Both are in every Redis key (`rc:{tenant/run}:a`): no hash-tag braces, no "/".
        if not ID_PATTERN.fullmatch(self.tenant):
            raise ValueError(f"RUNCAP_TENANT {self.tenant!r} {ID_RULE}")
        if not self.redis_namespace or set("{}") & set(self.redis_namespace):
            raise ValueError("RUNCAP_REDIS_NAMESPACE must be non-empty, without { or }")
        if self.backend == "redis" and bool(self.redis_url) == bool(self.redis_cluster_nodes):
            raise ValueError(
                "RUNCAP_BACKEND=redis needs exactly one of RUNCAP_REDIS_URL "
                "(standalone) or RUNCAP_REDIS_CLUSTER_NODES (cluster)"
            )
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"RUNCAP_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"RUNCAP_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        for name, example in (
            ("metrics_addr", "127.0.0.1:9464"),
            ("health_addr", "0.0.0.0:8081"),
            ("http_addr", "127.0.0.1:8080"),
        ):
            address = getattr(self, name)
            _, sep, port = address.rpartition(":")
            if address and (not sep or not port.isdigit() or int(port) > 65_535):
                raise ValueError(f"RUNCAP_{_env_name(name)} must be host:port, such as {example}")
        if self.fail_open not in FAIL_OPEN:
            raise ValueError(f"RUNCAP_FAIL_OPEN must be one of {', '.join(FAIL_OPEN)}")
        if self.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("RUNCAP_SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA")
        if self.max_open_runs < 0 or self.run_ttl_ms < 0:
            raise ValueError("RUNCAP_MAX_OPEN_RUNS and RUNCAP_RUN_TTL must not be negative")
        if not 0 < self.default_ttl_ms <= self.max_ttl_ms:
            raise ValueError("RUNCAP_DEFAULT_TTL must be positive and at most RUNCAP_MAX_TTL")
        for name in (
            "sweep_interval_ms",
            "watch_heartbeat_ms",
            "watch_queue_size",
            "redis_max_connections",
            "closed_run_retention_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"RUNCAP_{_env_name(name)} must be positive")
        if self.api_keys_file and self.insecure_dev:
            raise ValueError("RUNCAP_API_KEYS_FILE and RUNCAP_INSECURE_DEV exclude each other")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(
                "RUNCAP_TLS_CERT_FILE and RUNCAP_TLS_KEY_FILE go together: set both (TLS) "
                "or neither (plaintext)"
            )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(
                "RUNCAP_TLS_CLIENT_CA_FILE (mTLS) needs RUNCAP_TLS_CERT_FILE and "
                "RUNCAP_TLS_KEY_FILE (the server's own certificate and key)"
            )
        if self.log_retention < 1:
            raise ValueError("RUNCAP_LOG_RETENTION must be at least 1")
        self._check_alerts()
        for name in ("default_max_output_tokens", "max_output_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"RUNCAP_{_env_name(name)} must be 0 (none) or positive")

    def _check_alerts(self) -> None:
        for name in (
            "alerts_max_attempts",
            "alerts_retry_base_ms",
            "alerts_timeout_ms",
            "alerts_poll_ms",
            "alerts_backend_down_after_ms",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"RUNCAP_{_env_name(name)} must be positive")
        if self.alerts_retry_max_ms < self.alerts_retry_base_ms:
            raise ValueError("RUNCAP_ALERTS_RETRY_MAX must be at least RUNCAP_ALERTS_RETRY_BASE")
        if self.alerts_lease_ms <= self.alerts_timeout_ms:
            raise ValueError(
                "RUNCAP_ALERTS_LEASE must be longer than RUNCAP_ALERTS_TIMEOUT (an engine "
                "keeps an alert for at least one attempt)"
            )
        if self.alerts_retention_ms < 86_400_000:
            raise ValueError("RUNCAP_ALERTS_RETENTION must be at least 24h (rate limits look back)")
        if self.dashboard_url and not self.dashboard_url.startswith(("http://", "https://")):
            raise ValueError("RUNCAP_DASHBOARD_URL must be an http:// or https:// URL")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then RUNCAP_* variables, then explicit overrides (flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get("RUNCAP_" + f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _env_name(name: str) -> str:
    return str(next(f for f in dataclasses.fields(Settings) if f.name == name).metadata["env"])


def _convert(f: dataclasses.Field[object], raw: str) -> object:
    try:
        if f.name.endswith("_ms"):
            return parse_duration_ms(raw)
        if f.type in ("int", int):
            return int(raw)
        if f.type in ("bool", bool):
            value = raw.strip().lower()
            if value not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"expected true or false, not {raw!r}")
            return value in ("1", "true", "yes")
    except ValueError as error:
        raise ValueError(f"RUNCAP_{f.metadata['env']}: {error}") from None
    return raw
