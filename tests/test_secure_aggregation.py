"""SecAgg+ end to end through Flower's Simulation Engine, in this process so that a spy on the
in-memory Grid sees exactly what the ServerApp receives from the hospitals.

Four one-round federations of four hospitals (breast-cancer, MLP, without DP: DP-SGD noise comes
from each hospital's CSPRNG and differs from run to run, while non-private training is a function
of the seed), same seeds, so each hospital's local update is the same in every run:
- plain FedAvg: the spy records every hospital's individual update (the reference);
- SecAgg+: the ServerApp receives no ArrayRecord from any hospital, only masked vectors; the
  global model equals FedAvg of the reference updates within SecAgg+'s quantisation error;
- SecAgg+ with hospital-1 dropping after the key exchange (it trains, then has more examples than
  secagg.max-weight allows and refuses to send): the round still completes, hospital-1's masks
  are reconstructed from the others' shares, and the global model equals FedAvg of the three
  other hospitals' reference updates;
- SecAgg+ with hospital-2 refusing at setup (its privacy ledger is unreadable): it is left out of
  the protocol and the global model equals FedAvg of the other three.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.superlink.grid import InMemoryGrid
from safetensors.numpy import load_file

from server.run_config import default_run_config
from simulations.engine import run_federation

HOSPITALS = 4
ATOL = 1e-4  # SecAgg+ quantises each weight to 2 x 8 / 2^22 (Flower's defaults)


def _federate(tmp_path, name: str, monkeypatch, **overrides) -> tuple[dict, list[Message]]:
    received: list[Message] = []
    original = InMemoryGrid.pull_messages

    def spy(self, message_ids):  # type: ignore[no-untyped-def]
        got = list(original(self, message_ids))
        received.extend(got)
        return got

    monkeypatch.setattr(InMemoryGrid, "pull_messages", spy)
    cfg = default_run_config()
    cfg.update(
        {
            "train.rounds": 1, "simulation.hospitals": HOSPITALS, "output.dir": str(tmp_path / name),
            "strategy.min-available-nodes": HOSPITALS,  # as `fedcare simulate` sets it
            "run.id": f"secagg-test-{name}", "simulation.ledger-dir": str(tmp_path / name / "ledgers"),
            "dp.enabled": False, **overrides,
        }
    )  # fmt: skip
    run_federation(run_config=cfg, num_supernodes=HOSPITALS, in_process=True)  # simulate's default
    monkeypatch.setattr(InMemoryGrid, "pull_messages", original)
    weights = load_file(str(tmp_path / name / "checkpoints" / "round-001.safetensors"))
    return weights, received


def _fedavg(updates: dict[str, tuple[dict[str, np.ndarray], float]], sites) -> dict:
    total = sum(updates[s][1] for s in sites)
    keys = next(iter(updates.values()))[0].keys()
    return {k: sum(updates[s][0][k] * updates[s][1] for s in sites) / total for k in keys}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg")
    mp = pytest.MonkeyPatch()
    try:
        _, plain = _federate(tmp, "plain", mp)
        updates = {
            str(r.content.config_records["info"]["site"]): (
                {k: a.numpy() for k, a in r.content.array_records["arrays"].items()},
                float(r.content.metric_records["metrics"]["num-examples"]),
            )
            for r in plain
            if r.metadata.message_type == "train" and not r.has_error()
        }
        secure, received = _federate(tmp, "secagg", mp, **{"secagg.enabled": True})
        # hospital-1 has 100 training examples, the others 99
        dropped, dropped_received = _federate(
            tmp, "dropped", mp, **{"secagg.enabled": True, "secagg.max-weight": 99.5}
        )
        broken = tmp / "early" / "ledgers" / "hospital-2" / "runs"
        broken.mkdir(parents=True)
        (broken / "secagg-test-early.json").write_text('{"run_id": "secagg-test-ear')  # truncated
        early, early_received = _federate(tmp, "early", mp, **{"secagg.enabled": True})
    finally:
        mp.undo()
    return (
        updates, (secure, received), (dropped, dropped_received, tmp / "dropped"),
        (early, early_received, tmp / "early"),
    )  # fmt: skip


@pytest.mark.slow
def test_reference_run_sees_individual_updates(runs):
    updates, *_ = runs
    assert sorted(updates) == [f"hospital-{i}" for i in range(1, HOSPITALS + 1)]


@pytest.mark.slow
def test_server_receives_no_individual_update(runs):
    updates, (_, received), *_ = runs
    train = [r for r in received if r.metadata.message_type == "train"]
    assert len(train) == 4 * HOSPITALS  # setup, share keys, masked vectors, unmask shares
    masked = []
    for reply in train:
        assert not reply.has_error()
        for record in reply.content.array_records.values():
            assert len(record) == 0, "an ArrayRecord with weights reached the ServerApp"
        protocol = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in protocol:
            masked.append(protocol[Key.MASKED_PARAMETERS])
    assert len(masked) == HOSPITALS
    # masked vectors are uniform over the ring Z_(2^32), nothing like weights in [-1, 1]
    for vectors in masked:
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in vectors]) / 2**32
        assert values.min() >= 0 and values.max() < 1
        assert 0.45 < values.mean() < 0.55 and 0.27 < values.std() < 0.31  # uniform: 0.5, 0.289
    # and no reply carries any hospital's update bytes
    blobs = [a.tobytes() for arrays, _ in updates.values() for a in arrays.values() if a.size > 8]
    for reply in train:
        for value in reply.content.config_records[RECORD_KEY_CONFIGS].values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, bytes):
                    assert not any(blob in item for blob in blobs)


@pytest.mark.slow
def test_secure_aggregate_equals_fedavg(runs):
    updates, (secure, _), *_ = runs
    expected = _fedavg(updates, sorted(updates))
    for key, value in expected.items():
        assert secure[key].dtype == np.float32
        np.testing.assert_allclose(secure[key], value, atol=ATOL, rtol=0)
        # ... and the protocol did change the bits (it is not the plain path)
    assert any(not np.array_equal(secure[k], expected[k].astype(np.float32)) for k in expected)


@pytest.mark.slow
def test_round_completes_when_a_hospital_drops_after_key_exchange(runs):
    import json

    updates, _, (dropped, received, run_dir), _ = runs
    stages = [r for r in received if r.metadata.message_type == "train"]
    # hospital-1 answered setup and share-keys, trained, then refused to send its masked vector
    errors = [r for r in stages if r.has_error()]
    assert (
        len(errors) == 1
        and "site hospital-1 refused: 100 training examples exceed" in errors[0].error.reason
    )
    assert len(stages) == 4 + 4 + 4 + 3
    survivors = [s for s in sorted(updates) if s != "hospital-1"]
    expected = _fedavg(updates, survivors)
    for key, value in expected.items():
        np.testing.assert_allclose(dropped[key], value, atol=ATOL, rtol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [f["hospital"] for f in summary["failures"] if f["kind"] == "train"] == ["hospital-1"]
    assert summary["secure_aggregation"]["enabled"] is True


@pytest.mark.slow
def test_hospital_refusing_before_the_key_exchange_is_left_out(runs):
    import json

    updates, _, _, (early, received, run_dir) = runs
    stages = [r for r in received if r.metadata.message_type == "train"]
    errors = [r for r in stages if r.has_error()]
    assert (
        len(errors) == 1
        and "site hospital-2 refused: its privacy ledger cannot be used" in errors[0].error.reason
    )
    assert len(stages) == 4 + 3 + 3 + 3  # refused at setup, then left out of every stage
    expected = _fedavg(updates, [s for s in sorted(updates) if s != "hospital-2"])
    for key, value in expected.items():
        np.testing.assert_allclose(early[key], value, atol=ATOL, rtol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [f["hospital"] for f in summary["failures"] if f["kind"] == "train"] == ["hospital-2"]


@pytest.mark.slow
def test_audit_log_lists_every_protocol_message_and_no_unmasked_weights(runs, tmp_path_factory):
    import json

    _, (_, received), *_ = runs
    root = next(tmp_path_factory.getbasetemp().glob("secagg*")) / "secagg" / "ledgers"
    for site in [f"hospital-{i}" for i in range(1, HOSPITALS + 1)]:
        lines = [json.loads(x) for x in (root / site / "audit.jsonl").read_text().splitlines()]
        protocol = [e for e in lines if "secagg_stage" in e]
        assert [(e["direction"], e["secagg_stage"]) for e in protocol] == [
            (d, s)
            for s in ("setup", "share_keys", "collect_masked_vectors", "unmask")
            for d in ("received", "sent")
        ]
        for entry in (e for e in protocol if e["direction"] == "sent"):
            assert entry["records"].get("arrays", 0) == 0  # weights never leave unmasked
            assert entry["records"].get("fitres.parameters", 0) == 0
            assert entry["bytes"] > 0
        masked = next(
            e
            for e in protocol
            if e["direction"] == "sent" and e["secagg_stage"] == "collect_masked_vectors"
        )
        assert masked["records"]["secaggplus_configs"] > 4 * 1000  # the masked vector (int64s)
        handed = [e for e in lines if e["direction"].startswith("handed to SecAgg+")]
        assert len(handed) == 1 and handed[0]["decision"] == "trained"
        assert handed[0]["records"]["arrays"] > 0  # the update went to SecAgg+, not the network


def _protocol_message(configs: dict) -> Message:  # type: ignore[type-arg]
    from flwr.app import ConfigRecord, RecordDict

    return Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), dst_node_id=7, message_type="train"
    )


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        ({Key.THRESHOLD: 1}, "reconstruction threshold 1 with 3 shares"),
        ({Key.THRESHOLD: 4}, "reconstruction threshold 4 with 3 shares"),
        (
            {Key.THRESHOLD: 3},
            "reconstruction threshold 3 with 3 shares (run config "
            "secagg.reconstruction-threshold = 0.66 gives 2)",
        ),
        (
            {Key.SHARE_NUMBER: 5},
            "reconstruction threshold 2 with 5 shares (run config "
            "secagg.reconstruction-threshold = 0.66 gives 3)",
        ),
        ({Key.CLIPPING_RANGE: 80.0}, "clipping range 80.0 (run config: 8)"),
        ({Key.MAX_WEIGHT: 1e9}, "max weight 1000000000.0 (run config: 1000)"),
    ],
)
def test_hospital_refuses_a_protocol_the_coordinator_weakened(default_cfg, change, refusal):
    """The setup parameters come from the coordinator; a hospital takes part only with the
    threshold and ranges that keep its update hidden (checked against its run config)."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from client.client_app import SITE_REFUSED
    from client.client_app import app as client_app
    from tests.handlers import make_context, use_task_identity

    use_task_identity()
    cfg = {**default_cfg, "secagg.enabled": True}
    node = {"partition-id": 0, "num-partitions": 3}
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32,
             Key.MAX_WEIGHT: 1000.0}  # fmt: skip
    accepted = client_app(_protocol_message(setup), make_context(cfg, node))
    assert not accepted.has_error(), accepted.error  # the run config's own parameters
    reply = client_app(_protocol_message({**setup, **change}), make_context(cfg, node))
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert "SecAgg+ setup rejected: " + refusal in reply.error.reason


