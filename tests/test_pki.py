"""The consortium's keys: `server init` (CA apart, coordinator certificate), `client keygen` (the
hospital's own pair) and the coordinator's hospital registry (`server add-hospital` /
`remove-hospital` while the SuperLink is not running). Key formats, modes, never overwriting."""

from __future__ import annotations

import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from server.hospitals import HospitalRegistry
from server.pki import PKI, PKIError, default_ca_dir, init_pki, server_cert_sans
from shared_models.node_keys import KeyFileError, fingerprint, generate_key_pair, load_public_key
from simulations import cli


def test_init_writes_ca_apart_and_a_server_cert_for_dialled_and_loopback_addresses(tmp_path):
    root = tmp_path / "pki"
    written = init_pki(root, addresses=["10.1.2.3", "coord.example.org"])
    pki, ca_key = PKI(root), tmp_path / "pki-ca" / "ca.key"
    assert default_ca_dir(root) == tmp_path / "pki-ca"
    assert set(written) == {ca_key, pki.ca_cert, pki.server_cert, pki.server_key}
    # what `server start` reads holds no CA private key and no hospital key
    assert sorted(p.name for p in root.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert sorted(server_cert_sans(pki)) == [
        "10.1.2.3",
        "127.0.0.1",
        "coord.example.org",
        "localhost",
    ]
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(pki.server_cert.read_bytes()).verify_directly_issued_by(ca)
    for path in (ca_key, pki.server_key):
        assert path.stat().st_mode & 0o777 == 0o600
    pki.check_server_side()  # complete without the CA key


def test_rerun_never_replaces_key_material_and_needs_the_ca_key_for_a_new_certificate(tmp_path):
    root = tmp_path / "pki"
    init_pki(root, addresses=["127.0.0.1"])
    pki = PKI(root)
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.server_cert, pki.server_key)}
    assert init_pki(root, addresses=["127.0.0.1"]) == []
    assert all(p.read_bytes() == data for p, data in before.items())
    pki.server_cert.unlink()
    pki.server_key.unlink()
    with pytest.raises(PKIError, match="issuing one needs the CA key: pass the CA key folder"):
        init_pki(root, addresses=["127.0.0.1"], ca_dir=tmp_path / "elsewhere")
    assert init_pki(root, addresses=["127.0.0.1"]) == [pki.server_key, pki.server_cert]
    assert pki.ca_cert.read_bytes() == before[pki.ca_cert]


def test_ca_key_never_in_the_coordinators_folder_and_half_a_ca_is_refused(tmp_path):
    with pytest.raises(PKIError, match="must not live in the folder `server start` reads"):
        init_pki(tmp_path / "pki", addresses=["127.0.0.1"], ca_dir=tmp_path / "pki")
    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    PKI(tmp_path / "pki").ca_cert.unlink()
    with pytest.raises(PKIError, match="ca.key exists without"):
        init_pki(tmp_path / "pki", addresses=["127.0.0.1"])


def test_server_side_check_refuses_a_certificate_of_another_ca(tmp_path):
    init_pki(tmp_path / "a", addresses=["127.0.0.1"])
    init_pki(tmp_path / "b", addresses=["127.0.0.1"])
    (tmp_path / "a" / "server.pem").write_bytes((tmp_path / "b" / "server.pem").read_bytes())
    with pytest.raises(PKIError, match="was not issued by"):
        PKI(tmp_path / "a").check_server_side()


