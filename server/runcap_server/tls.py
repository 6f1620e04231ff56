"""TLS and mTLS for the server (RUNCAP_TLS_*), read and checked at startup.

With a certificate and key, the server speaks TLS only. With a client CA
too, every client must present a certificate that CA issued (the handshake
fails otherwise), and the keys file may map such certificates to principals
(`auth.certificate_subject`, docs/auth.md "mTLS").
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runcap_server.settings import Settings

if TYPE_CHECKING:
    import grpc


@dataclass(frozen=True, slots=True)
class ServerTls:
    """The PEM bytes of the server's certificate chain and key, and of the
    client CA when clients must present certificates."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @property
    def mtls(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        import grpc

        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def describe(self) -> str:
        if self.mtls:
            return "TLS, client certificates required (mTLS)"
        return "TLS"


def load_server_tls(settings: Settings) -> ServerTls | None:
    """The TLS material the settings name, None for plaintext; ValueError
    says which file is missing, unreadable or not what it should be."""
    if not settings.tls_cert_file:
        return None
    cert_chain = _read("RUNCAP_TLS_CERT_FILE", settings.tls_cert_file)
    private_key = _read("RUNCAP_TLS_KEY_FILE", settings.tls_key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(
            settings.tls_cert_file, settings.tls_key_file, password=_no_password
        )
    except ssl.SSLError as error:
        raise ValueError(
            f"RUNCAP_TLS_CERT_FILE {settings.tls_cert_file} and RUNCAP_TLS_KEY_FILE "
            f"{settings.tls_key_file} must be a PEM certificate chain and its private key "
            f"({error.reason or error})"
        ) from None
    client_ca = None
    if settings.tls_client_ca_file:
        client_ca = _read("RUNCAP_TLS_CLIENT_CA_FILE", settings.tls_client_ca_file)
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except ssl.SSLError as error:
            raise ValueError(
                f"RUNCAP_TLS_CLIENT_CA_FILE {settings.tls_client_ca_file} must hold PEM CA "
                f"certificates ({error.reason or error})"
            ) from None
    return ServerTls(cert_chain, private_key, client_ca)


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {name} {path}: {error.strerror}") from None


def _no_password() -> bytes:
    raise ValueError(
        "RUNCAP_TLS_KEY_FILE is encrypted; runcap needs an unencrypted private key "
        "(protect the file, such as a Kubernetes Secret mounted with mode 0400)"
    )
