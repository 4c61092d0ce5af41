"""Strategy construction, metric aggregation, run history and reports."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl

from server.history import HospitalEvent, RunHistory
from server.report import build_summary, write_reports
from server.strategies import STRATEGIES, aggregate_metrics, build_strategy
from shared_models.config import RunConfig

EXPECTED = {
    "fedavg": fl.FedAvg, "fedavgm": fl.FedAvgM, "fedprox": fl.FedProx, "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi, "fedmedian": fl.FedMedian, "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
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
    default_cfg.update({"strategy.name": "fedavgm", "strategy.server-momentum": 0.5})
    fedavgm = build_strategy(RunConfig.from_run_config(default_cfg).strategy)
    assert fedavgm.server_momentum == 0.5 and fedavgm.server_learning_rate == 1.0


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


# per-class score histograms (10 bins over [0, 1]; bins 5-9 predict positive) of two hospitals
_HIST = {
    "a": ([10, 8, 4, 2, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 2, 2, 3, 3, 2]),  # 27 neg, 13 pos
    "b": ([3, 2, 1, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]),  # 7 neg, 3 pos
}


def _history() -> RunHistory:
    h = RunHistory(hospitals={1: "a", 2: "b"})
    for rnd in (1, 2):
        for node, hospital, n_train, n_test, acc in ((1, "a", 100, 40, 0.8), (2, "b", 50, 10, 0.6)):
            h.events.append(
                HospitalEvent(
                    rnd,
                    "train",
                    node,
                    hospital,
                    {
                        "num-examples": n_train,
                        "train-loss": 0.5,
                        "epsilon": 0.4 * rnd,
                        "delta": 1e-5,
                    },
                )
            )
            neg, pos = _HIST[hospital]
            h.events.append(HospitalEvent(rnd, "evaluate", node, hospital, {"num-examples": n_test, "auroc": None,
                                                                    "accuracy": acc, "sensitivity": 1.0,
                                                                    "specificity": None},
                                      undefined={"auroc": "one class"},
                                      histograms={"hist-neg": neg, "hist-pos": pos}))  # fmt: skip
    h.events.append(HospitalEvent(2, "train", 3, "node 3", error="no reply (hospital dropped out)"))
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
        "max_grad_norm": 1.0, "accountant": "rdp", "eval_noise_multiplier": 5.0,
    }  # fmt: skip
    assert summary["secure_aggregation"] == {"enabled": False}
    a = next(h for h in summary["hospitals"] if h["name"] == "a")
    assert a["n_train"] == 100 and a["n_test"] == 40 and a["epsilon"] == pytest.approx(0.8)
    assert a["metrics"]["auroc"] is None and a["undefined"]["auroc"] == "one class"
    overall = summary["overall"]
    assert overall["mean_client_accuracy"] == pytest.approx(0.7)
    # pooled confusion counts at 0.5: TP = 12 + 3, FN = 1 + 0, TN = 25 + 6, FP = 2 + 1
    assert overall["sensitivity"] == pytest.approx(15 / 16)
    assert overall["specificity"] == pytest.approx(31 / 34)
    assert overall["accuracy"] == pytest.approx((15 + 31) / 50)
    neg = [x + y for x, y in zip(*(_HIST[s][0] for s in "ab"), strict=True)]
    pos = [x + y for x, y in zip(*(_HIST[s][1] for s in "ab"), strict=True)]
    scores = [(i + 0.5) / 10 for i, c in enumerate(neg) for _ in range(c)]
    scores += [(i + 0.5) / 10 for i, c in enumerate(pos) for _ in range(c)]
    labels = [0] * sum(neg) + [1] * sum(pos)
    from sklearn.metrics import roc_auc_score

    assert overall["auroc"] == pytest.approx(roc_auc_score(labels, scores))  # binned, pooled
    assert overall["method"].startswith("pooled test counts of 2 hospital(s)")
    assert summary["failures"] == [
        {
            "round": 2,
            "kind": "train",
            "hospital": "node 3",
            "cause": "timed out",  # inferred: a history written before causes were recorded
            "reason": "no reply (hospital dropped out)",
        }
    ]


def test_noisy_histograms_become_metrics_at_the_coordinator():
    """A hospital without exact metrics sends only noisy counts; the coordinator's history computes
    its metrics from them (post-processing)."""
    from shared_models.metrics import metrics_from_histograms

    neg, pos = _HIST["a"]
    m = metrics_from_histograms(neg, pos)
    assert m.sensitivity == pytest.approx(12 / 13) and m.specificity == pytest.approx(25 / 27)
    noisy = metrics_from_histograms([c + 0.3 for c in neg], [c - 0.2 for c in pos])
    assert 0 <= noisy.auroc <= 1 and abs(noisy.auroc - m.auroc) < 0.05
    assert metrics_from_histograms([0.05] * 10, pos).auroc is None  # < 1 noisy negative


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


def test_scheduled_strategy_numbers_rounds_after_the_checkpoint_and_evaluates_on_schedule(
    default_cfg,
):
    from flwr.app import ArrayRecord, ConfigRecord

    from server.strategies import ScheduledStrategy
    from tests.handlers import use_task_identity

    use_task_identity()

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    default_cfg.update({"train.rounds": 6, "eval.every": 2})
    run = RunConfig.from_run_config(default_cfg)
    inner = build_strategy(run.strategy)
    resumed = ScheduledStrategy(inner, offset=3, evaluates=run.evaluates_in_round)
    messages = list(resumed.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert {m.content["config"]["server-round"] for m in messages} == {4}
    evaluated = [
        3 + r
        for r in (1, 2, 3)
        if list(resumed.configure_evaluate(r, ArrayRecord(), ConfigRecord(), Grid()))
    ]
    assert evaluated == [4, 6]  # every 2nd round and the last; round 5 sends nothing
    assert run.evaluation_rounds_count == 3
    default_cfg["eval.every"] = 0
    assert RunConfig.from_run_config(default_cfg).evaluation_rounds_count == 1


def _adam_round(strategy, server_round: int, start: dict, updates: list[dict]):  # type: ignore[no-untyped-def]
    """One real round of a server-optimizer strategy: configure_train on ``start``, aggregate two hospitals' replies."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message

    from tests.handlers import use_task_identity

    use_task_identity()

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in start.items()})
    sent = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid()))
    replies = [
        Message(
            RecordDict({
                "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in update.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }),
            reply_to=msg,
        )
        for msg, update in zip(sent, updates, strict=True)
    ]  # fmt: skip
    new, _ = strategy.aggregate_train(server_round, replies)
    return {k: a.numpy() for k, a in new.items()}


@pytest.mark.parametrize(
    ("name", "keys"), [("fedadam", {"m_t/w", "v_t/w"}), ("fedavgm", {"momentum_vector/0"})]
)
def test_server_optimizer_state_survives_a_checkpoint(default_cfg, name, keys):
    """FedAdam's moments and FedAvgM's momentum come from a real round of Flower's aggregation;
    a strategy restored from the checkpointed state continues exactly like the one that never
    stopped, and differently from one that starts without them."""
    import numpy as np

    from server.strategies import load_strategy_state, strategy_state

    default_cfg["strategy.name"] = name
    cfg = RunConfig.from_run_config(default_cfg).strategy
    rng = np.random.default_rng(0)
    w0 = {"w": rng.normal(size=3).astype(np.float32)}
    updates = [[{"w": rng.normal(size=3).astype(np.float32)} for _ in range(2)] for _ in range(2)]
    a = build_strategy(cfg)
    w1 = _adam_round(a, 1, w0, updates[0])
    assert set(strategy_state(a)) == keys
    resumed, fresh = build_strategy(cfg), build_strategy(cfg)
    load_strategy_state(resumed, strategy_state(a))
    expected = _adam_round(a, 2, w1, updates[1])
    np.testing.assert_array_equal(_adam_round(resumed, 2, w1, updates[1])["w"], expected["w"])
    assert not np.allclose(_adam_round(fresh, 2, w1, updates[1])["w"], expected["w"])


def test_the_latest_checkpoint_is_found_past_round_999(tmp_path):
    import torch

    from server.checkpoint import latest_checkpoint, save_weights

    for rnd in (998, 999, 1000, 1001):
        save_weights(
            tmp_path / "checkpoints" / f"round-{rnd:03d}.safetensors",
            {"w": torch.full((2,), float(rnd))},
            {"round": rnd},
        )
    (tmp_path / "checkpoints" / "round-1001.json").unlink()  # incomplete: no sidecar
    done, weights, sidecar = latest_checkpoint(tmp_path)
    assert done == 1000 and weights.name == "round-1000.safetensors" and sidecar["round"] == 1000


def test_a_resume_reads_the_history_up_to_its_checkpoint(tmp_path):
    """history.json may hold the round after the last complete checkpoint (written just before
    it): the resume takes the rounds up to the checkpoint, and a run folder from before
    history.json was kept every round is read from its sidecar."""
    from server.history import read_history

    history = RunHistory(
        events=[HospitalEvent(round=r, kind="train", node_id=1, hospital="a") for r in (1, 2, 3)],
        centralized={r: {"auroc": 0.5 + r / 10} for r in (1, 2, 3)},
        central_privacy={r: {"epsilon": float(r), "delta": 1e-5, "releases": r} for r in (1, 2, 3)},
        hospitals={1: "a"},
        registered={1: "a"},
    )
    (tmp_path / "history.json").write_text(json.dumps(history.to_dict()))
    resumed = read_history(tmp_path, {"round": 2}).up_to(2)
    assert [e.round for e in resumed.events] == [1, 2]
    assert list(resumed.centralized) == list(resumed.central_privacy) == [1, 2]
    assert resumed.hospitals == resumed.registered == {1: "a"}
    assert len(history.events) == 3  # the history read is not changed
    (tmp_path / "history.json").unlink()
    assert read_history(tmp_path, {"round": 3, "history": history.to_dict()}) == history


def test_histogram_metrics_equal_scikit_learn_on_binned_scores():
    """AUPRC and the operating point from counts are scikit-learn's on bin-rounded scores."""
    import numpy as np

    from shared_models.metrics import histogram_metrics, operating_point_metrics, score_histograms

    rng = np.random.default_rng(0)
    y = (rng.random(500) < 0.2).astype(int)
    s = np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1)
    binned = (np.clip((s * 10).astype(int), 0, 9) + 0.5) / 10
    values, _ = histogram_metrics(*score_histograms(y, s))
    reference, _ = operating_point_metrics(y, binned)
    for name, value in reference.items():
        assert values[name] == pytest.approx(value), name


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
                "info": ConfigRecord({"hospital": self.self_reported[node]}),
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
    assert [(e.kind, e.node_id, e.hospital) for e in history.events] == [
        ("train", 1, "cleveland"), ("train", 2, "va"),
        ("evaluate", 1, "cleveland"), ("evaluate", 2, "va"),
    ]  # fmt: skip
    run = RunConfig.from_run_config(default_cfg)
    summary = build_summary(run, history, wall_seconds=1.0)
    assert [h["name"] for h in summary["hospitals"]] == ["cleveland", "va"]
    assert {h["name"]: h["named_by"] for h in summary["hospitals"]} == {
        "cleveland": "registered key", "va": "registered key",
    }  # fmt: skip
    assert summary["name_mismatches"] == [{"hospital": "va", "self_reported_name": "cleveland"}]
    write_reports(tmp_path, run, history, summary)
    report = (tmp_path / "report.md").read_text()
    assert "named by the key they authenticate with" in report
    assert "the hospital registered as va reports its name as 'cleveland'" in report
    restored = RunHistory.from_dict(json.loads(json.dumps(history.to_dict())))  # history.json
    assert restored.registered == {1: "cleveland", 2: "va"}
    assert restored.name_mismatches() == {"va": "cleveland"}


def test_without_registered_keys_names_are_self_reported(default_cfg):
    """Simulation: the engine's nodes carry no registered name; the hospital names they report are used."""
    summary = build_summary(RunConfig.from_run_config(default_cfg), _history(), wall_seconds=1.0)
    assert {h["named_by"] for h in summary["hospitals"]} == {"self-reported"}
    assert summary["name_mismatches"] == []


def test_each_flower_run_of_a_run_folder_is_recorded_once_in_order(tmp_path):
    """flower-runs.json: the Flower run ids of one fedcare run (a resume adds one, also when the
    resumed run stops before its first checkpoint), each once."""
    from server.checkpoint import FLOWER_RUNS, record_flower_run

    run_dir = tmp_path / "run"
    assert record_flower_run(run_dir, run_id="r", flower_run_id=11, after_round=0) == [11]
    assert record_flower_run(run_dir, run_id="r", flower_run_id=11, after_round=0) == [11]
    assert record_flower_run(run_dir, run_id="r", flower_run_id=7, after_round=1) == [11, 7]
    saved = json.loads((run_dir / FLOWER_RUNS).read_text())
    assert saved["run_id"] == "r"
    assert [(r["flower_run_id"], r["after_round"]) for r in saved["flower_runs"]] == [
        (11, 0),
        (7, 1),
    ]


class _FlakyGrid(_NamedNodesGrid):
    """Nodes that come and go: ``online`` is what the SuperLink lists as connected, and
    ``answers[node]`` what a node does with the next message: "ok", "refuse", "lost" (the
    SuperLink's own error reply for a node whose heartbeat stopped) or "silent" (no reply)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__(names, dict(names))
        self.online = set(names)
        self.answers = dict.fromkeys(names, "ok")

    def get_node_ids(self):  # type: ignore[no-untyped-def]
        return sorted(self.online)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        from shared_models.protocol import HOSPITAL_REFUSED, refusal_reason

        messages = list(messages)
        replies = list(super().send_and_receive(
            [m for m in messages if self.answers[m.metadata.dst_node_id] == "ok"], timeout=timeout
        ))  # fmt: skip
        for msg in messages:
            node = msg.metadata.dst_node_id
            if self.answers[node] == "refuse":
                error = Error(HOSPITAL_REFUSED, refusal_reason(self.names[node], "ε above the cap"))
                replies.append(Message(error, reply_to=msg))
            elif self.answers[node] == "lost":
                error = Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable")
                replies.append(Message(error, reply_to=msg))
        return replies


def test_every_hospital_that_missed_a_round_is_named_with_its_cause(default_cfg, tmp_path):
    """Three hospitals train round 1. Round 2: b refuses, c's connection is lost. Round 3: c is
    no longer connected, so the strategy (which samples connected nodes only) does not ask it,
    and b does not answer in time. The report names b and c for every round they missed, with
    why; c, which trained 1 of 3 rounds, was once left out of the report."""
    from flwr.app import ConfigRecord, Message

    from server.history import RecordingGrid
    from tests.handlers import use_task_identity

    use_task_identity()
    history = RunHistory()
    fleet = _FlakyGrid({1: "a", 2: "b", 3: "c"})
    grid = RecordingGrid(fleet, history)

    def train_round(rnd: int) -> None:
        nodes = grid.get_node_ids()  # what Flower's sample_nodes asks
        sent = [Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}), dst_node_id=n,
                        message_type="train") for n in nodes]  # fmt: skip
        grid.send_and_receive(sent, timeout=40)

    train_round(1)
    fleet.answers.update({2: "refuse", 3: "lost"})
    train_round(2)
    fleet.online.discard(3)
    fleet.answers[2] = "silent"
    train_round(3)
    run = RunConfig.from_run_config(default_cfg)
    summary = build_summary(run, history, wall_seconds=1.0)
    missed = [(f["round"], f["hospital"], f["cause"]) for f in summary["failures"]]
    assert missed == [
        (2, "b", "refused"), (2, "c", "dropped"), (3, "b", "timed out"), (3, "c", "offline"),
    ]  # fmt: skip
    by_name = {h["name"]: h["rounds_trained"] for h in summary["hospitals"]}
    assert by_name == {"a": 3, "b": 1, "c": 1}
    assert summary["failures"][3]["reason"].startswith("offline: not connected when round 3's")
    write_reports(tmp_path, run, history, summary)
    report = (tmp_path / "report.md").read_text()
    assert "- round 3 train: c (offline): offline: not connected" in report
    assert "- round 3 train: b (timed out): no reply within 40 s" in report
    restored = RunHistory.from_dict(json.loads(json.dumps(history.to_dict())))  # a resumed run
    assert restored.missed() == history.missed() and restored.node_ids() == {1, 2, 3}


def test_progress_shows_the_evaluation_release_and_who_missed_the_round(capsys):
    """The last round's ε in the progress line is the ε of the end-of-run table: after training,
    then after the evaluation release; a round without evaluation shows no AUROC."""
    from server.cli import print_progress

    common = {"rounds": 2, "seconds": 5.0, "pooled_auroc": None}
    print_progress({**common, "round": 1, "evaluated": False, "mean_auroc": None,
                    "max_epsilon": 1.393, "max_epsilon_evaluation": None, "failures": []})  # fmt: skip
    missed = {"round": 2, "kind": "train", "hospital": "c", "cause": "offline",
              "reason": "offline: not connected [code: 5]"}  # fmt: skip
    print_progress({**common, "round": 2, "evaluated": True, "mean_auroc": 0.705,
                    "max_epsilon": 1.8257, "max_epsilon_evaluation": 1.9996, "failures": [missed]})  # fmt: skip
    first, second, third = capsys.readouterr().out.splitlines()
    assert first.split() == ["round", "1/2", "max", "ε", "1.393", "5.0", "s"]
    assert (
        "mean hospital AUROC 0.705  max ε 1.826 (training) → 2.000 with the evaluation release"
        in second
    )
    assert third.strip() == "c (train, offline): offline: not connected [code: 5]"


def test_the_round_line_leaves_out_an_auroc_the_report_calls_too_noisy(default_cfg, caplog, capsys):
    """The round's mean hospital AUROC counts an AUROC from noisy counts only where the report
    and the console's table show it: 40 patients with σ = 5 of noise on each count is too noisy
    to read (a newcomer saw "mean hospital AUROC 1.000" above a table of "too noisy"); an exact
    release always counts."""
    import logging

    from server.cli import print_progress
    from server.server_app import _report_progress

    run = RunConfig.from_run_config(default_cfg)
    neg, pos = _HIST["a"]

    def history(noisy_a: bool, scale: int = 1) -> RunHistory:
        h = RunHistory(hospitals={1: "a", 2: "b"})
        noise = {"eval-noise-multiplier": 5.0} if noisy_a else {}
        hists = {"hist-neg": [c * scale for c in neg], "hist-pos": [c * scale for c in pos]}
        h.events.append(HospitalEvent(1, "evaluate", 1, "a", {"num-examples": 40 * scale, "auroc": 0.97, **noise},
                                      histograms=hists))  # fmt: skip
        h.events.append(HospitalEvent(1, "evaluate", 2, "b", {"num-examples": 40, "auroc": 0.81}))
        return h

    def record(h: RunHistory) -> dict:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _report_progress(run, h, 1, 2.0)
        (rec,) = [r for r in caplog.records if hasattr(r, "fedcare_progress")]
        return rec.fedcare_progress

    exact, noisy = record(history(False)), record(history(True))
    assert exact["mean_auroc"] == pytest.approx((0.97 + 0.81) / 2) and exact["auroc_too_noisy"] == 0
    assert noisy["mean_auroc"] == pytest.approx(0.81) and noisy["auroc_too_noisy"] == 1
    large = record(history(True, scale=20))  # 800 patients: the same noise is readable
    assert large["mean_auroc"] == pytest.approx((0.97 + 0.81) / 2) and large["auroc_too_noisy"] == 0
    print_progress({**noisy, "failures": []})
    print_progress({**noisy, "mean_auroc": None, "failures": []})
    with_b, alone = capsys.readouterr().out.splitlines()
    assert "mean hospital AUROC 0.810 (1 too noisy to read, left out)" in with_b
    assert "mean hospital AUROC too noisy  " in alone


def test_a_resumed_run_after_a_coordinator_restart_does_not_call_its_hospitals_offline():
    """Flower's in-memory SuperLink state gives each hospital a new node id when the restarted
    coordinator registers its key again: the resumed history's old ids are the same hospitals,
    online under new ids, not hospitals missing the round; one really gone still is."""
    from flwr.app import ConfigRecord, Message

    from server.history import RecordingGrid
    from tests.handlers import use_task_identity

    use_task_identity()
    before = RunHistory()
    first = _NamedNodesGrid({1: "a", 2: "b", 3: "c"}, {1: "a", 2: "b", 3: "c"})
    RecordingGrid(first, before).send_and_receive(
        [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                 message_type="train") for n in (1, 2, 3)], timeout=10)  # fmt: skip
    resumed = RunHistory.from_dict(json.loads(json.dumps(before.to_dict())))
    restarted = _NamedNodesGrid({11: "a", 12: "b"}, {11: "a", 12: "b"})  # c is down
    RecordingGrid(restarted, resumed).send_and_receive(
        [Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=n,
                 message_type="train") for n in (11, 12)], timeout=10)  # fmt: skip
    assert [(m["hospital"], m["cause"]) for m in resumed.missed(2)] == [("c", "offline")]
    assert sorted(e.hospital for e in resumed.events if e.round == 2 and not e.error) == ["a", "b"]


def test_a_history_written_before_the_hospital_wording_reads():
    """Run folders of an older fedcare (events' ``site``, the ``sites`` map) still load: a
    resume, the dashboards and MLflow read them."""
    old = {"events": [{"round": 1, "kind": "train", "node_id": 1, "site": "a", "metrics": {}}],
           "sites": {"1": "a"}}  # fmt: skip
    history = RunHistory.from_dict(old)
    assert history.events[0].hospital == "a" and history.hospitals == {1: "a"}
