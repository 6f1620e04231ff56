"""The Dockerfile, its .dockerignore and the Kubernetes manifests in deploy/k8s.

No Docker daemon or cluster is needed: the manifests are parsed and checked
against each other, the settings and the Dockerfile; the image's health-check
command runs against real servers; the build context that .dockerignore lets
through is built into a wheel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from runcap_server import app
from runcap_server.app import RuncapServer
from runcap_server.settings import Settings, parse_duration_ms
from tests.servers import ServerProcess

# PyYAML ships no type hints (and types-PyYAML is not a dev dependency): Any.
yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
KNOWN_KINDS = {
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "Secret"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
}
SETTING_ENV = {"RUNCAP_" + f.metadata["env"] for f in dataclasses.fields(Settings)}
# Environment variables the manifests may set that are not runcap settings.
OTHER_ENV: set[str] = set()


def _manifest_paths() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in _manifest_paths():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _grpc_port() -> int:
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    port: int = ports["grpc"]
    return port


def _literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"] if "value" in e}


# -- Dockerfile ----------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def _args(keyword: str) -> list[str]:
    return [args for kw, args in _instructions() if kw == keyword]


def _healthcheck_cmd() -> list[str]:
    (args,) = _args("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert re.fullmatch(r"(--[a-z-]+=\S+\s*)*", options), options
    argv = json.loads(command)
    assert isinstance(argv, list)
    assert all(isinstance(a, str) for a in argv)
    return argv


def _image_uid() -> int:
    (user,) = _args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), "numeric USER, so runAsNonRoot can verify it"
    assert gid.isdigit()
    return int(uid)


def test_dockerfile_has_a_builder_and_a_slim_debian_runtime_stage() -> None:
    stages = _args("FROM")
    assert len(stages) == 2
    assert stages[0].endswith(" AS builder")
    for stage in stages:
        image = stage.split()[0]
        assert re.fullmatch(r"python:3\.1\d+-slim-(bookworm|trixie)", image), image
    copies = _args("COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies


def test_entrypoint_is_exec_form_runcap_serve() -> None:
    (entrypoint,) = _args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["runcap", "serve"]
    assert not _args("CMD"), "a CMD would be appended to `runcap serve`"


def test_image_runs_as_the_non_root_user_the_deployment_names() -> None:
    uid = _image_uid()
    assert uid != 0
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    assert _container()["securityContext"]["runAsUser"] == uid
    assert _args("EXPOSE") == [str(_grpc_port())]
    image_env = " ".join(_args("ENV"))
    assert f"RUNCAP_LISTEN_ADDR=0.0.0.0:{_grpc_port()}" in image_env


def _run_healthcheck(listen_addr: str, health_addr: str = "") -> subprocess.CompletedProcess[str]:
    argv = _healthcheck_cmd()
    assert argv[0] == "python"  # /opt/venv/bin/python in the image
    env = {**os.environ, "RUNCAP_LISTEN_ADDR": listen_addr, "RUNCAP_HEALTH_ADDR": health_addr}
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_on_a_serving_server_and_fails_once_it_stopped(
    tmp_path: Path,
) -> None:
    # With authentication on, as deployed: health answers callers without a key
    # (the image's check and Kubernetes' probes carry none).
    keys = tmp_path / "keys.json"
    keys_cli = [sys.executable, "-m", "runcap_server", "keys", "--file", str(keys)]
    created = subprocess.run(
        [*keys_cli, "create", "probe", "--tenant", "default", "--role", "agent"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    server = ServerProcess(None, env={"RUNCAP_API_KEYS_FILE": str(keys)}).start()
    try:
        # The image listens on 0.0.0.0:PORT; the check dials 127.0.0.1:PORT.
        port = server.target.rsplit(":", 1)[1]
        ok = _run_healthcheck(f"0.0.0.0:{port}")
        assert ok.returncode == 0, ok.stderr
    finally:
        assert server.stop() == 0
    stopped = _run_healthcheck(f"0.0.0.0:{port}")
    assert stopped.returncode != 0


async def test_healthcheck_fails_while_health_is_not_serving() -> None:
    server = RuncapServer(Settings(backend="memory", listen_addr="127.0.0.1:0"))
    port = await server.start()
    try:
        ok = await asyncio.to_thread(_run_healthcheck, f"127.0.0.1:{port}")
        assert ok.returncode == 0, ok.stderr
        await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        draining = await asyncio.to_thread(_run_healthcheck, f"127.0.0.1:{port}")
        assert draining.returncode == 1
    finally:
        await server.stop()


async def test_healthcheck_uses_the_health_port_when_there_is_one() -> None:
    settings = Settings(backend="memory", listen_addr="127.0.0.1:0", health_addr="127.0.0.1:0")
    server = RuncapServer(settings)
    await server.start()
    try:
        # The API port is not where it looks: only the health port can answer.
        checked = await asyncio.to_thread(
            _run_healthcheck, "127.0.0.1:1", f"127.0.0.1:{server.health_port}"
        )
        assert checked.returncode == 0, checked.stderr
    finally:
        await server.stop()


# -- .dockerignore and the build context ---------------------------------------


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) as Docker's pattern matcher reads them."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex)))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path`: the last rule matching it or a parent decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            included = negate
    return included


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [p for p in listed.split("\0") if p and (ROOT / p).is_file()]


@pytest.fixture(scope="module")
def context_files() -> list[str]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    rules = _dockerignore()
    return [p for p in _tracked_files() if _in_context(p, rules)]


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    rules = _dockerignore()
    assert _in_context("server/runcap_server/app.py", rules)
    assert _in_context("pyproject.toml", rules)
    assert not _in_context("tests/unit/test_deploy.py", rules)
    assert not _in_context("server/runcap_server/__pycache__/app.cpython-311.pyc", rules)
    assert not _in_context("clients/go/go.mod", rules)
    assert not _in_context(".venv/bin/python", rules)


def test_build_context_has_the_package_and_no_tests(context_files: list[str]) -> None:
    wanted = {"pyproject.toml", "README.md"}
    wanted |= {p for p in _tracked_files() if p.startswith(("server/", "clients/python/"))}
    assert wanted <= set(context_files)
    for path in context_files:
        assert path in wanted, f"{path} need not be in the image's build context"


@pytest.mark.slow
def test_build_context_builds_the_wheel_the_image_installs(
    context_files: list[str], tmp_path: Path
) -> None:
    """`pip install .` on exactly what .dockerignore lets through (offline)."""
    source = tmp_path / "src"
    for path in context_files:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("runcap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "runcap_server/app.py",
        "runcap_server/price_table.json",
        "runcap/v1/budget_service_pb2_grpc.py",
    ):
        assert needed in names
    assert any(n.startswith("runcap_server/backends/redis_scripts/") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "runcap = runcap_server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# -- Kubernetes manifests ----------------------------------------------------------


def test_every_manifest_is_a_known_kind_with_metadata() -> None:
    docs = _documents()
    assert docs
    for path, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, path
        metadata = doc["metadata"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", metadata["name"]), path
        assert metadata["labels"]["app.kubernetes.io/name"] == "runcap", path
        assert "namespace" not in metadata, "the namespace is chosen at apply time"


def test_kustomization_lists_every_base_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    base = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == base
    kinds = {doc["kind"] for path, doc in _documents() if path.parent == K8S}
    assert kinds == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }


def test_kustomize_renders_the_base() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    assert len(docs) == 6
    (deployment,) = (d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "runcap:0.1.0"


def test_probes_are_grpc_health_checks_on_the_health_port() -> None:
    container = _container()
    assert _grpc_port() == 50051
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["health"]
    assert _literal_env()["RUNCAP_HEALTH_ADDR"] == f"0.0.0.0:{port}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Kubernetes' grpc probes take a number, not a port name.
        assert container[probe]["grpc"]["port"] == port, probe
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set()
    # Readiness follows the storage; liveness only the process (app.LIVENESS_SERVICE).
    assert "service" not in container["readinessProbe"]["grpc"]
    assert container["livenessProbe"]["grpc"]["service"] == app.LIVENESS_SERVICE
    assert _literal_env()["RUNCAP_LISTEN_ADDR"] == f"0.0.0.0:{_grpc_port()}"


def test_pod_is_locked_down() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = _container()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    resources = _container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_termination_grace_covers_prestop_and_shutdown_grace() -> None:
    pod = _one("Deployment")["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_ms = int(pre_stop[1]) * 1000
    grace_ms = _pod_settings().shutdown_grace_ms
    assert pod["terminationGracePeriodSeconds"] * 1000 > drain_ms + grace_ms


def test_replicas_spread_over_zones_and_nodes() -> None:
    spec = _one("Deployment")["spec"]
    assert spec["replicas"] >= 2
    pod_labels = spec["template"]["metadata"]["labels"]
    keys = set()
    for constraint in spec["template"]["spec"]["topologySpreadConstraints"]:
        keys.add(constraint["topologyKey"])
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()


def test_every_env_var_is_a_real_setting_and_the_set_is_valid() -> None:
    names = set()
    for _, doc in _documents():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    unknown = {n for n in names if n.startswith("RUNCAP_")} - SETTING_ENV
    assert not unknown, f"not runcap settings: {sorted(unknown)}"
    assert {n for n in names if not n.startswith("RUNCAP_")} <= OTHER_ENV
    settings = _pod_settings()
    assert settings.backend == "redis"
    assert settings.redis_cluster_nodes
    assert not settings.redis_url
    assert settings.listen_addr.startswith("0.0.0.0:")
    assert not settings.insecure_dev


def test_api_keys_file_is_in_the_mounted_keys_secret() -> None:
    keys_file = Path(_pod_settings().api_keys_file)
    mounts = {m["name"]: m for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in _one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    (name,) = (n for n, m in mounts.items() if keys_file.parent == Path(m["mountPath"]))
    assert mounts[name]["readOnly"] is True
    assert "subPath" not in mounts[name], "a subPath mount never sees the Secret change"
    assert volumes[name]["secret"]["secretName"] == "runcap-api-keys"
    assert "optional" not in volumes[name]["secret"], "no keys: the pod must not start"


def _pod_settings() -> Settings:
    """The settings the pods run with: the literal values plus the Secret's."""
    environ = _literal_env() | {"RUNCAP_REDIS_CLUSTER_NODES": _redis_cluster_nodes()}
    return Settings.from_env(environ)


