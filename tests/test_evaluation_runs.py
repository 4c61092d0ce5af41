"""Evaluation-only runs (`fedcare server evaluate`, run config ``eval.model``) at a deployed
hospital, against a hostile coordinator: the real ClientApp called as Flower calls it. Each
attack test fails if the attack works: a release without a ledger charge, a second release in
the same run, a training step or model update, or a policy bypassed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.client_app import HOSPITAL_REFUSED
from client.client_app import app as client_app
from client.ledger import Ledger, lifetime_epsilon
from client.policy import DEFAULT_POLICY, HospitalPolicy, PolicyError
from client.training import epsilon_spent
from server.federated_evaluation import (
    FIGURE,
    build_evaluation,
    render_markdown,
    write_evaluation,
)
from server.history import HospitalEvent, RunHistory
from shared_models.config import RunConfig
from shared_models.hospitals import simulated_hospital_frames
from shared_models.models import build_model
from shared_models.tasks import get_task
from tests.handlers import make_context, make_request, use_task_identity

SIGMA = 5.0
# epsilon of one Gaussian release of sensitivity 1 at sigma 5, delta 1e-5 (Opacus RDP accountant)
EPSILON_ONE_RELEASE = epsilon_spent({"mechanism": "rdp", "history": [[SIGMA, 1.0, 1]]}, delta=1e-5)


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


@pytest.fixture
def hospital(tmp_path, default_cfg):
    """A deployed breast-cancer hospital (its own CSV, a ledger, optional policy file):
    ``hospital(policy=TEXT, **run_config_overrides)`` -> a fresh Context per message."""
    task = get_task("breast-cancer")
    frame = simulated_hospital_frames(
        task, data_dir="", num_hospitals=3, scheme="iid", alpha=0.5, seed=0
    )
    path = tmp_path / "hospital.csv"
    task.write_file(frame[0][1], path)

    def make(policy: str | None = None, **overrides):  # type: ignore[no-untyped-def]
        node = {"data-path": str(path), "hospital": "a", "ledger-dir": str(tmp_path / "ledger")}
        if policy is not None:
            (tmp_path / "policy.toml").write_text(policy)
            node["policy-path"] = str(tmp_path / "policy.toml")
        cfg = {**default_cfg, "run.id": "ev1", "model.name": "logreg", "train.rounds": 1,
               "eval.model": "/coordinator/model.safetensors", **overrides}  # fmt: skip
        return make_context(cfg, node)

    make.ledger = Ledger(tmp_path / "ledger")  # type: ignore[attr-defined]
    return make


def _model(seed: int = 0):  # type: ignore[no-untyped-def]
    return build_model("logreg", n_features=30, seed=seed)


def test_the_release_is_noisy_and_charged_to_the_ledger_before_it_leaves(hospital):
    reply = client_app(make_request("evaluate", _model(), 1), hospital())
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert not {"auroc", "accuracy", "sensitivity", "specificity", "auprc"} & set(metrics)
    assert metrics["eval-noise-multiplier"] == SIGMA
    assert metrics["epsilon"] == pytest.approx(EPSILON_ONE_RELEASE) and metrics["delta"] == 1e-5
    assert 0.79 < EPSILON_ONE_RELEASE < 0.80  # pinned: silently dropped noise fails
    record = hospital.ledger.load("ev1")
    assert record.eval_releases == 1 and record.updates == 0 and record.train_steps == 0
    assert record.accountant["history"] == [[SIGMA, 1.0, 1]]
    assert record.plan["evaluation-only"] is True and record.sample_level_dp


def test_a_hospital_that_allows_exact_metrics_still_releases_only_noisy_counts(hospital):
    policy = "exact-metrics = true\n"
    reply = client_app(make_request("evaluate", _model(), 1), hospital(policy=policy))
    metrics = dict(reply.content["metrics"])
    assert "auroc" not in metrics and metrics["eval-noise-multiplier"] == SIGMA
    assert hospital.ledger.load("ev1").eval_releases == 1


def test_re_asking_with_other_weights_or_another_round_is_refused(hospital):
    """A second release in the same run would be a fresh noisy look at the same patients:
    refused, whatever train.rounds and eval.every claim; the ledger holds one release."""
    cfg = {"train.rounds": 50, "eval.every": 1}  # a training run's plan would allow 50
    first = client_app(make_request("evaluate", _model(0), 1), hospital(**cfg))
    assert not first.has_error()
    for msg in (make_request("evaluate", _model(1), 1), make_request("evaluate", _model(0), 2)):
        reply = client_app(msg, hospital(**cfg))
        assert (
            reply.error.code == HOSPITAL_REFUSED
            and "an evaluation-only run has one" in reply.error.reason
        )
    record = hospital.ledger.load("ev1")
    assert record.eval_releases == 1 and record.accountant["history"] == [[SIGMA, 1.0, 1]]


def test_a_replayed_request_gets_the_same_counts_at_no_cost(hospital):
    """The identical request again: the recorded release is sent again (no fresh noise to
    average away), and nothing more is charged."""
    first = client_app(make_request("evaluate", _model(), 1), hospital())
    again = client_app(make_request("evaluate", _model(), 1), hospital())
    for key in ("hist-neg", "hist-pos"):
        assert list(again.content["metrics"][key]) == list(first.content["metrics"][key])
    assert hospital.ledger.load("ev1").eval_releases == 1


def test_nothing_is_trained_and_no_update_leaves_in_an_evaluation_run(hospital):
    reply = client_app(make_request("train", _model(), 1), hospital())
    assert reply.error.code == HOSPITAL_REFUSED and "evaluation-only run" in reply.error.reason
    assert hospital.ledger.records() == []


def test_a_training_run_id_cannot_be_reused_for_an_evaluation_release(hospital):
    """The coordinator trains under run id r, then asks an evaluation-only release under r to
    dodge the plan's evaluation count: the recorded plan differs, so it is refused."""
    cfg = {"eval.model": "", "train.rounds": 1}
    trained = client_app(make_request("train", _model(), 1), hospital(**cfg))
    assert not trained.has_error(), trained.error
    before = hospital.ledger.load("ev1")
    reply = client_app(make_request("evaluate", _model(), 1), hospital())
    assert reply.error.code == HOSPITAL_REFUSED and "other settings" in reply.error.reason
    assert hospital.ledger.load("ev1").accountant == before.accountant