def test_hospital_refuses_to_share_keys_with_fewer_peers_than_the_threshold(default_cfg):
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from client.client_app import SITE_REFUSED
    from client.client_app import app as client_app
    from tests.handlers import make_context, use_task_identity

    use_task_identity()
    ctx = make_context(
        {**default_cfg, "secagg.enabled": True, "secagg.reconstruction-threshold": 3.0},
        {"partition-id": 0, "num-partitions": 3},
    )
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 3,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32,
             Key.MAX_WEIGHT: 1000.0}  # fmt: skip
    keys = client_app(_protocol_message(setup), ctx)
    assert not keys.has_error(), keys.error
    own = keys.content.config_records[RECORD_KEY_CONFIGS]
    public = [own[Key.PUBLIC_KEY_1], own[Key.PUBLIC_KEY_2]]
    # the coordinator forwards the keys of this hospital (node 7) and of only one other
    peers = {Key.STAGE: Stage.SHARE_KEYS, "7": public, "8": public}
    reply = client_app(_protocol_message(peers), ctx)
    assert reply.has_error() and reply.error.code == SITE_REFUSED
    assert (
        "share-keys rejected: 2 hospital(s) to share with, fewer than the reconstruction threshold 3"
        in reply.error.reason
    )


def test_hospital_refuses_a_threshold_below_a_strict_majority(default_cfg):
    """Even when the run config itself asks for it: 2 of 6 hospitals could unmask one update."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from client.client_app import app as client_app
    from tests.handlers import make_context, use_task_identity

    use_task_identity()
    cfg = {**default_cfg, "secagg.enabled": True, "secagg.reconstruction-threshold": 0.3}
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 6, Key.SHARE_NUMBER: 6, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: 8.0, Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32,
             Key.MAX_WEIGHT: 1000.0}  # fmt: skip
    reply = client_app(
        _protocol_message(setup), make_context(cfg, {"partition-id": 0, "num-partitions": 3})
    )
    assert reply.has_error()
    assert "not a strict majority of the 6 hospitals" in reply.error.reason