def test_keygen_writes_a_flower_key_pair_and_never_overwrites(tmp_path):
    key_path, pub_path = generate_key_pair(tmp_path / "keys", "cleveland")
    assert key_path.stat().st_mode & 0o777 == 0o600
    private = load_ssh_private_key(key_path.read_bytes(), None)  # what flower-supernode loads
    public = load_ssh_public_key(pub_path.read_bytes())  # what `flwr supernode register` loads
    assert private.public_key() == public
    assert pub_path.read_text().endswith(" fedcare-cleveland\n")
    assert fingerprint(load_public_key(pub_path)).startswith("SHA256:")
    before = key_path.read_bytes()
    with pytest.raises(KeyFileError, match="never overwritten"):
        generate_key_pair(tmp_path / "keys", "cleveland")
    assert key_path.read_bytes() == before
    with pytest.raises(KeyFileError, match="hospital name '../x'"):
        generate_key_pair(tmp_path, "../x")


def _fedcare(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedcare", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_client_keygen_command(monkeypatch, capsys, tmp_path):
    code, out = _fedcare(
        monkeypatch, capsys, "client", "keygen", "--out", str(tmp_path), "--name", "va"
    )
    assert code == 0, out
    assert (tmp_path / "va.key").stat().st_mode & 0o777 == 0o600
    assert "send va.pub to the coordinator" in out and "fedcare server add-hospital" in out
    code, out = _fedcare(
        monkeypatch, capsys, "client", "keygen", "--out", str(tmp_path), "--name", "va"
    )
    assert code == 2 and "exists; a key pair is never overwritten" in out


def test_registry_adds_public_keys_only_and_refuses_conflicts(tmp_path):
    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    pki = PKI(tmp_path / "pki")
    registry = HospitalRegistry(pki)
    key_a, pub_a = generate_key_pair(tmp_path / "hospital-a", "a")
    _, pub_b = generate_key_pair(tmp_path / "hospital-b", "b")
    with pytest.raises(KeyFileError, match="is a PRIVATE key: it must never leave the hospital"):
        registry.add_key("a", key_a)
    fp = registry.add_key("a", pub_a)
    assert registry.add_key("a", pub_a) == fp  # the same key again: nothing changes
    assert load_public_key(pki.hospital_pub("a")) == load_public_key(pub_a)
    with pytest.raises(KeyFileError, match="hospital 'a' already has another key"):
        registry.add_key("a", pub_b)
    with pytest.raises(KeyFileError, match="already added as hospital 'a'"):
        registry.add_key("c", pub_a)
    assert pki.hospitals() == ["a"]
    assert registry.load()["hospitals"] == {"a": {"node_id": None, "fingerprint": fp}}


def test_a_removed_registered_key_stays_refused(tmp_path):
    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    pki = PKI(tmp_path / "pki")
    registry = HospitalRegistry(pki)
    _, pub = generate_key_pair(tmp_path / "h", "a")
    registry.add_key("a", pub)
    data = registry.load()
    data["hospitals"]["a"]["node_id"] = 42  # as after `flwr supernode register`
    registry.save(data)
    assert registry.remove("a") == 42
    assert pki.hospitals() == [] and registry.load()["revoked"] == [42]  # unregistered at start
    with pytest.raises(KeyFileError, match="a removed key stays refused"):
        registry.add_key("a", pub)
    with pytest.raises(KeyFileError, match="no hospital 'a'"):
        registry.remove("a")


def test_init_without_demo_makes_no_hospital_key_and_demo_says_so(monkeypatch, capsys, tmp_path):
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(tmp_path / "real"))
    assert code == 0, out
    assert PKI(tmp_path / "real").hospitals() == [] and "DEMO" not in out
    assert "add-hospital" in out
    code, out = _fedcare(
        monkeypatch,
        capsys,
        "server",
        "init",
        "--out",
        str(tmp_path / "pki"),
        "--demo-hospitals",
        "a,b",
    )
    assert code == 0, out
    assert "DEMO ONLY: these hospital private keys were made on the coordinator's machine" in out
    assert PKI(tmp_path / "pki").hospitals() == ["a", "b"]
    assert (tmp_path / "demo-hospitals" / "a" / "a.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "pki").rglob("*.key")] == ["server.key"]


def test_start_refuses_a_public_port_on_the_superlinks_port_and_an_old_certificate(
    monkeypatch, capsys, tmp_path
):
    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    code, out = _fedcare(monkeypatch, capsys, "server", "start", "--pki", str(tmp_path / "pki"),
                         "--port", "19500", "--internal-port", "19500",
                         "--state", str(tmp_path / "state"))  # fmt: skip
    assert code == 2 and "collide on 127.0.0.1; choose two ports" in out
    assert not (tmp_path / "state").exists()  # refused before anything started
    # a certificate issued without the loopback SAN (fedcare 0.1 with --address only)
    from server import pki as pki_module

    keys = PKI(tmp_path / "pki")
    keys.server_cert.unlink()
    keys.server_key.unlink()
    monkeypatch.setattr(pki_module, "LOOPBACK_SANS", ())
    init_pki(tmp_path / "pki", addresses=["coord.example.org"])
    assert "127.0.0.1" not in server_cert_sans(keys)
    with pytest.raises(PKIError, match="is not valid for 127.0.0.1"):
        keys.check_server_side()


def test_status_names_every_state_it_shows_and_the_readme_explains_each():
    """`server status` rows from Flower's `supernode list` JSON and the registry: removed
    (unregistered) nodes are left out, keys not registered with the SuperLink are shown as
    `key stored`; every state shown has a meaning printed under the table and in docs/deployment.md."""
    from pathlib import Path

    from server.hospitals import HOSPITAL_STATES, hospital_rows

    nodes = [
        {"node-id": "11", "status": "online", "created-at": "t0", "online-at": "t1",
         "offline-at": ""},
        {"node-id": "12", "status": "offline", "created-at": "t0", "online-at": "t1",
         "offline-at": "t2"},
        {"node-id": "13", "status": "registered", "created-at": "t3", "online-at": "",
         "offline-at": ""},
        {"node-id": "14", "status": "unregistered", "created-at": "t0", "online-at": "",
         "offline-at": "t4"},
        {"node-id": "15", "status": "online", "created-at": "t0", "online-at": "t5",
         "offline-at": ""},
    ]  # fmt: skip
    registry = {"hospitals": {"a": {"node_id": 11}, "b": {"node_id": 12}, "c": {"node_id": 13},
                              "e": {"node_id": None}}, "removed_keys": []}  # fmt: skip
    rows = hospital_rows(nodes, registry)
    assert rows == [("a", "11", "online", "t1"), ("b", "12", "offline", "t2"),
                    ("c", "13", "registered", "t3"), ("?", "15", "online", "t5"),
                    ("e", "-", "key stored", "-")]  # fmt: skip
    assert {row[2] for row in rows} == set(HOSPITAL_STATES)
    readme = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    section = readme.split("### Joining, and what `server status` shows")[1].split("\n### ")[0]
    for state in HOSPITAL_STATES:
        assert f"| `{state}` |" in section, state


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_private_keys_are_0600_in_folders_of_0700(monkeypatch, capsys, tmp_path):
    """`server init` (CA key, coordinator key, demo hospitals) and `client keygen`: every private
    key 0600, every folder made for one 0700 (missing parents too); public files stay readable."""
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(tmp_path / "coord" / "pki"),
                         "--demo-hospitals", "a")  # fmt: skip
    assert code == 0, out
    coord = tmp_path / "coord"
    for key in ("pki-ca/ca.key", "pki/server.key", "demo-hospitals/a/a.key"):
        assert _mode(coord / key) == 0o600, key
    for folder in ("", "pki", "pki-ca", "demo-hospitals", "demo-hospitals/a"):
        assert _mode(coord / folder) == 0o700, folder
    assert _mode(coord / "pki" / "ca.pem") & 0o600 == 0o600
    code, out = _fedcare(monkeypatch, capsys, "client", "keygen", "--out",
                         str(tmp_path / "hospital-a" / "keys"), "--name", "a")  # fmt: skip
    assert code == 0, out
    assert _mode(tmp_path / "hospital-a" / "keys" / "a.key") == 0o600
    assert _mode(tmp_path / "hospital-a") == _mode(tmp_path / "hospital-a" / "keys") == 0o700
    # a folder others may open is refused (nothing written), naming the fix
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    code, out = _fedcare(
        monkeypatch, capsys, "client", "keygen", "--out", str(shared), "--name", "b"
    )
    assert code == 2 and f"--out {shared}: other users may open this folder (mode 755)" in out
    assert f"`chmod 700 {shared}`" in out and list(shared.iterdir()) == []