def test_evaluation_runs_without_dp_settings_still_count_against_the_lifetime_cap(hospital):
    """dp.enabled = false on every evaluation run, hoping the ledger leaves them out of the
    lifetime composition (which counts sample-level DP runs): each release is a DP release
    whatever dp.* says, so the series stops at the lifetime cap."""
    refused = None
    for i in range(200):
        reply = client_app(
            make_request("evaluate", _model(), 1),
            hospital(**{"run.id": f"ev-{i}", "dp.enabled": False}),
        )
        if reply.has_error():
            refused = reply.error.reason
            break
    assert refused is not None and "lifetime ε" in refused
    records = hospital.ledger.records()
    assert all(r.sample_level_dp for r in records)
    total = lifetime_epsilon(
        [r.accountant for r in records], delta=DEFAULT_POLICY.hospital_delta(133)
    )
    assert DEFAULT_POLICY.lifetime_epsilon - 1.0 < total <= DEFAULT_POLICY.lifetime_epsilon


def test_a_policy_that_forbids_evaluation_runs_refuses_before_any_release(hospital):
    reply = client_app(
        make_request("evaluate", _model(), 1), hospital(policy="allow-evaluation-runs = false\n")
    )
    assert reply.error.code == HOSPITAL_REFUSED
    assert "allow-evaluation-runs = false" in reply.error.reason
    assert hospital.ledger.records() == []


def test_less_noise_than_the_policy_allows_and_a_larger_delta_are_refused(hospital):
    low = client_app(
        make_request("evaluate", _model(), 1), hospital(**{"dp.eval-noise-multiplier": 0.5})
    )
    assert "below the policy's minimum 2" in low.error.reason
    wide = client_app(make_request("evaluate", _model(), 1), hospital(**{"dp.target-delta": 1e-3}))
    assert "dp.target-delta = 0.001 is above this hospital's δ" in wide.error.reason
    assert hospital.ledger.records() == []


