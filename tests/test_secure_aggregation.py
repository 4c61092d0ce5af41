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

Then, without an engine, the real ClientApp of three hospitals driven stage by stage as a hostile
coordinator would: setup parameters, the unmask stage's lists of active and dropped hospitals,
and range refusals that must not carry the hospital's values.
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


def _fedavg(updates: dict[str, tuple[dict[str, np.ndarray], float]], hospitals) -> dict:
    total = sum(updates[s][1] for s in hospitals)
    keys = next(iter(updates.values()))[0].keys()
    return {k: sum(updates[s][0][k] * updates[s][1] for s in hospitals) / total for k in keys}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secagg")
    mp = pytest.MonkeyPatch()
    try:
        _, plain = _federate(tmp, "plain", mp)
        updates = {
            str(r.content.config_records["info"]["hospital"]): (
                {k: a.numpy() for k, a in r.content.array_records["arrays"].items()},
                float(r.content.metric_records["metrics"]["num-examples"]),
            )
            for r in plain
            if r.metadata.message_type == "train" and not r.has_error()
        }
        secure, received = _federate(tmp, "secagg", mp, **{"secagg.enabled": True})
        # a max weight between the two largest hospitals: the largest refuses to mask
        sizes = sorted((n, hospital) for hospital, (_, n) in updates.items())
        (second, _), (largest, biggest) = sizes[-2:]
        assert largest > second
        dropped, dropped_received = _federate(
            tmp, "dropped", mp,
            **{"secagg.enabled": True, "secagg.max-weight": (largest + second) / 2},
        )  # fmt: skip
        broken = tmp / "early" / "ledgers" / "hospital-2" / "runs"
        broken.mkdir(parents=True)
        (broken / "secagg-test-early.json").write_text('{"run_id": "secagg-test-ear')  # truncated
        early, early_received = _federate(tmp, "early", mp, **{"secagg.enabled": True})
    finally:
        mp.undo()
    return (
        updates, (secure, received), (dropped, dropped_received, tmp / "dropped", biggest),
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

    updates, _, (dropped, received, run_dir, biggest), _ = runs
    stages = [r for r in received if r.metadata.message_type == "train"]
    # the largest hospital answered setup and share-keys, trained, then refused to mask
    errors = [r for r in stages if r.has_error()]
    max_weight = f"{(updates[biggest][1] + sorted(n for _, n in updates.values())[-2]) / 2:g}"
    assert (
        len(errors) == 1
        and f"hospital {biggest} refused: its update's weight does not fit SecAgg+'s range: more "
        f"training examples than secagg.max-weight = {max_weight}; raise secagg.max-weight"
        in errors[0].error.reason
    )
    assert f"{updates[biggest][1]:g}" not in errors[0].error.reason  # the count stays there
    assert len(stages) == 4 + 4 + 4 + 3
    survivors = [s for s in sorted(updates) if s != biggest]
    expected = _fedavg(updates, survivors)
    for key, value in expected.items():
        np.testing.assert_allclose(dropped[key], value, atol=ATOL, rtol=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [f["hospital"] for f in summary["failures"] if f["kind"] == "train"] == [biggest]
    assert summary["secure_aggregation"]["enabled"] is True


@pytest.mark.slow
def test_hospital_refusing_before_the_key_exchange_is_left_out(runs):
    import json

    updates, _, _, (early, received, run_dir) = runs
    stages = [r for r in received if r.metadata.message_type == "train"]
    errors = [r for r in stages if r.has_error()]
    assert (
        len(errors) == 1
        and "hospital hospital-2 refused: its privacy ledger cannot be used"
        in errors[0].error.reason
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
    for hospital in [f"hospital-{i}" for i in range(1, HOSPITALS + 1)]:
        lines = [json.loads(x) for x in (root / hospital / "audit.jsonl").read_text().splitlines()]
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

    from client.client_app import HOSPITAL_REFUSED
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
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED
    assert "SecAgg+ setup rejected: " + refusal in reply.error.reason


def test_hospital_refuses_to_share_keys_with_fewer_peers_than_the_threshold(default_cfg):
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from client.client_app import HOSPITAL_REFUSED
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
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED
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


# --- the unmask stage: a hostile coordinator's lists of active and dropped hospitals ----------

NODES = (7, 8, 9)
_SETUP = {Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0,
          Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 1000.0}  # fmt: skip


def _to(nid: int, configs: dict, **records) -> Message:  # type: ignore[type-arg]
    """A SecAgg+ protocol message from the coordinator to node ``nid`` (plus ``records``)."""
    from flwr.app import ConfigRecord, RecordDict

    content = RecordDict({**records, RECORD_KEY_CONFIGS: ConfigRecord(configs)})
    return Message(content, dst_node_id=nid, message_type="train")


def _secagg_cfg(**overrides) -> dict:  # type: ignore[type-arg]
    from server.run_config import default_run_config

    cfg = default_run_config()
    cfg.update({"secagg.enabled": True, "dp.enabled": False, "train.rounds": 1, **overrides})
    return cfg


def _hospitals(cfg: dict) -> dict:  # type: ignore[type-arg]
    """Three simulated hospitals (nodes 7, 8, 9), each with its own Context."""
    from flwr.app import Context, RecordDict

    return {
        nid: Context(
            run_id=1,
            node_id=nid,
            state=RecordDict(),
            run_config=cfg,
            node_config={"partition-id": i, "num-partitions": len(NODES)},
        )
        for i, nid in enumerate(NODES)
    }


def _train_request(cfg: dict, weights=None) -> dict:  # type: ignore[type-arg,no-untyped-def]
    """The strategy's train records for round 1's collect stage: ``weights`` (a state dict),
    by default the run's initial model."""
    from flwr.app import ArrayRecord, ConfigRecord

    from shared_models.config import RunConfig
    from shared_models.models import model_for_run

    if weights is None:
        weights = model_for_run(RunConfig.from_run_config(cfg))[0].state_dict()
    return {"arrays": ArrayRecord(weights), "config": ConfigRecord({"server-round": 1})}


def _through_collect(cfg: dict, weights=None, withheld=None) -> tuple[dict, dict]:  # type: ignore[type-arg,no-untyped-def]
    """Drive three hospitals' real ClientApp through setup, share keys and collect (as Flower's
    SecAggPlusWorkflow routes them); ``withheld = (src, dst)``: the coordinator does not forward
    src's key shares to dst. Returns (contexts, collect-stage replies) by node."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    from client.client_app import app as client_app
    from tests.handlers import use_task_identity

    use_task_identity()
    ctx = _hospitals(cfg)
    setup = {**_SETUP, Key.MAX_WEIGHT: float(cfg["secagg.max-weight"])}
    keys = {}
    for nid in NODES:
        reply = client_app(_to(nid, {Key.STAGE: Stage.SETUP, **setup}), ctx[nid])
        assert not reply.has_error(), reply.error
        own = reply.content.config_records[RECORD_KEY_CONFIGS]
        keys[str(nid)] = [own[Key.PUBLIC_KEY_1], own[Key.PUBLIC_KEY_2]]
    forwarded: dict[int, list[tuple[int, bytes]]] = {nid: [] for nid in NODES}
    for nid in NODES:
        reply = client_app(_to(nid, {Key.STAGE: Stage.SHARE_KEYS, **keys}), ctx[nid])
        assert not reply.has_error(), reply.error
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]
        for dst, ciphertext in zip(
            sent[Key.DESTINATION_LIST], sent[Key.CIPHERTEXT_LIST], strict=True
        ):
            if (nid, dst) != withheld:
                forwarded[dst].append((nid, ciphertext))
    masked = {}
    for nid in NODES:
        collect = {
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.SOURCE_LIST: [src for src, _ in forwarded[nid]],
            Key.CIPHERTEXT_LIST: [ciphertext for _, ciphertext in forwarded[nid]],
        }
        masked[nid] = client_app(_to(nid, collect, **_train_request(cfg, weights)), ctx[nid])
    return ctx, masked


def _up_to_unmask(withheld: tuple[int, int] | None = None) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """Three hospitals that sent their masked vectors (ordinary run config)."""
    ctx, masked = _through_collect(_secagg_cfg(), withheld=withheld)
    for reply in masked.values():
        assert not reply.has_error(), reply.error
    return ctx, masked


@pytest.fixture(scope="module")
def after_collect():
    """Contexts of three hospitals that sent their masked vectors (copied per test)."""
    return _up_to_unmask()


def _unmask(nid: int, active: list[int], dropped: list[int]) -> Message:
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    return _to(nid, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active,
                     Key.DEAD_NODE_ID_LIST: dropped})  # fmt: skip


def test_a_legitimate_unmask_reveals_the_shares_the_protocol_needs(after_collect):
    """Every hospital active, or one dropped after the collect stage: each hospital answers
    with its share per listed node, and any two of them rebuild a node's mask seed."""
    import copy

    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from client.client_app import app as client_app

    contexts, _ = after_collect
    ctx = copy.deepcopy(contexts)
    shares = {}
    for nid in NODES:
        reply = client_app(_unmask(nid, list(NODES), []), ctx[nid])
        assert not reply.has_error(), reply.error
        out = reply.content.config_records[RECORD_KEY_CONFIGS]
        assert list(out[Key.NODE_ID_LIST]) == list(NODES) and len(out[Key.SHARE_LIST]) == 3
        shares[nid] = dict(zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST], strict=True))
    seed = contexts[9].state.config_records[RECORD_KEY_STATE]["rd_seed"]
    assert combine_shares([shares[7][9], shares[8][9]]) == seed  # real shares: threshold 2
    # node 9 dropped after the collect stage: the others reveal its secret-key share instead
    ctx = copy.deepcopy(contexts)
    for nid in (7, 8):
        reply = client_app(_unmask(nid, [7, 8], [9]), ctx[nid])
        assert not reply.has_error(), reply.error
        assert list(reply.content.config_records[RECORD_KEY_CONFIGS][Key.NODE_ID_LIST]) == [7, 8, 9]


@pytest.mark.parametrize(
    ("active", "dropped", "rule"),
    [
        ([7, 8, 9], [9], "node(s) [9] listed as both active and dropped"),
        ([7, 8], [8], "node(s) [8] listed as both active and dropped"),
        ([7, 8, 9, 42], [], "node(s) [42] not among the hospitals this one exchanged keys with"),
        ([7, 8], [42], "node(s) [42] not among the hospitals this one exchanged keys with"),
        ([7, 9, 9], [], "node(s) [9] listed more than once as active"),
        ([8, 9], [7], "this hospital is listed as dropped while it answers"),
    ],
)
def test_hospital_refuses_an_unmask_that_would_reveal_too_much(
    after_collect, active, dropped, rule
):
    """Flower's _unmask would answer each of these (or fail without naming the rule); listing
    node 9 as active AND dropped would hand the coordinator both secrets of node 9 from enough
    hospitals, and with them node 9's unmasked update. The hospital refuses, reveals no share,
    and answers nothing more in this round."""
    import copy

    from client.client_app import HOSPITAL_REFUSED
    from client.client_app import app as client_app

    contexts, _ = after_collect
    ctx = copy.deepcopy(contexts)[7]
    reply = client_app(_unmask(7, active, dropped), ctx)
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED
    assert not reply.has_content()  # no share reaches the coordinator
    assert "SecAgg+ unmask rejected: " + rule in reply.error.reason
    # the round is over for this hospital: a second, legitimate-looking request reveals nothing
    # (Flower's check_stage raises "expect setup stage", which the ClientApp answers as an error)
    try:
        again = client_app(_unmask(7, [7, 8, 9], []), ctx)
    except ValueError as exc:
        assert "expect setup stage" in str(exc)
    else:
        assert again.has_error() and not again.has_content()


def test_hospital_refuses_to_reveal_a_node_that_dropped_before_sharing_with_it():
    """Node 9's key shares never reached node 7 (withheld by the coordinator, or 9 dropped):
    node 7 masked its vector without 9 and holds nothing of 9's to reveal."""
    from client.client_app import HOSPITAL_REFUSED
    from client.client_app import app as client_app

    ctx, _ = _up_to_unmask(withheld=(9, 7))
    reply = client_app(_unmask(7, [7, 8], [9]), ctx[7])
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED and not reply.has_content()
    assert "node(s) [9] dropped before sending this hospital their key shares" in reply.error.reason


# --- the range refusal: the coordinator learns the key at fault, not the hospital's values --------


def _n_train(cfg: dict, partition: int) -> int:  # type: ignore[type-arg]
    from client.hospital_data import HospitalSettings, load_hospital_data
    from shared_models.config import RunConfig

    settings = HospitalSettings.from_node_config({"partition-id": partition, "num-partitions": 3})
    return load_hospital_data(settings, RunConfig.from_run_config(cfg)).n_train


def test_a_weight_outside_the_clipping_range_is_refused_without_its_value(caplog):
    """A global weight of 12.345678 (range 8) that a vanishing learning rate leaves in place:
    the refusal names secagg.clipping-range and its bound; the value is in the local log only."""
    import logging

    import torch

    from client.client_app import HOSPITAL_REFUSED
    from shared_models.config import RunConfig
    from shared_models.models import model_for_run

    cfg = _secagg_cfg(**{"train.lr": 1e-9})
    weights = model_for_run(RunConfig.from_run_config(cfg))[0].state_dict()
    first = next(iter(weights))
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] = 12.345678
    observed = float(torch.tensor(12.345678, dtype=torch.float32))  # 12.345678329467773
    with caplog.at_level(logging.WARNING, logger="fedcare.hospital"):
        _, replies = _through_collect(cfg, weights)
    reply = replies[7]
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED and not reply.has_content()
    reason = reply.error.reason
    assert reason == (
        "hospital hospital-1 refused: its update does not fit SecAgg+'s quantisation range: a model "
        "weight lies outside [-8, 8] (secagg.clipping-range = 8); raise secagg.clipping-range "
        "(the hospital's log has the details)"
    )
    for leaked in (repr(observed), "12.345678", "12.35", "12.3", "12", str(_n_train(cfg, 0))):
        assert leaked not in reason
    assert f"largest |weight| {observed!r} > secagg.clipping-range 8.0" in caplog.text


def test_too_many_training_examples_are_refused_without_the_count(caplog):
    import logging

    from client.client_app import HOSPITAL_REFUSED

    cfg = _secagg_cfg(**{"secagg.max-weight": 50.0})
    n_train = _n_train(cfg, 0)
    assert n_train > 50
    with caplog.at_level(logging.WARNING, logger="fedcare.hospital"):
        _, replies = _through_collect(cfg)
    reply = replies[7]
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED and not reply.has_content()
    assert reply.error.reason == (
        "hospital hospital-1 refused: its update's weight does not fit SecAgg+'s range: more "
        "training examples than secagg.max-weight = 50; raise secagg.max-weight (the "
        "hospital's log has the details)"
    )
    assert str(n_train) not in reply.error.reason
    assert f"{n_train} training examples > secagg.max-weight 50.0" in caplog.text
