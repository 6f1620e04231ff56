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

_DURATION = re.compile(r"(\d+)(ms|s|m|h)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
BACKENDS = ("sqlite", "memory", "redis")
FAIL_OPEN = ("never", "advisory", "always")
LOG_FORMATS = ("text", "json")


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
    closed_run_retention_ms: int = field(
        default=30 * 86_400_000, metadata={"env": "CLOSED_RUN_RETENTION"}
    )
    default_ttl_ms: int = field(default=600_000, metadata={"env": "DEFAULT_TTL"})
    max_ttl_ms: int = field(default=86_400_000, metadata={"env": "MAX_TTL"})
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

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"RUNCAP_BACKEND must be one of {', '.join(BACKENDS)}")
        if self.backend == "redis" and bool(self.redis_url) == bool(self.redis_cluster_nodes):
            raise ValueError(
                "RUNCAP_BACKEND=redis needs exactly one of RUNCAP_REDIS_URL "
                "(standalone) or RUNCAP_REDIS_CLUSTER_NODES (cluster)"
            )
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"RUNCAP_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        for name, example in (("metrics_addr", "127.0.0.1:9464"), ("health_addr", "0.0.0.0:8081")):
            address = getattr(self, name)
            _, sep, port = address.rpartition(":")
            if address and (not sep or not port.isdigit() or int(port) > 65_535):
                raise ValueError(f"RUNCAP_{_env_name(name)} must be host:port, such as {example}")
        if self.fail_open not in FAIL_OPEN:
            raise ValueError(f"RUNCAP_FAIL_OPEN must be one of {', '.join(FAIL_OPEN)}")
        if self.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("RUNCAP_SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA")
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
        for name in ("default_max_output_tokens", "max_output_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"RUNCAP_{_env_name(name)} must be 0 (none) or positive")

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
