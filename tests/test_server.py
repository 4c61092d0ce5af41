"""Strategy construction, metric aggregation, run history and reports."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl

from server.history import RunHistory, SiteEvent
from server.report import build_summary, write_reports
from server.strategies import STRATEGIES, aggregate_metrics, build_strategy
from shared_models.config import RunConfig

EXPECTED = {
    "fedavg": fl.FedAvg, "fedprox": fl.FedProx, "fedadam": fl.FedAdam, "fedyogi": fl.FedYogi,
    "fedmedian": fl.FedMedian, "fedtrimmedavg": fl.FedTrimmedAvg, "krum": fl.Krum,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_strategies_are_flowers_own(default_cfg, name):
    default_cfg.update(
        {"strategy.name": name, "strategy.fraction-train": 0.5, "strategy.min-train-nodes": 3}
    )
    strategy = build_strategy(RunConfig.from_run_config(default_cfg).strategy)
    assert type(strategy) is EXPECTED[name]
    assert strategy.fraction_train == 0.5 and strategy.min_train_nodes == 3


def test_strategy_parameters_are_passed(default_cfg):
    default_cfg.update({"strategy.name": "fedprox", "strategy.proximal-mu": 0.3})
    assert build_strategy(RunConfig.from_run_config(default_cfg).strategy).proximal_mu == 0.3
    default_cfg.update({"strategy.name": "fedtrimmedavg", "strategy.trim-beta": 0.1})
    assert build_strategy(RunConfig.from_run_config(default_cfg).strategy).beta == 0.1
    default_cfg.update({"strategy.name": "fedadam", "strategy.server-lr": 0.2})
    assert build_strategy(RunConfig.from_run_config(default_cfg).strategy).eta == 0.2


def test_unknown_strategy(default_cfg):
    default_cfg["strategy.name"] = "fedsgd"
    with pytest.raises(ValueError, match="known strategies: " + ", ".join(sorted(STRATEGIES))):
        build_strategy(RunConfig.from_run_config(default_cfg).strategy)


def test_aggregate_metrics_skips_undefined_and_takes_worst_epsilon():
    records = [
        RecordDict({"m": MetricRecord({"num-examples": 10, "auroc": 0.8, "epsilon": 1.0})}),
        RecordDict({"m": MetricRecord({"num-examples": 30, "auroc": math.nan, "epsilon": 1.5})}),
        RecordDict({"m": MetricRecord({"num-examples": 30, "auroc": 0.6, "epsilon": 0.5})}),
    ]
    out = aggregate_metrics(records, "num-examples")
    assert out["auroc"] == pytest.approx((10 * 0.8 + 30 * 0.6) / 40)
    assert out["epsilon"] == 1.5


def _history() -> RunHistory:
    h = RunHistory(sites={1: "a", 2: "b"})
    for rnd in (1, 2):
        for node, site, n_train, n_test, acc in ((1, "a", 100, 40, 0.8), (2, "b", 50, 10, 0.6)):
            h.events.append(
                SiteEvent(
                    rnd,
                    "train",
                    node,
                    site,
                    {
                        "num-examples": n_train,
                        "train-loss": 0.5,
                        "epsilon": 0.4 * rnd,
                        "delta": 1e-5,
                    },
                )
            )
            h.events.append(SiteEvent(rnd, "evaluate", node, site, {"num-examples": n_test, "auroc": None,
                                                                    "accuracy": acc, "sensitivity": 1.0,
                                                                    "specificity": None},
                                      undefined={"auroc": "one class"}))  # fmt: skip
    h.events.append(SiteEvent(2, "train", 3, "node 3", error="no reply (hospital dropped out)"))
    return h


def test_summary_schema_and_overall(default_cfg):
    run = RunConfig.from_run_config(default_cfg)
    summary = build_summary(run, _history(), wall_seconds=12.345)
    assert set(summary) >= {
        "task",
        "strategy",
        "rounds",
        "dp",
        "wall_seconds",
        "hospitals",
        "overall",
    }
    guarantee = summary["dp"].pop("guarantee")
    assert guarantee.startswith("sample-level (ε, δ)-DP per hospital")
    assert summary["dp"] == {
        "enabled": True, "level": "sample", "target_epsilon": 2.0, "delta": 1e-5,
        "max_grad_norm": 1.0, "accountant": "rdp",
    }  # fmt: skip
    assert summary["secure_aggregation"] == {"enabled": False}
    a = next(h for h in summary["hospitals"] if h["name"] == "a")
    assert a["n_train"] == 100 and a["n_test"] == 40 and a["epsilon"] == pytest.approx(0.8)
    assert a["metrics"]["auroc"] is None and a["undefined"]["auroc"] == "one class"
    assert summary["overall"]["mean_client_accuracy"] == pytest.approx(0.7)
    assert summary["overall"]["accuracy"] == pytest.approx((0.8 * 40 + 0.6 * 10) / 50)  # pooled
    assert summary["failures"] == [
        {
            "round": 2,
            "kind": "train",
            "hospital": "node 3",
            "reason": "no reply (hospital dropped out)",
        }
    ]


def test_reports_are_written(default_cfg, tmp_path):
    run = RunConfig.from_run_config(default_cfg)
    history = _history()
    write_reports(tmp_path, run, history, build_summary(run, history, wall_seconds=1.0))
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "breast-cancer"
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv[0].startswith("round,hospital,n_train,train_loss,epsilon,delta")
    assert len(csv) == 1 + 5  # 2 rounds x 2 hospitals + the dropped node
    report = (tmp_path / "report.md").read_text()
    assert "ε = 2 at δ = 1e-05" in report and "one class" in report and "dropped out" in report
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_resumed_strategy_numbers_rounds_after_the_checkpoint(default_cfg):
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies import ResumedStrategy

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    inner = build_strategy(RunConfig.from_run_config(default_cfg).strategy)
    resumed = ResumedStrategy(inner, offset=3)
    messages = list(resumed.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert {m.content["config"]["server-round"] for m in messages} == {4}


def test_fedadam_moments_survive_a_checkpoint(default_cfg):
    import numpy as np

    from server.strategies import load_strategy_state, strategy_state

    default_cfg["strategy.name"] = "fedadam"
    a = build_strategy(RunConfig.from_run_config(default_cfg).strategy)
    a.m_t = {"w": np.ones(3)}
    a.v_t = {"w": np.full(3, 2.0)}
    b = build_strategy(RunConfig.from_run_config(default_cfg).strategy)
    load_strategy_state(b, strategy_state(a))
    np.testing.assert_array_equal(b.m_t["w"], a.m_t["w"])
    np.testing.assert_array_equal(b.v_t["w"], a.v_t["w"])


class _NamedNodesGrid(Grid):
    """The ServerApp's view of a deployment: nodes whose keys the coordinator registered under
    names (Flower's ``NodeInfo.name``), each answering the strategy's messages."""

    def __init__(self, names: dict[int, str], self_reported: dict[int, str]) -> None:
        self.names, self.self_reported = names, self_reported

    def get_nodes(self):  # type: ignore[no-untyped-def]
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, name=name) for n, name in self.names.items()]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import ConfigRecord, Message

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            content = RecordDict({
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.3}),
                "info": ConfigRecord({"site": self.self_reported[node]}),
            })  # fmt: skip
            replies.append(Message(content, reply_to=msg))
        return replies

    def set_run(self, run): ...  # type: ignore[no-untyped-def]
    def run(self): ...  # type: ignore[no-untyped-def]
    def create_message(self, *a, **k): ...  # type: ignore[no-untyped-def]
    def get_node_ids(self):
        return list(self.names)  # type: ignore[no-untyped-def]

    def push_messages(self, messages): ...  # type: ignore[no-untyped-def]
    def pull_messages(self, message_ids): ...  # type: ignore[no-untyped-def]


def test_report_names_hospitals_by_registered_key_and_flags_a_self_report(default_cfg, tmp_path):
    """Node 2's key is registered as "va" but its train reply calls it "cleveland" (its evaluate
    reply says "va" again): the report says "va" (two hospitals, not one) and flags the
    mismatch; node 1 agrees with its registration throughout."""
    from flwr.app import ConfigRecord, Message

    from server.history import RecordingGrid
    from tests.handlers import use_task_identity

    use_task_identity()
    history = RunHistory()
    fleet = _NamedNodesGrid({1: "cleveland", 2: "va"}, {1: "cleveland", 2: "cleveland"})
    grid = RecordingGrid(fleet, history)
    for kind in ("train", "evaluate"):
        sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                        message_type=kind) for n in (1, 2)]  # fmt: skip
        grid.send_and_receive(sent, timeout=10)
        fleet.self_reported[2] = "va"
    assert [(e.kind, e.node_id, e.site) for e in history.events] == [
        ("train", 1, "cleveland"), ("train", 2, "va"),
        ("evaluate", 1, "cleveland"), ("evaluate", 2, "va"),
    ]  # fmt: skip
    run = RunConfig.from_run_config(default_cfg)
    summary = build_summary(run, history, wall_seconds=1.0)
    assert [h["name"] for h in summary["hospitals"]] == ["cleveland", "va"]
    assert {h["name"]: h["named_by"] for h in summary["hospitals"]} == {
        "cleveland": "registered key", "va": "registered key",
    }  # fmt: skip
    assert summary["name_mismatches"] == [{"hospital": "va", "self_reported_site": "cleveland"}]
    write_reports(tmp_path, run, history, summary)
    report = (tmp_path / "report.md").read_text()
    assert "named by the key they authenticate with" in report
    assert "the hospital registered as va reports its site as 'cleveland'" in report
    restored = RunHistory.from_dict(json.loads(json.dumps(history.to_dict())))  # checkpoint sidecar
    assert restored.registered == {1: "cleveland", 2: "va"}
    assert restored.name_mismatches() == {"va": "cleveland"}


def test_without_registered_keys_names_are_self_reported(default_cfg):
    """Simulation: the engine's nodes carry no registered name; the site names they report are used."""
    summary = build_summary(RunConfig.from_run_config(default_cfg), _history(), wall_seconds=1.0)
    assert {h["named_by"] for h in summary["hospitals"]} == {"self-reported"}
    assert summary["name_mismatches"] == []
