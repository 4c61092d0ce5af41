"""The coordinator's registry of hospitals: name -> public key -> Flower node id.

A hospital makes its own key pair (``fedcare client keygen``) and sends only ``NAME.pub``. The
coordinator's operator adds it (``fedcare server add-hospital NAME FILE.pub``): the key is
copied to ``PKI/hospitals/NAME.pub`` and registered with the running SuperLink through Flower's
Control API on the loopback side (``flwr supernode register FILE --name NAME --format json``),
which answers with the hospital's node id. The SuperLink stores the name with the key, so the
ServerApp learns each node's registered name from the SuperLink itself (``Grid.get_nodes``),
never from what a hospital says about itself.

``PKI/registered.json``::

    {"hospitals": {"NAME": {"node_id": 123 | null, "fingerprint": "SHA256:..."}},
     "revoked": [node ids still to unregister],
     "removed_keys": [{"name": "NAME", "fingerprint": "SHA256:...", "removed_at": "..."}]}

``node_id`` is null while the key is not yet registered (the SuperLink was not running);
``fedcare server start`` registers such keys and unregisters revoked nodes when it starts. A
removed key cannot come back (``removed_keys`` here; the gateway refuses it, and the running
SuperLink keeps it unregistered): the hospital makes a new pair. Written atomically.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.flwr_cli import CONNECTION, FlowerCLI, FlowerCLIError
from server.pki import PKI, PKIError
from shared_models.files import write_json_atomic
from shared_models.node_keys import (
    KeyFileError,
    check_hospital_name,
    fingerprint,
    load_public_key,
    openssh_public_line,
    write_public,
)

REGISTERED = "registered.json"
# a key another process is registering: its node id is looked for RACE_TRIES times, RACE_WAIT s apart
RACE_TRIES, RACE_WAIT = 10, 0.3


def superlink_reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass
class HospitalRegistry:
    """``registered.json`` and ``hospitals/*.pub`` of one PKI folder."""

    pki: PKI

    @property
    def path(self) -> Path:
        return self.pki.root / REGISTERED

    def load(self) -> dict[str, Any]:
        """The registry document (empty when the file does not exist yet).

        Raises
        ------
        PKIError
            The file is not valid JSON of the expected shape (never reset automatically).
        """
        if not self.path.exists():
            return {"hospitals": {}, "revoked": [], "removed_keys": []}
        try:
            data = json.loads(self.path.read_text())
        except ValueError as exc:
            raise PKIError(f"{self.path}: unreadable ({exc}); restore it from a backup") from None
        if isinstance(data, dict) and "hospitals" not in data:  # fedcare 0.1: {name: node id}
            data = {
                "hospitals": {k: {"node_id": v, "fingerprint": None} for k, v in data.items()},
                "revoked": [],
            }
        if not isinstance(data, dict) or not isinstance(data.get("hospitals"), dict):
            raise PKIError(f"{self.path}: not a fedcare hospital registry; restore it")
        data.setdefault("revoked", [])
        data.setdefault("removed_keys", [])
        return data

    def save(self, data: dict[str, Any]) -> None:
        write_json_atomic(self.path, data)

    def node_ids(self) -> dict[str, int]:
        """Registered hospital name -> node id (only hospitals with one)."""
        return {
            name: int(entry["node_id"])
            for name, entry in self.load()["hospitals"].items()
            if entry.get("node_id") is not None
        }

    def add_key(self, name: str, pub_file: Path) -> str:
        """Copy a hospital's public key to ``hospitals/NAME.pub``; return its fingerprint.

        Adding the same key under the same name again changes nothing.

        Raises
        ------
        KeyFileError
            Invalid name or key file; another key already under this name; this key already
            under another name.
        """
        check_hospital_name(name)
        key = load_public_key(pub_file)
        fp = fingerprint(key)
        data = self.load()
        for removed in data["removed_keys"]:
            if removed["fingerprint"] == fp:
                raise KeyFileError(
                    f"{pub_file}: this key ({fp}) belonged to hospital {removed['name']!r}, "
                    f"removed {removed['removed_at']}; a removed key stays refused. The hospital "
                    "makes a new pair with `fedcare client keygen` and sends the new NAME.pub"
                )
        stored = self.pki.hospital_pub(name)
        for other in self.pki.hospitals():
            if other == name:
                continue
            if fingerprint(load_public_key(self.pki.hospital_pub(other))) == fp:
                raise KeyFileError(
                    f"{pub_file}: this key is already added as hospital {other!r} "
                    f"({fp}); one key per hospital"
                )
        if stored.exists():
            if fingerprint(load_public_key(stored)) != fp:
                raise KeyFileError(
                    f"hospital {name!r} already has another key ({stored}); to replace it, "
                    f"first `fedcare server remove-hospital {name} --pki {self.pki.root}`"
                )
        else:
            write_public(stored, openssh_public_line(key, name))
        entry = data["hospitals"].setdefault(name, {"node_id": None, "fingerprint": fp})
        entry["fingerprint"] = fp
        self.save(data)
        return fp

    def register(self, cli: FlowerCLI, name: str) -> int:
        """Register ``hospitals/NAME.pub`` with the running SuperLink (Flower's Control API),
        under the hospital's name; record and return the node id.

        Raises
        ------
        FlowerCLIError
            The SuperLink refused (e.g. the key is already registered there).
        """
        answer = cli.json(
            "supernode", "register", str(self.pki.hospital_pub(name)), CONNECTION, "--name", name
        )
        node_id = int(answer["node-id"])
        data = self.load()
        data["hospitals"].setdefault(name, {"fingerprint": None})["node_id"] = node_id
        self.save(data)
        return node_id

    def forget(self, name: str) -> None:
        """Undo :meth:`add_key` for a key the SuperLink refused to register (never registered)."""
        data = self.load()
        entry = data["hospitals"].get(name)
        if entry is not None and entry.get("node_id") is None:
            del data["hospitals"][name]
            self.save(data)
            self.pki.hospital_pub(name).unlink(missing_ok=True)

    def remove(self, name: str) -> int | None:
        """Delete the hospital's key and registry entry; return its node id (still registered
        at the SuperLink until :meth:`unregister_revoked` runs), or None.

        Raises
        ------
        KeyFileError
            No hospital of that name.
        """
        data = self.load()
        entry = data["hospitals"].pop(name, None)
        stored = self.pki.hospital_pub(name)
        if entry is None and not stored.exists():
            known = ", ".join(sorted(data["hospitals"])) or "none"
            raise KeyFileError(f"no hospital {name!r} in {self.pki.root} (registered: {known})")
        node_id = None if entry is None else entry.get("node_id")
        if node_id is not None and int(node_id) not in data["revoked"]:
            data["revoked"].append(int(node_id))
        if node_id is not None:  # registered once: refused from now on (removed_keys)
            fp = entry.get("fingerprint") or fingerprint(load_public_key(stored))
            data["removed_keys"].append(
                {
                    "name": name,
                    "fingerprint": fp,
                    "removed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        self.save(data)  # revoked first: a crash here leaves the node marked for removal
        stored.unlink(missing_ok=True)
        return None if node_id is None else int(node_id)

    def unregister_revoked(self, cli: FlowerCLI) -> list[int]:
        """Unregister every revoked node at the running SuperLink; return those removed.

        A node the SuperLink no longer lists as registered counts as removed.

        Raises
        ------
        FlowerCLIError
            The SuperLink refused for another reason.
        """
        revoked = list(self.load()["revoked"])
        if not revoked:  # nothing to write: another process may be saving a registration
            return []
        active = _active_nodes(cli)
        for node_id in revoked:
            if node_id in active:
                cli.json("supernode", "unregister", str(node_id), CONNECTION)
        data = self.load()  # as it is now, not as it was before the SuperLink was asked
        data["revoked"] = [n for n in data["revoked"] if n not in revoked]
        self.save(data)
        return revoked

    def reconcile(self, cli: FlowerCLI) -> tuple[dict[str, int], dict[str, str]]:
        """At ``server start`` (and ``add-hospital``): unregister revoked nodes, register every
        key in ``hospitals/`` the SuperLink does not know (yet).

        Returns
        -------
        (dict[str, int], dict[str, str])
            Registered name -> node id, and name -> reason for each key that could not be
            registered (the others are registered regardless).

        Raises
        ------
        FlowerCLIError
            The SuperLink could not be asked (listing or unregistering nodes failed).
        """
        self.unregister_revoked(cli)
        active = _active_nodes(cli)
        known = self.node_ids()
        registered: dict[str, int] = {}
        failed: dict[str, str] = {}
        for name in self.pki.hospitals():
            try:
                if known.get(name) not in active:
                    if name not in self.load()["hospitals"]:
                        self.add_key(name, self.pki.hospital_pub(name))  # copied in by hand
                    known[name] = self.register(cli, name)
                registered[name] = known[name]
            except (FlowerCLIError, KeyFileError) as exc:
                node_id = self._registered_meanwhile(cli, name)
                if node_id is None:
                    failed[name] = str(exc)
                else:
                    registered[name] = node_id
        return registered, failed

    def _registered_meanwhile(self, cli: FlowerCLI, name: str) -> int | None:
        """The node id of ``name`` if another process registered its key since this one looked
        (``server add-hospital`` while ``server start`` registers the PKI folder's keys: the
        SuperLink then answers the second "Public key already in use"), else None. The other
        process records the node id just after the SuperLink answers it: a few seconds' wait."""
        for _ in range(RACE_TRIES):
            node_id = self.node_ids().get(name)
            try:
                if node_id is not None and node_id in _active_nodes(cli):
                    return node_id
            except FlowerCLIError:
                return None
            time.sleep(RACE_WAIT)
        return None


# every state `fedcare server status` shows for a hospital, and what it means (docs/deployment.md,
# "Joining, and what `server status` shows", lists the same states; tests/test_pki.py ties them)
HOSPITAL_STATES = {
    "online": "its daemon is connected: heartbeats arrive (since: when it connected)",
    "offline": "its daemon was connected and its heartbeats stopped: daemon stopped, machine or "
    "network down (since: when the coordinator noticed)",
    "registered": "its key is registered, its daemon has not connected yet: not started, or "
    "started with another key (its log says) (since: when the key was registered)",
    "key stored": "its key is in the PKI folder but not registered with the SuperLink: the "
    "coordinator refused it or was not running when it was added; `fedcare server start` "
    "registers it (or says why not)",
}


def hospital_rows(
    nodes: list[dict[str, Any]], registry: dict[str, Any]
) -> list[tuple[str, str, str, str]]:
    """The rows of `fedcare server status`' hospital table: (name, node id, state, since).

    Parameters
    ----------
    nodes : list of dict
        ``flwr supernode list --format json``'s ``nodes`` (``node-id``, ``status``: Flower's
        ``registered`` / ``online`` / ``offline`` / ``unregistered``, ``created-at``,
        ``online-at``, ``offline-at``).
    registry : dict
        :meth:`HospitalRegistry.load`'s document.

    Returns
    -------
    list of (str, str, str, str)
        One row per node the SuperLink has not unregistered (removed hospitals are not shown),
        named by the registry ("?" for a node registered by other means), then one per key
        added but not registered (state ``key stored``). Every state is a key of
        :data:`HOSPITAL_STATES`.
    """
    hospitals = registry["hospitals"]
    names = {int(e["node_id"]): n for n, e in hospitals.items() if e.get("node_id") is not None}
    since_key = {"online": "online-at", "offline": "offline-at", "registered": "created-at"}
    rows = [
        (names.get(int(node["node-id"]), "?"), str(node["node-id"]), node["status"],
         str(node.get(since_key.get(node["status"], ""), None) or "-"))
        for node in nodes
        if node["status"] != "unregistered"
    ]  # fmt: skip
    rows += [
        (name, "-", "key stored", "-")
        for name, entry in sorted(hospitals.items())
        if entry.get("node_id") is None
    ]
    return rows


def _active_nodes(cli: FlowerCLI) -> set[int]:
    """Node ids the SuperLink has registered and not unregistered."""
    nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
    return {int(n["node-id"]) for n in nodes if n.get("status") != "unregistered"}


__all__ = [
    "HOSPITAL_STATES",
    "FlowerCLIError",
    "HospitalRegistry",
    "KeyFileError",
    "hospital_rows",
    "superlink_reachable",
]
