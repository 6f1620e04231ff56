"""TLS and mTLS through real server processes: client certificates named in
the keys file authenticate as their principals, the handshake refuses
clients without a certificate of the client CA, Bearer keys still work over
TLS, and the CLI speaks TLS from RUNCAP_TLS_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runcap.v1 import budget_service_pb2 as pb
from runcap.v1.budget_service_pb2_grpc import BudgetServiceStub
from runcap_server.auth import read_keys
from tests.certs import CertificateAuthority, Issued
from tests.servers import ServerProcess

SPIFFE_CODER = "spiffe://acme.example/ns/agents/sa/coder-1"
Metadata = tuple[tuple[str, str | bytes], ...]


def runcap_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runcap_server", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@dataclass
class Setup:
    directory: Path
    ca: CertificateAuthority
    server_cert: Issued
    certs: dict[str, Issued]
    keys_file: Path
    secrets: dict[str, str]
    server: ServerProcess

    def credentials(self, cert: str | None) -> grpc.ChannelCredentials:
        issued = self.certs[cert] if cert else None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert.read_bytes(),
            private_key=issued.key_pem() if issued else None,
            certificate_chain=issued.cert_pem() if issued else None,
        )

    def channel(self, cert: str | None) -> grpc.Channel:
        return grpc.secure_channel(self.server.target, self.credentials(cert))

    def bearer(self, name: str) -> Metadata:
        return (("authorization", f"Bearer {self.secrets[name]}"),)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("mtls")
    ca = CertificateAuthority(directory)
    server_cert = ca.issue_server()
    certs = {
        # The SPIFFE ID names it, not its CN (which names another entry).
        "coder-1": ca.issue("coder-1", "coder-2", uris=(SPIFFE_CODER,), dns=("coder.example",)),
        "coder-2": ca.issue("coder-2", "coder-2"),
        "retired": ca.issue("retired", "retired"),
        "stranger": ca.issue("stranger", "stranger"),
        "untrusted": CertificateAuthority(directory, "another CA").issue("untrusted", "coder-2"),
    }
    keys_file = directory / "keys.json"
    entries = {
        "coder-1": ["--role", "agent", "--user", "alice", "--mtls-subject", SPIFFE_CODER],
        "coder-2": ["--role", "agent", "--mtls-subject", "coder-2"],
        "retired": ["--role", "agent", "--mtls-subject", "retired"],
        "ops": ["--role", "operator"],
    }
    secrets = {}
    for name, options in entries.items():
        done = runcap_cli(
            "keys", "--file", str(keys_file), "create", name, "--tenant", "acme", *options
        )
        assert done.returncode == 0, done.stderr
        if done.stdout.strip():
            secrets[name] = done.stdout.strip()
    env = {
        "RUNCAP_API_KEYS_FILE": str(keys_file),
        "RUNCAP_TLS_CERT_FILE": str(server_cert.cert),
        "RUNCAP_TLS_KEY_FILE": str(server_cert.key),
        "RUNCAP_TLS_CLIENT_CA_FILE": str(ca.cert),
    }
    readiness = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), certs["stranger"].key_pem(), certs["stranger"].cert_pem()
    )
    server = ServerProcess(None, env=env, credentials=readiness).start()
    try:
        yield Setup(directory, ca, server_cert, certs, keys_file, secrets, server)
    finally:
        server.stop()


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def test_the_keys_file_maps_certificates_without_keys(setup: Setup) -> None:
    assert set(setup.secrets) == {"ops"}  # certificate entries have no key
    by_id = {key.id: key for key in read_keys(setup.keys_file)}
    assert by_id["coder-1"].mtls_subject == SPIFFE_CODER
    assert not by_id["coder-1"].sha256
    listed = runcap_cli("keys", "--file", str(setup.keys_file), "list").stdout
    assert f"coder-1\tagent\ttenant=acme\tactive\tuser=alice mtls_subject={SPIFFE_CODER}" in listed
    assert "(no API key)" in listed
    taken = runcap_cli(
        "keys", "--file", str(setup.keys_file), "create", "again", "--tenant", "acme",
        "--role", "agent", "--mtls-subject", "coder-2",
    )  # fmt: skip
    assert taken.returncode == 2
    assert "already has the mtls_subject 'coder-2'" in taken.stderr


def test_the_server_says_it_serves_mtls(setup: Setup) -> None:
    assert any("client certificates required (mTLS)" in line for line in setup.server.log)


def test_a_mapped_certificate_authenticates_as_its_principal(setup: Setup) -> None:
    with setup.channel("coder-1") as one, setup.channel("coder-2") as two:
        coder_1, coder_2 = BudgetServiceStub(one), BudgetServiceStub(two)
        created = coder_1.CreateRun(pb.CreateRunRequest(limit_micros=1_000))
        # The SPIFFE ID wins over the CN (which is coder-2's subject).
        assert (created.run.api_key_id, created.run.user_id) == ("coder-1", "alice")
        run_id = created.run.run_id
        assert coder_1.GetRun(pb.GetRunRequest(run_id=run_id)).run.run_id == run_id
        # The owner rules apply: another certificate's principal is another agent.
        other = coder_2.CreateRun(pb.CreateRunRequest(limit_micros=1_000))
        assert other.run.api_key_id == "coder-2"
        request = pb.GetRunRequest(run_id=run_id)
        assert code_of(lambda: coder_2.GetRun(request)) == grpc.StatusCode.PERMISSION_DENIED
        reserve = pb.ReserveRequest(run_id=run_id, amount_micros=1)
        assert code_of(lambda: coder_2.Reserve(reserve)) == grpc.StatusCode.PERMISSION_DENIED
        # An agent certificate has the agent role only.
        suspend = pb.SuspendRunRequest(run_id=run_id)
        assert code_of(lambda: coder_1.SuspendRun(suspend)) == grpc.StatusCode.PERMISSION_DENIED


def test_an_unmapped_certificate_is_unauthenticated(setup: Setup) -> None:
    with setup.channel("stranger") as channel:
        stub = BudgetServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateRun(pb.CreateRunRequest(limit_micros=1_000))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "'stranger'" in str(raised.value.details())
        watch = stub.Watch(pb.WatchRequest(run_id="r"))
        assert code_of(lambda: next(iter(watch))) == grpc.StatusCode.UNAUTHENTICATED
        # Health needs no principal, over TLS too.
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("cert", [None, "untrusted"])
def test_a_client_without_a_certificate_of_the_ca_cannot_connect(
    setup: Setup, cert: str | None
) -> None:
    with setup.channel(cert) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        code = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(setup.server.target) as plaintext:
        health = health_pb2_grpc.HealthStub(plaintext)
        code = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


def test_a_bearer_key_over_mtls_is_its_key_principal(setup: Setup) -> None:
    with setup.channel("coder-1") as channel:
        stub = BudgetServiceStub(channel)
        run = stub.CreateRun(pb.CreateRunRequest(limit_micros=1_000)).run
        # The key wins over the certificate: an operator sees and suspends it.
        ops = setup.bearer("ops")
        assert stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=ops).run.api_key_id == (
            "coder-1"
        )
        stub.SuspendRun(pb.SuspendRunRequest(run_id=run.run_id), metadata=ops)
        bad: Metadata = (("authorization", "Bearer rck_ops_not-the-key"),)
        request = pb.GetRunRequest(run_id=run.run_id)
        code = code_of(lambda: stub.GetRun(request, metadata=bad))
        assert code == grpc.StatusCode.UNAUTHENTICATED  # no fallback to the certificate


def test_the_python_client_takes_tls_credentials(setup: Setup) -> None:
    from runcap import PermissionDeniedError, RuncapClient

    target = setup.server.target
    with RuncapClient(target, credentials=setup.credentials("coder-2")) as client:
        run_id = client.create_run(limit_micros=1_000).run.run_id
    with RuncapClient(
        target, credentials=setup.credentials("stranger"), api_key=setup.secrets["ops"]
    ) as client:
        assert client.get_run(run_id).run.api_key_id == "coder-2"
    with (
        RuncapClient(target, credentials=setup.credentials("coder-1")) as client,
        pytest.raises(PermissionDeniedError),
    ):
        client.get_run(run_id)


def test_the_cli_speaks_mtls_from_the_environment(setup: Setup) -> None:
    env = {
        "RUNCAP_TARGET": setup.server.target,
        "RUNCAP_TLS_CA_FILE": str(setup.ca.cert),
        "RUNCAP_TLS_CLIENT_CERT_FILE": str(setup.certs["coder-1"].cert),
        "RUNCAP_TLS_CLIENT_KEY_FILE": str(setup.certs["coder-1"].key),
    }
    done = runcap_cli("run", "create", "--limit", "1", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["run"]["api_key_id"] == "coder-1"
    no_key = {**env, "RUNCAP_TLS_CLIENT_KEY_FILE": ""}
    done = runcap_cli("run", "create", "--limit", "1", env=no_key)
    assert done.returncode == 1
    assert "go together" in done.stderr


def test_a_revoked_certificate_entry_is_unauthenticated(setup: Setup) -> None:
    with setup.channel("retired") as channel:
        stub = BudgetServiceStub(channel)
        assert stub.CreateRun(pb.CreateRunRequest(limit_micros=1)).run.api_key_id == "retired"
        done = runcap_cli("keys", "--file", str(setup.keys_file), "revoke", "retired")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while True:
            code = code_of(lambda: stub.CreateRun(pb.CreateRunRequest(limit_micros=1)))
            if code == grpc.StatusCode.UNAUTHENTICATED:
                break
            assert code == grpc.StatusCode.OK
            assert time.monotonic() < deadline, "the revocation never took effect"
            time.sleep(0.2)


def test_tls_without_a_client_ca_serves_keys_to_clients_without_certificates(
    setup: Setup,
) -> None:
    env = {
        "RUNCAP_API_KEYS_FILE": str(setup.keys_file),
        "RUNCAP_TLS_CERT_FILE": str(setup.server_cert.cert),
        "RUNCAP_TLS_KEY_FILE": str(setup.server_cert.key),
    }
    server = ServerProcess(None, env=env, credentials=setup.credentials(None)).start()
    try:
        assert any("; TLS;" in line or "; TLS)" in line for line in server.log)
        with grpc.secure_channel(server.target, setup.credentials(None)) as channel:
            stub = BudgetServiceStub(channel)
            ops = setup.bearer("ops")
            run = stub.CreateRun(pb.CreateRunRequest(limit_micros=1), metadata=ops).run
            assert run.api_key_id == ""
            create = pb.CreateRunRequest(limit_micros=1)
            assert code_of(lambda: stub.CreateRun(create)) == grpc.StatusCode.UNAUTHENTICATED
        # Certificates authenticate nothing without a client CA.
        with grpc.secure_channel(server.target, setup.credentials("coder-1")) as channel:
            stub = BudgetServiceStub(channel)
            create = pb.CreateRunRequest(limit_micros=1)
            assert code_of(lambda: stub.CreateRun(create)) == grpc.StatusCode.UNAUTHENTICATED
        assert any("authenticate nothing" in line for line in server.log)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RUNCAP_TLS_CERT_FILE": "server.pem"}, "go together"),
        (
            {"RUNCAP_TLS_CLIENT_CA_FILE": "runcap-test-ca.pem"},
            "RUNCAP_TLS_CLIENT_CA_FILE (mTLS) needs RUNCAP_TLS_CERT_FILE",
        ),
        (
            {"RUNCAP_TLS_CERT_FILE": "server.pem", "RUNCAP_TLS_KEY_FILE": "missing.key"},
            "cannot read RUNCAP_TLS_KEY_FILE",
        ),
        (
            {"RUNCAP_TLS_CERT_FILE": "server.pem", "RUNCAP_TLS_KEY_FILE": "coder-2.key"},
            "must be a PEM certificate chain and its private key",
        ),
    ],
)
def test_serve_refuses_bad_tls_settings(
    setup: Setup, variables: dict[str, str], message: str
) -> None:
    env = {name: str(setup.directory / file) for name, file in variables.items()}
    env["RUNCAP_API_KEYS_FILE"] = str(setup.keys_file)
    done = runcap_cli("serve", "--backend", "memory", "--listen", "127.0.0.1:0", env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("runcap: ")
    assert message in done.stderr
