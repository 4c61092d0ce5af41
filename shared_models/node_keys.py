"""Hospital key pairs for Flower's SuperNode authentication, as both sides handle them.

A hospital makes its own pair (``fedcare client keygen``): the private key never leaves it and
is what ``flower-supernode --auth-supernode-private-key`` loads; the coordinator receives only
the public key and registers it (``fedcare server add-hospital``, which calls Flower's
``flwr supernode register``). Both are EC P-256 keys in OpenSSH format, the format Flower 1.41
reads on both sides (``serialization.load_ssh_private_key`` in the SuperNode,
``serialization.load_ssh_public_key`` in ``flwr supernode register``, which also requires a NIST
curve). Built with ``cryptography``.

Every private key fedcare writes (a hospital's, the consortium CA's, the coordinator's TLS key)
is created with mode 0600 in a folder of mode 0700, and never inside a git work tree unless the
command was given ``--allow-in-repo`` (:func:`check_private_folder`).
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

HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class KeyFileError(ValueError):
    """A key file is missing, unreadable, of the wrong kind, or would be overwritten."""


def check_hospital_name(name: str) -> str:
    """Return ``name`` if it is a valid hospital name (letters, digits, ``_ . -``, max 64).

    Raises
    ------
    KeyFileError
        Any other character, or an empty or too long name (it becomes a file name).
    """
    if not HOSPITAL_NAME.match(name):
        raise KeyFileError(
            f"hospital name {name!r}: use letters, digits, '_', '.', '-' (max 64, no leading "
            "'.' or '-')"
        )
    return name


def git_work_tree(path: Path) -> Path | None:
    """The git work tree ``path`` would be in: the nearest folder at or above it holding a
    ``.git`` (a folder, or a file in a linked work tree or submodule), else None. Needs no
    ``git`` program."""
    path = path.resolve()
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def outside_work_tree(folder: Path, tree: Path) -> Path:
    """A suggestion for ``folder`` (inside the work tree ``tree``) outside any work tree: the
    same relative path under ``fedcare-private/`` beside the outermost enclosing checkout."""
    base = tree.parent
    while (outer := git_work_tree(base)) is not None and outer.parent != outer:
        base = outer.parent
    return base / "fedcare-private" / folder.resolve().relative_to(tree)


def check_private_folder(folder: Path, *, option: str, allow_in_repo: bool = False) -> None:
    """Refuse a folder for private keys where they could leak: inside a git work tree (a key
    there can be committed by accident) unless ``allow_in_repo``, or an existing folder that
    other users may enter (private keys live in folders of mode 0700).

    Parameters
    ----------
    folder : Path
        Where a private key would be written (need not exist).
    option : str
        The command-line option that chose it, named in the message (e.g. ``--out``).
    allow_in_repo : bool
        Accept a folder inside a git work tree (the command's ``--allow-in-repo``).

    Raises
    ------
    KeyFileError
        Naming the folder, why, and where it would be safe or what to change.
    """
    tree = git_work_tree(folder)
    if tree is not None and not allow_in_repo:
        raise KeyFileError(
            f"{option} {folder}: inside the git work tree {tree}, where a private key can be "
            f"committed by accident; write it outside the checkout (e.g. {option} "
            f"{outside_work_tree(folder, tree)}), or pass --allow-in-repo to write it there anyway"
        )
    if os.name == "posix" and folder.is_dir():
        mode = folder.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(
                f"{option} {folder}: other users may open this folder (mode {mode:o}) and a "
                f"private key goes only into a folder of mode 700: `chmod 700 {folder}`, or "
                "choose a new folder"
            )


def make_private_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each with mode 0700."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # whatever the umask


def write_private(
    path: Path, data: bytes, *, option: str = "--out", allow_in_repo: bool = False
) -> None:
    """Create ``path`` with mode 0600 in a folder of mode 0700 and write ``data``; never
    replaces an existing file.

    Raises
    ------
    KeyFileError
        The folder is inside a git work tree (without ``allow_in_repo``) or open to other users
        (:func:`check_private_folder`; ``option`` names the option that chose it).
    FileExistsError
        ``path`` exists (key material is never overwritten).
    """
    check_private_folder(path.parent, option=option, allow_in_repo=allow_in_repo)
    make_private_folder(path.parent)
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


def generate_key_pair(
    out_dir: Path, name: str, *, option: str = "--out", allow_in_repo: bool = False
) -> tuple[Path, Path]:
    """Write a new EC P-256 key pair as ``out_dir/NAME.key`` (mode 0600) and ``NAME.pub``.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created with mode 0700; see :func:`check_private_folder`).
    name : str
        Hospital name (file names and the public key's comment).
    option : str
        The command-line option that chose ``out_dir`` (named in refusals).
    allow_in_repo : bool
        Write into a git work tree all the same.

    Returns
    -------
    (Path, Path)
        The private and the public key file.

    Raises
    ------
    KeyFileError
        Invalid name, either file exists, or a folder where a private key could leak
        (:func:`check_private_folder`); nothing is written or replaced then.
    """
    check_hospital_name(name)
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(
                f"{path} exists; a key pair is never overwritten (use another --out or --name)"
            )
    check_private_folder(out_dir, option=option, allow_in_repo=allow_in_repo)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        option=option,
        allow_in_repo=allow_in_repo,
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