def _redis_cluster_nodes() -> str:
    (ref,) = (
        e["valueFrom"]["secretKeyRef"]
        for e in _container()["env"]
        if e["name"] == "RUNCAP_REDIS_CLUSTER_NODES"
    )
    secret = _one("Secret")
    assert secret["metadata"]["name"] == ref["name"]
    nodes: str = secret["stringData"][ref["key"]]
    for node in nodes.split(","):
        host, _, port = node.strip().rpartition(":")
        assert host
        assert port.isdigit()
    return nodes


def test_service_port_is_named_grpc_and_selects_the_pods() -> None:
    service = _one("Service")
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "grpc"
    assert port["appProtocol"] == "grpc"
    assert port["targetPort"] in ("grpc", _grpc_port())


def test_pdb_and_hpa_target_the_deployment() -> None:
    deployment = _one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["minReplicas"] < hpa["maxReplicas"]
    assert pdb["spec"]["maxUnavailable"] < hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in _container()["resources"]["requests"], "Utilization needs a CPU request"


def test_mesh_routes_leave_watch_open_and_retry_only_what_never_arrived() -> None:
    routes = {route["name"]: route for route in _one("VirtualService")["spec"]["http"]}
    watch = routes["watch"]
    assert watch["match"] == [{"uri": {"exact": "/runcap.v1.BudgetService/Watch"}}]
    assert watch["timeout"] == "0s"
    assert watch["retries"]["attempts"] == 0
    retry_on = set(routes["unary"]["retries"]["retryOn"].split(","))
    assert retry_on <= {"connect-failure", "refused-stream"}
    idle = _one("DestinationRule")["spec"]["trafficPolicy"]["connectionPool"]["http"]
    heartbeat_ms = _pod_settings().watch_heartbeat_ms
    assert heartbeat_ms < parse_duration_ms(idle["idleTimeout"])
