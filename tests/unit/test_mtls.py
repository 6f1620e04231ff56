"""mTLS without a server: the TLS settings and files, the name of a client
certificate (`certificate_subject`), and keys file entries that map names
to principals."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from runcap_server.auth import (
    KeyEntry,
    KeyStore,
    Principal,
    Role,
    certificate_subject,
    digest,
    read_keys,
)
from runcap_server.cli_client import CliError, tls_credentials_from_env
from runcap_server.errors import Unauthenticated
from runcap_server.settings import Settings
from runcap_server.tls import load_server_tls
from tests.certs import CertificateAuthority

AuthContext = Mapping[str, Iterable[bytes]]
SPIFFE = "spiffe://acme.example/ns/agents/sa/coder-1"


def tls_context(
    common_name: str | None = None, sans: tuple[str, ...] = (), uris: tuple[str, ...] = ()
) -> AuthContext:
    """An auth context as gRPC gives it for a verified client certificate."""
    context: dict[str, list[bytes]] = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
        "x509_subject": [f"CN={common_name}".encode() if common_name else b"O=acme"],
    }
    if common_name:
        context["x509_common_name"] = [common_name.encode()]
    if sans or uris:
        context["x509_subject_alternative_name"] = [name.encode() for name in (*sans, *uris)]
    if uris:
        context["peer_uri"] = [uri.encode() for uri in uris]
    return context


# --------------------------------------------------------------------------
# The certificate's name


def test_the_name_is_the_spiffe_id_when_there_is_one_else_the_cn() -> None:
    assert certificate_subject(tls_context("coder-2", ("coder.example",), (SPIFFE,))) == SPIFFE
    assert certificate_subject(tls_context("coder-2", ("coder.example",))) == "coder-2"
    # Other URIs are not names.
    assert certificate_subject(tls_context("coder-2", uris=("https://acme.example",))) == (
        "coder-2"
    )


def test_no_certificate_has_no_name() -> None:
    assert certificate_subject(None) is None
    assert certificate_subject({}) is None
    assert certificate_subject({"transport_security_type": [b"insecure"]}) is None
    assert certificate_subject({"transport_security_type": [b"ssl"]}) is None
    # Certificate properties outside TLS are not trusted.
    spoof = {**tls_context("coder-2"), "transport_security_type": [b"insecure"]}
    assert certificate_subject(spoof) is None


def test_a_certificate_that_names_no_one_or_two_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="several SPIFFE IDs"):
        certificate_subject(tls_context("x", uris=(SPIFFE, "spiffe://acme.example/other")))
    with pytest.raises(Unauthenticated, match="neither a spiffe:// URI SAN nor"):
        certificate_subject(tls_context(None, sans=("coder.example",)))


# --------------------------------------------------------------------------
# Keys file entries and authentication


def write(path: Path, *entries: dict[str, str]) -> Path:
    path.write_text(json.dumps({"keys": list(entries)}))
    return path


KEY = "rck_ops_secret"
ENTRIES = (
    {
        "id": "coder-1",
        "tenant": "acme",
        "role": "agent",
        "user_id": "alice",
        "mtls_subject": SPIFFE,
    },
    {"id": "coder-2", "tenant": "acme", "role": "agent", "mtls_subject": "coder-2"},
    {"id": "old", "tenant": "acme", "role": "agent", "mtls_subject": "old", "revoked": "2025"},
    {"id": "ops", "tenant": "acme", "role": "operator", "sha256": digest(KEY)},
)


def test_an_entry_may_have_a_subject_a_key_or_both(tmp_path: Path) -> None:
    keys = read_keys(write(tmp_path / "keys.json", *ENTRIES))
    assert [key.mtls_subject for key in keys] == [SPIFFE, "coder-2", "old", ""]
    assert keys[0].to_json()["mtls_subject"] == SPIFFE
    assert "sha256" not in keys[0].to_json()
    both = {**ENTRIES[0], "sha256": digest("k")}
    assert read_keys(write(tmp_path / "both.json", both))[0].sha256 == digest("k")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (({"id": "a", "tenant": "t", "role": "agent"},), "needs a sha256"),
        (({"id": "a", "tenant": "t", "role": "agent", "mtls_subject": " a"},), "printable"),
        (({"id": "a", "tenant": "t", "role": "agent", "mtls_subject": "a\n"},), "printable"),
        (({"id": "a", "tenant": "t", "role": "agent", "mtls_subject": "x" * 1025},), "1024"),
        (
            (
                {"id": "a", "tenant": "t", "role": "agent", "mtls_subject": "same"},
                {"id": "b", "tenant": "t", "role": "agent", "mtls_subject": "same"},
            ),
            "two active entries",
        ),
    ],
)
def test_invalid_subject_entries_are_refused(
    tmp_path: Path, entries: tuple[dict[str, str], ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        read_keys(write(tmp_path / "keys.json", *entries))


def test_a_revoked_entry_frees_its_subject(tmp_path: Path) -> None:
    old = {"id": "a", "tenant": "t", "role": "agent", "mtls_subject": "same", "revoked": "x"}
    new = {"id": "b", "tenant": "t", "role": "agent", "mtls_subject": "same"}
    assert len(read_keys(write(tmp_path / "keys.json", old, new))) == 2


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(write(tmp_path / "keys.json", *ENTRIES), mtls=True)


def test_a_mapped_certificate_is_its_entrys_principal(store: KeyStore) -> None:
    principal = store.authenticate((), tls_context("coder-2", uris=(SPIFFE,)))
    assert principal == Principal("coder-1", "acme", Role.AGENT, "alice")
    assert store.authenticate(None, tls_context("coder-2")).key_id == "coder-2"


def test_unknown_and_revoked_subjects_are_unauthenticated(store: KeyStore) -> None:
    for name in ("stranger", "old", "ops", "Coder-2"):
        with pytest.raises(Unauthenticated, match="not valid here"):
            store.authenticate((), tls_context(name))


def test_a_bearer_key_comes_before_the_certificate(store: KeyStore) -> None:
    bearer = (("authorization", f"Bearer {KEY}"),)
    assert store.authenticate(bearer, tls_context("coder-2")).key_id == "ops"
    wrong = (("authorization", "Bearer rck_ops_wrong"),)
    with pytest.raises(Unauthenticated, match="API key is not valid"):
        store.authenticate(wrong, tls_context("coder-2"))


def test_without_mtls_certificates_authenticate_nothing(tmp_path: Path) -> None:
    store = KeyStore(write(tmp_path / "keys.json", *ENTRIES))
    with pytest.raises(Unauthenticated, match="needs an API key"):
        store.authenticate((), tls_context("coder-2"))
    bearer = (("authorization", f"Bearer {KEY}"),)
    assert store.authenticate(bearer, {}).key_id == "ops"


def test_an_entry_without_a_key_has_no_hash_to_match(store: KeyStore) -> None:
    # An empty "key" must not match the entries that have no sha256.
    for token in ("", " "):
        with pytest.raises(Unauthenticated):
            store.authenticate((("authorization", f"Bearer {token}"),), None)
    assert isinstance(KeyEntry.from_json(ENTRIES[1], "x"), KeyEntry)


# --------------------------------------------------------------------------
# Settings and files


def test_cert_and_key_go_together_and_a_client_ca_needs_them() -> None:
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_cert_file="server.pem")
    with pytest.raises(ValueError, match="go together"):
        Settings(tls_key_file="server.key")
    with pytest.raises(ValueError, match="needs RUNCAP_TLS_CERT_FILE"):
        Settings(tls_client_ca_file="ca.pem")
    settings = Settings.from_env(
        {
            "RUNCAP_TLS_CERT_FILE": "s.pem",
            "RUNCAP_TLS_KEY_FILE": "s.key",
            "RUNCAP_TLS_CLIENT_CA_FILE": "ca.pem",
        }
    )
    assert (settings.tls_cert_file, settings.tls_key_file) == ("s.pem", "s.key")
    assert settings.tls_client_ca_file == "ca.pem"
    assert load_server_tls(Settings()) is None


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def test_tls_files_are_read_and_checked(ca: CertificateAuthority) -> None:
    server = ca.issue_server()
    other = ca.issue("other", "other")
    tls = load_server_tls(Settings(tls_cert_file=str(server.cert), tls_key_file=str(server.key)))
    assert tls is not None
    assert not tls.mtls
    assert tls.cert_chain == server.cert_pem()
    mtls = load_server_tls(
        Settings(
            tls_cert_file=str(server.cert),
            tls_key_file=str(server.key),
            tls_client_ca_file=str(ca.cert),
        )
    )
    assert mtls is not None
    assert mtls.mtls
    assert mtls.client_ca == ca.cert.read_bytes()
    assert mtls.credentials() is not None
    cases = {
        "cannot read RUNCAP_TLS_CERT_FILE": (str(ca.directory / "missing.pem"), str(server.key)),
        "must be a PEM certificate chain": (str(server.cert), str(other.key)),
    }
    for message, (cert, key) in cases.items():
        with pytest.raises(ValueError, match=message):
            load_server_tls(Settings(tls_cert_file=cert, tls_key_file=key))
    with pytest.raises(ValueError, match="must hold PEM CA certificates"):
        load_server_tls(
            Settings(
                tls_cert_file=str(server.cert),
                tls_key_file=str(server.key),
                tls_client_ca_file=str(server.key),
            )
        )


def test_the_cli_reads_tls_from_the_environment(ca: CertificateAuthority) -> None:
    client = ca.issue("cli", "cli")
    assert tls_credentials_from_env({}) is None
    assert tls_credentials_from_env({"RUNCAP_TLS_CA_FILE": str(ca.cert)}) is not None
    both = {
        "RUNCAP_TLS_CLIENT_CERT_FILE": str(client.cert),
        "RUNCAP_TLS_CLIENT_KEY_FILE": str(client.key),
    }
    assert tls_credentials_from_env(both) is not None  # the system's roots
    with pytest.raises(CliError, match="go together"):
        tls_credentials_from_env({"RUNCAP_TLS_CLIENT_CERT_FILE": str(client.cert)})
    with pytest.raises(CliError, match="cannot read RUNCAP_TLS_CA_FILE"):
        tls_credentials_from_env({"RUNCAP_TLS_CA_FILE": str(ca.directory / "nope.pem")})
