"""`fedcare server init`'s PKI: certificate SANs, key formats and modes, never overwriting."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from server.pki import PKI, PKIError, init_pki, server_cert_sans


def test_init_writes_ca_server_cert_and_hospital_keys(tmp_path):
    written = init_pki(
        tmp_path, hospitals=["cleveland", "va"], addresses=["10.1.2.3", "coord.example.org"]
    )
    pki = PKI(tmp_path)
    assert set(written) >= {
        pki.ca_cert,
        pki.server_cert,
        pki.hospital_key("va"),
        pki.hospital_pub("va"),
    }
    assert sorted(server_cert_sans(pki)) == ["10.1.2.3", "coord.example.org"]
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # signed by the consortium CA
    for path in (pki.ca_key, pki.server_key, pki.hospital_key("cleveland")):
        assert path.stat().st_mode & 0o777 == 0o600
    load_ssh_private_key(pki.hospital_key("va").read_bytes(), None)  # what flower-supernode loads
    load_ssh_public_key(pki.hospital_pub("va").read_bytes().split(b" fedcare")[0])
    assert pki.hospitals() == ["cleveland", "va"]


def test_rerun_adds_hospitals_and_never_replaces_key_material(tmp_path):
    init_pki(tmp_path, hospitals=["a"], addresses=["127.0.0.1"])
    pki = PKI(tmp_path)
    before = {
        p: p.read_bytes() for p in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.hospital_key("a"))
    }
    written = init_pki(tmp_path, hospitals=["a", "b"], addresses=["127.0.0.1"])
    assert written == [pki.hospital_key("b"), pki.hospital_pub("b")]
    assert all(p.read_bytes() == data for p, data in before.items())


def test_half_a_ca_or_a_bad_name_is_refused(tmp_path):
    init_pki(tmp_path, hospitals=["a"], addresses=["127.0.0.1"])
    PKI(tmp_path).ca_key.unlink()
    with pytest.raises(PKIError, match="only one of ca.pem / ca.key exists"):
        init_pki(tmp_path, hospitals=["a"], addresses=["127.0.0.1"])
    with pytest.raises(PKIError, match="hospital name '../x'"):
        init_pki(tmp_path / "new", hospitals=["../x"], addresses=["127.0.0.1"])