def test_the_policy_key_is_strictly_typed(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('allow-evaluation-runs = "no"\n')
    with pytest.raises(PolicyError, match="allow-evaluation-runs must be true or false"):
        HospitalPolicy.load(path)
    assert DEFAULT_POLICY.allow_evaluation_runs


def _event(
    hospital: str, neg: list[float], pos: list[float], *, epsilon: float = 1.1
) -> HospitalEvent:
    return HospitalEvent(
        round=1, kind="evaluate", node_id=hash(hospital) % 1000, hospital=hospital,
        metrics={"eval-noise-multiplier": SIGMA, "epsilon": epsilon, "delta": 1e-5},
        histograms={"hist-neg": neg, "hist-pos": pos},
    )  # fmt: skip


def test_the_report_has_the_table_the_pooled_figures_and_heterogeneity(default_cfg, tmp_path):
    run = RunConfig.from_run_config({**default_cfg, "eval.model": "/m/model.safetensors"})
    rng = np.random.default_rng(0)
    history = RunHistory()
    for hospital, n in (("north", 400), ("south", 600), ("west", 500)):
        neg = np.rint(np.array([40, 30, 20, 10, 5, 3, 2, 1, 0, 0]) * n / 111 + rng.normal(0, 5, 10))
        pos = np.rint(np.array([0, 1, 1, 2, 3, 5, 8, 10, 15, 20]) * n / 300 + rng.normal(0, 5, 10))
        history.events.append(_event(hospital, neg.tolist(), pos.tolist()))
    history.events.append(
        HospitalEvent(round=1, kind="evaluate", node_id=9, hospital="east", cause="refused",
                  error="hospital east refused: evaluation-only runs ... (allow-evaluation-runs = false)")
    )  # fmt: skip
    evaluation = build_evaluation(run, history, run_id="r", flower_run_id=3)
    assert [h["hospital"] for h in evaluation["hospitals"]] == ["north", "south", "west"]
    assert evaluation["not_evaluated"][0]["hospital"] == "east"
    het = evaluation["heterogeneity"]
    assert het["k"] == 3 and het["ci"][0] < het["auroc"] < het["ci"][1]
    assert het["prediction"][0] <= het["ci"][0] and 0 <= het["i2"] <= 1
    written = write_evaluation(tmp_path, run, history, run_id="r", flower_run_id=3)
    assert written["heterogeneity"]["auroc"] == pytest.approx(het["auroc"])
    assert {p.name for p in tmp_path.iterdir()} == {
        "evaluation.json", "report.md", "history.json", FIGURE,
    }  # fmt: skip
    report = (tmp_path / "report.md").read_text()
    assert report == render_markdown(written) and f"]({FIGURE})" in report
    for text in ("## Per hospital", "| north |", "random-effects pooled AUROC", "I²",
                 "prediction interval", "### Calibration", "east", "allow-evaluation-runs"):  # fmt: skip
        assert text in report, text


def test_the_training_report_shows_noisy_figures_with_intervals_or_says_too_noisy(default_cfg):
    """The issue's case: a deployed run whose hospitals released noisy counts (σ = 5). A small
    hospital's AUROC is not printed as a number (too noisy to read), a large one's carries its
    interval; the pooled figures too."""
    from server.report import build_summary, metrics_frame
    from server.report import render_markdown as render_run
    from shared_models.metrics import score_histograms

    run = RunConfig.from_run_config(default_cfg)
    rng = np.random.default_rng(1)
    history = RunHistory()
    for hospital, n in (("small", 57), ("large", 4000)):
        y = (rng.random(n) < 0.35).astype(int)
        p = 1 / (1 + np.exp(-(3.0 * (2 * y - 1) + rng.normal(0, 1.5, n))))
        neg, pos = (np.rint(h + rng.normal(0, SIGMA, len(h))) for h in score_histograms(y, p))
        history.events.append(_event(hospital, neg.tolist(), pos.tolist()))
    summary = build_summary(run, history, wall_seconds=1.0)
    by_name = {h["name"]: h for h in summary["hospitals"]}
    assert not by_name["small"]["intervals"]["auroc"]["readable"]
    large = by_name["large"]["intervals"]["auroc"]
    assert large["readable"] and large["ci"][0] <= large["value"] <= large["ci"][1]
    report = render_run(run, summary, metrics_frame(history))
    small_row = next(line for line in report.splitlines() if line.startswith("| small |"))
    assert small_row.split(" | ")[5].startswith("too noisy to read")  # the AUROC cell
    large_row = next(line for line in report.splitlines() if line.startswith("| large |"))
    lo, hi = large["ci"]
    assert f"{large['value']:.3f} ({lo:.3f}-{hi:.3f})" in large_row
    assert "parametric bootstrap" in report and summary["overall"]["intervals"]["auroc"]["ci"]
    # the console's end-of-run table withholds the same point estimate as the report
    import io

    from rich.console import Console

    from server.report import print_summary

    buffer = io.StringIO()
    print_summary(Console(file=buffer, width=200), summary, Path("run"), 1.0)
    printed = buffer.getvalue()
    small_line = next(line for line in printed.splitlines() if "small" in line)
    assert (
        "too noisy" in small_line
        and f"{by_name['small']['intervals']['auroc']['value']:.3f}" not in small_line
    )
    assert f"{large['value']:.3f} ({lo:.3f}-{hi:.3f})" in printed
    assert "mean client accuracy n/a (noisy releases)" in printed


def test_curves_show_chance_level_distinct_hospitals_baselines_and_whole_rounds():
    """curves.png of a run whose AUROCs are all near 0.99 and whose hospitals share one ε
    curve: the AUROC axis still reaches down to 0.5, each hospital has its own marker and line
    style (the largest marker drawn first, so identical ε curves stay visible), the baseline is
    a line, and the round ticks are whole numbers."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from server.report import curves_figure

    rows = [{"round": r, "hospital": h, "auroc": 0.985 + 0.002 * r, "epsilon": 0.4 * r}
            for r in (1, 2, 3) for h in ("a", "b", "c")]  # fmt: skip
    fig = curves_figure(
        pd.DataFrame(rows), RunHistory(), dp=True, dp_target=2.0,
        baselines={"centralized": {"auroc": 0.97}},
    )  # fmt: skip
    try:
        auroc_ax, eps_ax = fig.axes
        assert auroc_ax.get_ylim()[0] <= 0.5 and auroc_ax.get_ylim()[1] >= 1.0
        styles = {(ln.get_marker(), ln.get_linestyle()) for ln in eps_ax.lines[:3]}
        assert len(styles) == 3
        sizes = [ln.get_markersize() for ln in eps_ax.lines[:3]]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
        assert any(ln.get_label() == "baseline: centralized" for ln in auroc_ax.lines)
        fig.canvas.draw()
        ticks = [t for t in auroc_ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
    finally:
        plt.close(fig)


def test_server_evaluate_explains_a_missing_model_card_or_an_unknown_hospital(
    monkeypatch, capsys, tmp_path
):
    """Bad input: one message naming the file or the option, no traceback, nothing submitted."""
    from safetensors.torch import save_file

    from tests.handlers import run_fedcare_main

    code, out = run_fedcare_main(
        monkeypatch, capsys, "server", "evaluate", "--model", str(tmp_path / "nowhere"),
        "--pki", str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "no model file there" in out and "Traceback" not in out
    model = tmp_path / "run" / "model.safetensors"
    model.parent.mkdir()
    save_file(_model().state_dict(), str(model))
    code, out = run_fedcare_main(
        monkeypatch, capsys, "server", "evaluate", "--model", str(model.parent), "--pki",
        str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "model.json" in out and "missing or unreadable" in out
    model.with_suffix(".json").write_text(
        '{"task": "breast-cancer", "preprocessing": "default", "model": {"name": "logreg"}}'
    )
    code, out = run_fedcare_main(
        monkeypatch, capsys, "server", "evaluate", "--model", str(model.parent), "--pki",
        str(tmp_path), "--hospitals", "nobody",
    )  # fmt: skip
    assert code != 0 and "--hospitals: nobody not registered" in " ".join(out.split())
    model.with_suffix(".json").write_text(
        '{"task": "breast-cancer", "preprocessing": "default", "model": {"name": "mlp"}}'
    )
    code, out = run_fedcare_main(
        monkeypatch, capsys, "server", "evaluate", "--model", str(model.parent), "--pki",
        str(tmp_path),
    )  # fmt: skip
    assert code != 0 and "the weights do not load into model 'mlp'" in " ".join(out.split())
    assert not (model.parent / "federated-evaluation").exists()


def test_every_release_of_a_run_has_the_run_s_bins_and_other_replies_are_left_out(
    hospital, default_cfg
):
    """eval.histogram-bins = 4: a hospital with exact metrics and a noisy hospital both send 4 bins (so
    the coordinator can sum them); a reply with other bins is named, not summed."""
    exact = client_app(
        make_request("evaluate", _model(), 1),
        hospital(policy="exact-metrics = true\n", **{"eval.model": "", "run.id": "t1",
                                                      "eval.histogram-bins": 4}),
    )  # fmt: skip
    assert not exact.has_error(), exact.error
    assert len(exact.content["metrics"]["hist-neg"]) == 4 and "auroc" in exact.content["metrics"]
    noisy = client_app(
        make_request("evaluate", _model(), 1), hospital(**{"eval.histogram-bins": 4})
    )
    assert len(noisy.content["metrics"]["hist-pos"]) == 4
    run = RunConfig.from_run_config({**default_cfg, "eval.model": "m", "eval.histogram-bins": 4})
    history = RunHistory()
    history.events += [_event("x", [5, 5, 5, 5], [1, 2, 3, 4]), _event("y", [1] * 10, [1] * 10)]
    evaluation = build_evaluation(run, history, run_id="r", flower_run_id=1)
    assert [h["hospital"] for h in evaluation["hospitals"]] == ["x"]
    assert evaluation["not_evaluated"][0]["hospital"] == "y"
    with pytest.raises(Exception, match="even number"):
        RunConfig.from_run_config({**default_cfg, "eval.histogram-bins": 5})
