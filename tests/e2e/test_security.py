"""Safe defaults and the optional protections: services on loopback, mutual TLS on every gRPC hop,
an API key on the gateway, and the key never showing up in logs, metrics or health output.

Oracles: a fresh CA made here with `cryptography` (outside our code), plain gRPC / HTTP clients
that do or do not present the right credentials.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from services import Service, start_all

from gateway.client import Client
from protos.tls import TLSConfig

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

API_KEY = "sk-test-0123456789abcdef"
MODEL = "tiny-qwen3"


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """An internal CA and a service certificate signed by it (valid for 127.0.0.1 / localhost)."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("pdserve-test-ca", ca_key, None, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("pdserve-service", ca_key, ca.subject, key, ca=False)
    files = {
        "ca": (root / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "cert": (root / "cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
        "key": (
            root / "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {name: str(path) for name, (path, _) in files.items()}


@pytest.fixture(scope="module")
def secured(tiny_model, pki, tmp_path_factory):
    logs = tmp_path_factory.mktemp("sec_logs")
    tls = TLSConfig(pki["cert"], pki["key"], pki["ca"])
    flags = ("--tls-cert", pki["cert"], "--tls-key", pki["key"], "--tls-ca", pki["ca"])
    engine = ("--page-size", "4", "--kv-cache-mib", "16", *flags)
    prefill, decode = start_all([("prefill", tiny_model, engine), ("decode", tiny_model, engine)], logs, tls)
    os.environ["PDSERVE_API_KEY"] = API_KEY  # the gateway reads it at startup; the instances never see it
    try:
        gateway = Service("gateway", tiny_model, "--served-model-name", MODEL, "--prefill", prefill.address,
                          "--decode", decode.address, *flags, log_dir=logs, tls=tls)  # fmt: skip
    finally:
        del os.environ["PDSERVE_API_KEY"]
    try:
        gateway.wait_ready()
        yield {"prefill": prefill, "decode": decode, "gateway": gateway, "tls": tls, "logs": logs}
    finally:
        for s in (gateway, prefill, decode):
            s.stop()


def test_everything_binds_loopback_by_default(secured):
    for name in ("prefill", "decode", "gateway"):
        assert secured[name].address.startswith("127.0.0.1:")
    assert secured["gateway"].http_url.startswith("http://127.0.0.1:")


def test_rest_requires_the_api_key_but_probes_stay_open(secured):
    url = secured["gateway"].http_url
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    ok = httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


def test_public_grpc_needs_tls_and_the_key(secured):
    gw, tls = secured["gateway"], secured["tls"]
    with Client(gw.address, timeout_s=30, tls=tls, api_key=API_KEY) as client:
        assert client.generate("hello", max_tokens=3).completion_tokens == 3
    with Client(gw.address, timeout_s=30, tls=tls) as client, pytest.raises(grpc.RpcError) as err:
        client.generate("hello", max_tokens=3)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with Client(gw.address, timeout_s=5, api_key=API_KEY) as plaintext, pytest.raises(grpc.RpcError) as err:
        plaintext.generate("hello", max_tokens=3)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE


def test_service_ports_refuse_plaintext_and_clients_without_a_certificate(secured, pki):
    decode = secured["decode"]
    request = health_pb2.HealthCheckRequest()
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(grpc.insecure_channel(decode.address)).Check(request, timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    ca_only = grpc.ssl_channel_credentials(root_certificates=Path(pki["ca"]).read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        health_pb2_grpc.HealthStub(grpc.secure_channel(decode.address, ca_only)).Check(request, timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert decode.load().num_total_pages > 0  # with the certificate: served


def test_the_api_key_is_never_written_anywhere(secured):
    url = secured["gateway"].http_url
    httpx.post(
        f"{url}/v1/completions",
        json={"model": MODEL, "prompt": "x"},
        headers={"Authorization": f"Bearer {API_KEY}x"},
        timeout=30,
    )
    seen = [httpx.get(f"{url}/metrics", timeout=30).text, httpx.get(f"{url}/health", timeout=30).text]
    seen += [secured[name].log() for name in ("prefill", "decode", "gateway")]
    seen += [p.read_text(errors="replace") for p in secured["logs"].iterdir()]
    assert not any(API_KEY in text for text in seen)
