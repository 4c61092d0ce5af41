"""Hospital key pairs for Flower's SuperNode authentication, as both sides handle them.

A hospital makes its own pair (``fedcare client keygen``): the private key never leaves it and
is what ``flower-supernode --auth-supernode-private-key`` loads; the coordinator receives only
the public key and registers it (``fedcare server add-hospital``, which calls Flower's
``flwr supernode register``). Both are EC P-256 keys in OpenSSH format, the format Flower 1.41
reads on both sides (``serialization.load_ssh_private_key`` in the SuperNode,
``serialization.load_ssh_public_key`` in ``flwr supernode register``, which also requires a NIST
curve). Built with ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class KeyFileError(ValueError):
    """A key file is missing, unreadable, of the wrong kind, or would be overwritten."""


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a valid hospital name (letters, digits, ``_ . -``, max 64).

    Raises
    ------
    KeyFileError
        Any other character, or an empty or too long name (it becomes a file name).
    """
    if not SITE_NAME.match(name):
        raise KeyFileError(
            f"hospital name {name!r}: use letters, digits, '_', '.', '-' (max 64, no leading "
            "'.' or '-')"
        )
    return name


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``data``; never replaces an existing file.

    Raises
    ------
    FileExistsError
        ``path`` exists (key material is never overwritten).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Create ``path`` and write ``data``; never replaces an existing file.

    Raises
    ------
    FileExistsError
        ``path`` exists.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as fh:
        fh.write(data)


def openssh_public_line(key: ec.EllipticCurvePublicKey, name: str) -> bytes:
    """``ecdsa-sha2-nistp256 AAAA... fedcare-NAME`` plus a newline (OpenSSH public key line)."""
    body = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return body + f" fedcare-{name}\n".encode()


def generate_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair as ``out_dir/NAME.key`` (mode 0600) and ``NAME.pub``.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created).
    name : str
        Hospital name (file names and the public key's comment).

    Returns
    -------
    (Path, Path)
        The private and the public key file.

    Raises
    ------
    KeyFileError
        Invalid name, or either file exists (nothing is written or replaced then).
    """
    check_site_name(name)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(
                f"{path} exists; a key pair is never overwritten (use another --out or --name)"
            )
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    write_public(pub_path, openssh_public_line(key.public_key(), name))
    return key_path, pub_path


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH EC public key on a NIST curve (what ``flwr supernode register`` takes).

    Raises
    ------
    KeyFileError
        Missing file, a private key, or anything but an EC public key on P-256/384/521.
    """
    if not path.is_file():
        raise KeyFileError(f"{path}: file not found")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} is a PRIVATE key: it must never leave the hospital; send NAME.pub instead"
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path}: not an OpenSSH public key (expected the NAME.pub written by "
            "`fedcare client keygen`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, NIST_CURVES):
        raise KeyFileError(f"{path}: not an EC public key on a NIST curve (P-256, P-384, P-521)")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH key blob, as ``ssh-keygen -l`` prints it."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(blob.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