def test_a_private_key_inside_a_git_work_tree_is_refused_unless_allowed(
    monkeypatch, capsys, tmp_path
):
    """In a checkout (`git init`), `server init` and `client keygen` write no private key: the
    message names the work tree, a place outside it and --allow-in-repo; with the flag they do."""
    import subprocess

    repo = tmp_path / "checkout"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(repo / "pki"))
    assert code == 2 and f"--out {repo / 'pki'}: inside the git work tree {repo}" in out, out
    assert f"(e.g. --out {tmp_path / 'fedcare-private' / 'pki'})" in out
    assert "or pass --allow-in-repo to write it there anyway" in out and "Traceback" not in out
    assert sorted(p.name for p in repo.iterdir()) == [".git"]  # not even the CA
    outside = tmp_path / "pki"  # the CA key folder (default: beside --out) inside the checkout
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(outside),
                         "--ca-dir", str(repo / "ca"))  # fmt: skip
    assert code == 2 and f"--ca-dir {repo / 'ca'}: inside the git work tree" in out
    assert not outside.exists()
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(outside),
                         "--demo-hospitals", "a", "--demo-dir", str(repo / "demo"))  # fmt: skip
    assert code == 2 and f"--demo-dir {repo / 'demo'}: inside the git work tree" in out
    assert not outside.exists()
    keys = repo / "hospital-a" / "keys"
    code, out = _fedcare(monkeypatch, capsys, "client", "keygen", "--out", str(keys), "--name", "a")
    assert code == 2 and f"--out {keys}: inside the git work tree {repo}" in out
    assert f"(e.g. --out {tmp_path / 'fedcare-private' / 'hospital-a' / 'keys'})" in out
    assert not (repo / "hospital-a").exists()
    code, out = _fedcare(monkeypatch, capsys, "client", "keygen", "--out", str(keys), "--name", "a",
                         "--allow-in-repo")  # fmt: skip
    assert code == 0 and _mode(keys / "a.key") == 0o600, out
    code, out = _fedcare(monkeypatch, capsys, "server", "init", "--out", str(repo / "pki"),
                         "--allow-in-repo")  # fmt: skip
    assert code == 0 and _mode(repo / "pki-ca" / "ca.key") == 0o600, out


def test_the_repository_ignores_what_the_readme_flow_creates():
    """Every folder the deployment commands of docs/deployment.md write (and fedcare's default folders) is
    ignored by the repository's .gitignore: keys, ledgers, exported data, coordinator state."""
    import re
    import subprocess

    from shared_models.protocol import APP_DIR

    if not (APP_DIR / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (APP_DIR / "docs" / "deployment.md").read_text()
    flow = readme.split("## A real federation")[1].split("```bash")[1].split("```")[0]
    options = r"--(?:out|state|ledger|export-hospitals|ca-dir|demo-dir)"
    folders = set(re.findall(rf"{options}[ =](\S+)", flow))
    folders |= {"pki-ca", "demo-hospitals", "fedcare-hospital", "fedcare-state", "runs"}  # defaults
    assert {"pki", "coordinator", "hospital-a/keys", "data", "runs/first"} <= folders, folders
    for folder in sorted(folders):
        probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/anything"], cwd=APP_DIR)
        assert probe.returncode == 0, f"{folder}/ is not ignored by .gitignore"
