"""The consortium's PKI for a deployment: CA, coordinator TLS certificate, hospital keys.

Built with ``cryptography``. Layout of a PKI folder::

    ca.pem, ca.key               consortium CA (key: mode 0600; keep it offline after init)
    server.pem, server.key       coordinator TLS certificate (SANs for every dialled address)
    hospitals/NAME.key           hospital NAME's EC P-256 private key, OpenSSH format (0600)
    hospitals/NAME.pub           its public key, OpenSSH format (registered at the SuperLink)

Existing files are never overwritten: re-running ``init`` adds missing hospitals and refuses to
replace a CA, a server certificate or a hospital key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PKIError(ValueError):
    """A PKI folder is incomplete, or an operation would overwrite existing key material."""


@dataclass(frozen=True)
class PKI:
    """Paths inside a PKI folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    def hospital_key(self, name: str) -> Path:
        return self.hospitals_dir / f"{name}.key"

    def hospital_pub(self, name: str) -> Path:
        return self.hospitals_dir / f"{name}.pub"

    def hospitals(self) -> list[str]:
        """Names of the hospitals whose public key is in the folder."""
        return sorted(p.stem for p in self.hospitals_dir.glob("*.pub"))

    def check_server_side(self) -> None:
        """Raise :class:`PKIError` naming the first missing coordinator file."""
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.exists():
                raise PKIError(
                    f"{path}: missing; create the PKI with `fedcare server init --out {self.root}`"
                )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as fh:
        fh.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(addresses: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for addr in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(addr)))
        except ValueError:
            names.append(x509.DNSName(addr))
    return x509.SubjectAlternativeName(names)


def init_pki(root: Path, *, hospitals: list[str], addresses: list[str]) -> list[Path]:
    """Create (or complete) a PKI folder; return the files written.

    Parameters
    ----------
    root : Path
        PKI folder.
    hospitals : list[str]
        Hospital names (letters, digits, ``_ . -``); one EC P-256 key pair each.
    addresses : list[str]
        IP addresses or DNS names hospitals dial to reach the coordinator (certificate SANs).

    Raises
    ------
    PKIError
        Invalid hospital name, or a server certificate missing with the CA present (or the
        reverse) -- never silently replaced.
    """
    for name in hospitals:
        if not _SITE_NAME.match(name):
            raise PKIError(f"hospital name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    pki = PKI(root)
    written: list[Path] = []
    now = dt.datetime.now(dt.UTC)
    if pki.ca_cert.exists() != pki.ca_key.exists():
        raise PKIError(
            f"{root}: only one of ca.pem / ca.key exists; restore the other or use a new folder"
        )
    if not pki.ca_cert.exists():
        if pki.server_cert.exists():
            raise PKIError(f"{pki.server_cert} exists without a CA; refusing to issue a second CA")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("fedcare consortium CA"))
            .issuer_name(_name("fedcare consortium CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            pki.ca_key,
            ca_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_public(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [pki.ca_key, pki.ca_cert]
    ca_key_loaded = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert_loaded = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    if not pki.server_cert.exists():
        server_key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("fedcare coordinator"))
            .issuer_name(ca_cert_loaded.subject)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(addresses), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key_loaded, hashes.SHA256())  # type: ignore[arg-type]
        )
        _write_private(
            pki.server_key,
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        _write_public(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        written += [pki.server_key, pki.server_cert]
    for name in hospitals:
        if pki.hospital_key(name).exists() or pki.hospital_pub(name).exists():
            continue  # keep an existing hospital key: it may already be deployed
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(
            pki.hospital_key(name),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        _write_public(
            pki.hospital_pub(name),
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" fedcare-{name}\n".encode(),
        )
        written += [pki.hospital_key(name), pki.hospital_pub(name)]
    return written


def server_cert_sans(pki: PKI) -> list[str]:
    """The addresses the coordinator certificate is valid for."""
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(
        x509.DNSName
    )
