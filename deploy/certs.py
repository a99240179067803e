"""`fedslm certs`: a private CA, the SuperLink's TLS certificate, SuperNode key pairs.

Flower's deployment engine needs (1) a TLS certificate for the SuperLink whose
subject alternative names cover every address clients use, signed by a CA the
SuperNodes and the `flwr` CLI trust, and (2) one ECDSA key pair per SuperNode in
OpenSSH format, whose public half is registered with the SuperLink. Flower ships
no tool for either (its examples call openssl and ssh-keygen from shell scripts);
this uses the `cryptography` package that Flower already depends on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from contracts.errors import FedslmError

VALID_DAYS = 365
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
NODES = "nodes"


class CertsError(FedslmError):
    """Bad input to `fedslm certs` (an address, an existing folder)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedslm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(addresses: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if not address or any(c in address for c in " /:"):
                raise CertsError(f"not a host name or IP address: {address!r}") from None
            names.append(x509.DNSName(address))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(folder: Path, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedslm federation CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA384()))
    _write(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / CA_KEY, _pem_key(key), private=True)
    return cert, key


def make_server_cert(folder: Path, addresses: list[str], ca: x509.Certificate,
                     ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(addresses[0]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(addresses), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(folder / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / SERVER_KEY, _pem_key(key), private=True)


def make_node_key(folder: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format: `<name>.key` and `<name>.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write(folder / f"{name}.key", private, private=True)
    _write(folder / f"{name}.pub", public + f" {name}\n".encode())
    return folder / f"{name}.key"


def node_names(count: int) -> list[str]:
    if count < 0:
        raise CertsError(f"--nodes must be >= 0, got {count}")
    return [f"node-{i}" for i in range(1, count + 1)]


def make_certs(folder: Path, addresses: list[str], nodes: list[str]) -> Path:
    """Write the CA, the SuperLink certificate and the node keys into a new `folder`."""
    if not addresses:
        raise CertsError("give at least one --address for the SuperLink's certificate")
    _san(addresses)  # check them before anything is written
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CertsError(f"{folder} is a file, not a folder")
    if folder.exists() and any(folder.iterdir()):
        raise CertsError(f"{folder} exists and is not empty: refusing to overwrite keys")
    try:
        (folder / NODES).mkdir(parents=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
        ca, ca_key = make_ca(folder, now)
        make_server_cert(folder, addresses, ca, ca_key, now)
        for name in nodes:
            make_node_key(folder / NODES, name)
    except OSError as exc:
        raise CertsError(f"cannot write certificates into {folder}: "
                         f"{exc.strerror or exc}") from None
    return folder
