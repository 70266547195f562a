"""Optional TLS for every internal gRPC hop (gateway → prefill/decode, decode → prefill, prefill's
KV sender → decode) and the gateway's public gRPC port.

One set of PEM files per process: its certificate and key (presented as server and as client) and
the CA that signed its peers. With a CA, servers also require client certificates (mutual TLS), so
only holders of a certificate from that CA can reach a service port. Without TLS configured,
channels are plaintext — fine on loopback, which is where everything binds by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class TLSConfig:
    cert_file: str
    key_file: str
    ca_file: str | None = None  # with it: verify peers and require client certificates (mTLS)

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a readable file")

    @classmethod
    def from_args(cls, cert: str | None, key: str | None, ca: str | None) -> TLSConfig | None:
        if cert is None and key is None and ca is None:
            return None
        if cert is None or key is None:
            raise ValueError("tls: --tls-cert and --tls-key go together")
        return cls(cert, key, ca)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes(), ca

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def aio_channel(
    address: str, tls: TLSConfig | None, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel to ``address``: TLS with this process's certificate when configured, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
