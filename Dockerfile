# syntax=docker/dockerfile:1
# runcap server image: `docker build -t runcap .` then, with an API keys file
# made by `runcap keys create` in ./keys/keys.json,
# `docker run -p 50051:50051 -v runcap-data:/var/lib/runcap -v "$PWD/keys:/etc/runcap/keys:ro"
#  -e RUNCAP_API_KEYS_FILE=/etc/runcap/keys/keys.json runcap`
# (or `-e RUNCAP_INSECURE_DEV=1` instead of the keys, on a machine of your own).
# Settings are RUNCAP_* environment variables (see README); Kubernetes and
# service-mesh manifests are in deploy/k8s (docs/deploy.md).

# ---- builder: install runcap and its runtime dependencies into /opt/venv ----
FROM python:3.11-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
WORKDIR /src
# .dockerignore lets through only what the package build needs.
COPY . .
RUN /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import runcap_server.cli, runcap.v1.budget_service_pb2_grpc, grpc_health.v1.health_pb2_grpc"

# ---- runtime ----
FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RUNCAP_LISTEN_ADDR=0.0.0.0:50051 \
    RUNCAP_SQLITE_PATH=/var/lib/runcap/runcap.db
RUN groupadd --system --gid 10001 runcap \
 && useradd --system --uid 10001 --gid runcap --home-dir /var/lib/runcap \
      --no-create-home --shell /usr/sbin/nologin runcap \
 && mkdir -p /var/lib/runcap \
 && chown runcap:runcap /var/lib/runcap
COPY --from=builder /opt/venv /opt/venv
# Numeric ids so Kubernetes' runAsNonRoot can verify the user.
USER 10001:10001
WORKDIR /var/lib/runcap
VOLUME ["/var/lib/runcap"]
EXPOSE 50051
# grpc.health.v1 Check over loopback (plaintext), no extra binary: on the health-only
# port when RUNCAP_HEALTH_ADDR is set (needed with TLS), else on the listen port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = (os.environ.get('RUNCAP_HEALTH_ADDR') or os.environ.get('RUNCAP_LISTEN_ADDR', '0.0.0.0:50051')).rsplit(':', 1)[-1]; channel = grpc.insecure_channel('127.0.0.1:' + port, options=[('grpc.enable_http_proxy', 0)]); status = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=3).status; sys.exit(0 if status == h.HealthCheckResponse.SERVING else 1)"]
# Exec form: runcap is PID 1 and gets SIGTERM for the graceful shutdown path.
ENTRYPOINT ["runcap", "serve"]
