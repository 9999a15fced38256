"""The API's TLS certificate: given (``--api-cert/--api-key``) or self-signed.

On first use without one, an ECDSA P-256 key and a self-signed certificate (ten years,
subject alternative names: the listen address, ``localhost``, ``127.0.0.1``, ``::1``
and the host name) are generated with :mod:`cryptography` into
``<state-dir>/conf/api-cert.pem`` and ``api-key.pem`` (mode 0600) and kept: clients
pin it once (``curl --cacert <state-dir>/conf/api-cert.pem``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl

from ...storage import atomic_file

CERT = os.path.join("conf", "api-cert.pem")
KEY = os.path.join("conf", "api-key.pem")


def self_signed(state_dir: str, host: str) -> tuple[str, str]:
    """Paths of the state directory's certificate and key, made on first use."""
    cert_path = os.path.join(state_dir, CERT)
    key_path = os.path.join(state_dir, KEY)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    addresses = {"127.0.0.1", "::1"}
    try:
        if not ipaddress.ip_address(host).is_unspecified:
            addresses.add(host)
    except ValueError:
        names.append(x509.DNSName(host))
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(addresses)]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iscsi-vmtarget API")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path), exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_file.write_file(key_path, key_pem, tmp=key_path + ".tmp", mode=0o600)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    atomic_file.write_file(cert_path, cert_pem, tmp=cert_path + ".tmp", mode=0o644)
    return cert_path, key_path


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2 or later, the certificate and key given."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
