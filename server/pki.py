"""The consortium's PKI for a deployment: CA and the coordinator's TLS certificate.

Built with ``cryptography``. ``fedcare server init --out pki`` writes two folders::

    pki/                       what ``fedcare server start`` reads
        ca.pem                 consortium CA certificate (every hospital gets a copy)
        server.pem, server.key coordinator TLS certificate (SANs: the dialled addresses, and
                               127.0.0.1 / localhost for the loopback side)
        hospitals/NAME.pub     registered hospitals' public keys (``server add-hospital``)
        registered.json        hospital name -> Flower node id and key fingerprint
    pki-ca/ca.key              the CA's private key (mode 0600), apart from ``pki/``: needed only
                               to issue a new coordinator certificate; keep it offline

Both folders hold a private key, so both are created with mode 0700, and neither may be inside
a git work tree (``server init --allow-in-repo`` overrides that).

Hospitals make their own key pairs (``fedcare client keygen``); the coordinator never holds a
hospital's private key (``--demo-hospitals``, for a one-machine trial, is the exception and says
so). Existing files are never overwritten: re-running ``init`` completes a folder and refuses to
replace a CA, a certificate or a key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.node_keys import (
    check_private_folder,
    make_private_folder,
    write_private,
    write_public,
)

VALID_DAYS = 825
LOOPBACK_SANS = ("127.0.0.1", "localhost")  # the SuperLink's loopback side and the gateway dial it


class PKIError(ValueError):
    """A PKI folder is incomplete, or an operation would overwrite existing key material."""


@dataclass(frozen=True)
class PKI:
    """Paths inside a PKI folder (what the coordinator runs with; no private CA key)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    @property
    def legacy_ca_key(self) -> Path:
        """Where fedcare < 0.2 kept the CA private key (inside the coordinator's folder)."""
        return self.root / "ca.key"

    def hospital_pub(self, name: str) -> Path:
        return self.hospitals_dir / f"{name}.pub"

    def hospitals(self) -> list[str]:
        """Names of the hospitals whose public key is in the folder."""
        return sorted(p.stem for p in self.hospitals_dir.glob("*.pub"))

    def check_server_side(self) -> None:
        """Check what ``server start`` needs: CA certificate, server certificate and key, the
        certificate issued by that CA and valid for 127.0.0.1 (the loopback side).

        Raises
        ------
        PKIError
            Naming the first missing or unusable file and what to do.
        """
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.exists():
                raise PKIError(
                    f"{path}: missing; create the PKI with `fedcare server init --out {self.root}`"
                )
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        server = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        try:
            server.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PKIError(
                f"{self.server_cert} was not issued by {self.ca_cert} ({type(exc).__name__}); "
                "restore the matching pair"
            ) from None
        if "127.0.0.1" not in server_cert_sans(self):
            raise PKIError(
                f"{self.server_cert} is not valid for 127.0.0.1, where the coordinator's own "
                "commands reach the SuperLink; issue a new one: move server.pem and server.key "
                f"away and run `fedcare server init --out {self.root}` (with the CA key folder)"
            )


def default_ca_dir(root: Path) -> Path:
    """``pki`` -> ``pki-ca``: the CA key's folder, beside (not inside) the PKI folder."""
    return root.parent / f"{root.name}-ca"


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


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_pki(
    root: Path, *, addresses: list[str], ca_dir: Path | None = None, allow_in_repo: bool = False
) -> list[Path]:
    """Create (or complete) a PKI folder and the CA key folder; return the files written.

    Both folders hold a private key (mode 0600) and are created with mode 0700; neither may be
    inside a git work tree unless ``allow_in_repo`` (checked before anything is written).

    Parameters
    ----------
    root : Path
        PKI folder (``ca.pem``, ``server.pem``, ``server.key``).
    addresses : list[str]
        IP addresses or DNS names hospitals dial to reach the coordinator (certificate SANs);
        127.0.0.1 and localhost are always added (the loopback side).
    ca_dir : Path, optional
        Folder of the CA private key ``ca.key`` (default: :func:`default_ca_dir`). It must not be
        the PKI folder: ``server start`` reads that one and never needs the CA key.
    allow_in_repo : bool
        Write private keys into a git work tree all the same.

    Raises
    ------
    PKIError
        The CA key folder is the PKI folder; half a CA (certificate without key or the reverse);
        a server certificate without a CA; a missing server certificate while the CA key is not
        at hand. Nothing is replaced.
    KeyFileError
        A folder that would receive a private key is inside a git work tree or open to other
        users (:func:`~shared_models.node_keys.check_private_folder`); nothing is written.
    """
    pki = PKI(root)
    ca_dir = ca_dir if ca_dir is not None else default_ca_dir(root)
    if ca_dir.resolve() == root.resolve():
        raise PKIError(
            f"--ca-dir {ca_dir}: the CA private key must not live in the folder "
            "`server start` reads; choose another folder"
        )
    ca_key_path = ca_dir / "ca.key"
    new_ca, new_server = not pki.ca_cert.exists(), not pki.server_cert.exists()
    folders = ([(root, "--out")] if new_ca or new_server else []) + (
        [(ca_dir, "--ca-dir")] if new_ca else []
    )
    for folder, option in folders:  # all checked before the first key is written
        check_private_folder(folder, option=option, allow_in_repo=allow_in_repo)
    written: list[Path] = []
    now = dt.datetime.now(dt.UTC)
    if not pki.ca_cert.exists():
        if ca_key_path.exists():
            raise PKIError(
                f"{ca_key_path} exists without {pki.ca_cert}; restore ca.pem or use new folders"
            )
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
        write_private(
            ca_key_path, _pem_private(ca_key), option="--ca-dir", allow_in_repo=allow_in_repo
        )
        make_private_folder(root)
        write_public(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [ca_key_path, pki.ca_cert]
    if pki.server_cert.exists():
        if not pki.server_key.exists():
            raise PKIError(f"{pki.server_key} is missing beside {pki.server_cert}; restore it")
        return written
    if not ca_key_path.exists():
        raise PKIError(
            f"{pki.server_cert} is missing and issuing one needs the CA key: pass the CA key "
            f"folder with --ca-dir (no {ca_key_path})"
        )
    ca_key_loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    ca_cert_loaded = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey) or (
        ca_key_loaded.public_key() != ca_cert_loaded.public_key()
    ):
        raise PKIError(f"{ca_key_path} is not the private key of {pki.ca_cert}")
    sans = list(dict.fromkeys([*addresses, *LOOPBACK_SANS]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcare coordinator"))
        .issuer_name(ca_cert_loaded.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key_loaded, hashes.SHA256())
    )
    write_private(pki.server_key, _pem_private(server_key), allow_in_repo=allow_in_repo)
    write_public(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return [*written, pki.server_key, pki.server_cert]


def server_cert_sans(pki: PKI) -> list[str]:
    """The addresses the coordinator certificate is valid for."""
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(
        x509.DNSName
    )
