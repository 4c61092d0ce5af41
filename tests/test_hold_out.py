"""``fedcare simulate --hold-out HOSPITAL``: leave-one-hospital-out external validation. A real
in-process federation on heart-disease without Switzerland, its final model validated on all of
Switzerland's records; and the mistakes refused before any federation starts."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from shared_models.config import RunConfig
from shared_models.hospitals import held_out_hospital, simulated_hospitals_for
from simulations import cli
from tests.conftest import HEART_DIR

SECTION = "## External validation on the held-out hospital"


@pytest.fixture(scope="module")
def held_out_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """(run folder, summary.json, held-out hospital, the scores the harness validated, console
    output): 3 non-private rounds on cleveland, hungarian and va through the real ``fedcare
    simulate`` (in this process), Switzerland held out, with the cross-site matrix."""
    import simulations.uncertainty as uncertainty

    if not (HEART_DIR / "processed.switzerland.data").exists():
        pytest.skip(f"UCI heart-disease files not found in {HEART_DIR} (../shared/data is absent)")
    heart_dir = HEART_DIR
    seen = {}

    def spy(hospital, scores, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(hospital=hospital, scores=scores)
        return held_out(hospital, scores, **kwargs)

    held_out = uncertainty.held_out_validation
    run = tmp_path_factory.mktemp("hold_out") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uncertainty, "held_out_validation", spy)
        mp.setattr(sys, "argv", ["fedcare"])
        console = cli.console
        with console.capture() as capture:
            result = cli.app(
                ["simulate", "--task", "heart-disease", "--data-dir", str(heart_dir),
                 "--hold-out", "switzerland", "--no-dp", "--rounds", "3", "--out", str(run),
                 "--backend", "in-process", "--cross-site"], standalone_mode=False,
            )  # fmt: skip
    assert result == cli.RUN_FOLDER_COMPLETE
    summary = json.loads((run / "summary.json").read_text())
    return run, summary, seen["hospital"], seen["scores"], capture.get()


def test_federation_trains_without_the_held_out_hospital(held_out_run):
    _, summary, hospital, _, _ = held_out_run
    assert [h["name"] for h in summary["hospitals"]] == ["cleveland", "hungarian", "va"]
    assert hospital.name == "switzerland"
    # the baselines train on the three training hospitals only: their test splits, no more
    n_test = sum(h["n_test"] for h in summary["hospitals"])
    assert summary["validation"]["n"] == n_test


def test_external_validation_scores_every_record_of_the_held_out_hospital(held_out_run):
    run, summary, hospital, scores, output = held_out_run
    block = summary["external_validation"]
    # Switzerland has 123 rows in the UCI file; the default preprocessing (FLamby's) keeps 46
    assert (
        block["hospital"] == "switzerland"
        and block["n"] == 46 == hospital.n_train + hospital.n_test
    )
    y = np.concatenate([hospital.y_train, hospital.y_test]).astype(int)
    p = np.asarray(scores)
    assert p.shape == (46,) and block["positives"] == int(y.sum())
    assert block["prevalence"] == pytest.approx(y.mean())
    assert block["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    assert block["auprc"]["value"] == pytest.approx(average_precision_score(y, p))
    assert block["calibration"]["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert {"slope", "intercept"} <= set(block["calibration"])
    report = (run / "report.md").read_text()
    assert SECTION in report and "switzerland took no part in the training" in report
    assert "held-out hospital switzerland (n 46" in output.replace("\n", " ")


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedcare", "simulate", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return int(exc.value.code), captured.out + captured.err


def test_unknown_hospital_is_one_clear_error(monkeypatch, capsys, tmp_path, heart_dir):
    code, output = _run(
        monkeypatch, capsys, "--task", "heart-disease", "--data-dir", str(heart_dir),
        "--hold-out", "zurich", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2, output
    assert output.strip() == (
        "error: --hold-out 'zurich': no such hospital; known hospitals: cleveland, hungarian, "
        "switzerland, va"
    )
    assert not (tmp_path / "run").exists()


def test_no_hospital_left_to_train_is_refused(monkeypatch, capsys, tmp_path):
    code, output = _run(
        monkeypatch, capsys, "--hospitals", "1", "--hold-out", "hospital-1",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2, output
    assert "0 would be left to train; a federation needs at least 1" in output
    assert len(output.strip().splitlines()) == 1


def test_every_process_sees_the_same_partition_without_the_held_out_hospital(default_cfg):
    """A partitioned split: ``--hospitals 3 --hold-out hospital-2`` trains hospital-1 and
    hospital-3, exactly the records they hold in the 3-hospital partition."""
    cfg = {**default_cfg, "simulation.hospitals": 2, "simulation.hold-out": "hospital-2"}
    run = RunConfig.from_run_config(cfg)
    full = simulated_hospitals_for(dataclasses.replace(run, simulated_hold_out=""), 3)
    federation = simulated_hospitals_for(run, 2)
    assert [s.name for s in federation] == ["hospital-1", "hospital-3"]
    for got, want in zip(federation, (full[0], full[2]), strict=True):
        np.testing.assert_array_equal(got.x_train, want.x_train)
        np.testing.assert_array_equal(got.y_test, want.y_test)
    assert held_out_hospital(run, 2).n_train == full[1].n_train


def test_evaluate_reports_the_declared_subgroups(held_out_run, tmp_path, monkeypatch, capsys):
    """``fedcare evaluate`` on the held-out model: heart-disease's task file declares sex and age
    bands; each group's n, prevalence and DeLong AUROC, and Switzerland's 'too small' groups."""
    from shared_models import validation as v
    from shared_models.tasks import get_task
    from simulations.external_validation import MIN_SUBGROUP_CLASS, load_model, locate_model
    from tests.handlers import run_fedcare_main

    run = held_out_run[0]
    data = HEART_DIR / "processed.cleveland.data"  # 303 rows, none dropped by FLamby's handling
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(data),
        "--out", str(tmp_path / "cleveland"),
    )  # fmt: skip
    assert code == 0, text
    result = json.loads((tmp_path / "cleveland" / "evaluation.json").read_text())
    assert set(result["subgroups"]) == {"sex", "age"}
    frame = get_task("heart-disease").read_file(data)
    saved = locate_model(run)
    from simulations.external_validation import load_records

    x, y = load_records("heart-disease", saved.card["preprocessing"], data)
    from shared_models.models import predict_proba

    p = predict_proba(load_model(saved), x)
    assert len(frame) == len(y) == result["n"] == 303
    female = frame["sex"].astype(float).to_numpy() == 0
    groups = {r["group"]: r for r in result["subgroups"]["sex"]}
    assert set(groups) == {"female", "male"}
    assert groups["female"]["n"] == int(female.sum())
    assert groups["female"]["positives"] == int(y[female].sum())
    assert groups["female"]["auroc"] == v.delong_ci(y[female], p[female]).as_dict()
    assert groups["female"]["auroc"]["value"] == pytest.approx(roc_auc_score(y[female], p[female]))
    ages = {r["group"]: r for r in result["subgroups"]["age"]}
    assert list(ages) == ["< 50 years", "50 to < 60 years", ">= 60 years"]
    assert sum(r["n"] for r in ages.values()) == 303
    report = (tmp_path / "cleveland" / "report.md").read_text()
    assert "## Subgroups" in report and "| sex | female |" in report

    # Switzerland: 46 records kept of 123; few women, few negatives -> 'too small', no AUROC
    swiss = HEART_DIR / "processed.switzerland.data"
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(swiss),
        "--out", str(tmp_path / "swiss"),
    )  # fmt: skip
    assert code == 0, text
    result = json.loads((tmp_path / "swiss" / "evaluation.json").read_text())
    rows = result["subgroups"]["sex"]
    assert sum(r["n"] for r in rows) == result["n"] == 46
    small = [r for r in rows if min(r["positives"], r["n"] - r["positives"]) < MIN_SUBGROUP_CLASS]
    assert small and all(r["auroc"] is None and "too small" in r["note"] for r in small)
    assert "too small for an AUROC" in (tmp_path / "swiss" / "report.md").read_text()
    # and the shift the model card reveals: 98 % prevalence against about half in training, and
    # cholesterol recorded as 0 (not measured in Switzerland, kept by FLamby's handling)
    assert result["prevalence_warning"] is not None
    chol = [w for w in result["shift"]["feature_warnings"] if w.startswith("feature 'chol'")]
    assert chol and "mean 0 here" in chol[0] and chol[0].endswith("(the task's units)")
    assert "warning: feature 'chol'" in text


def test_cross_site_matrix_scores_every_model_on_every_test_split(held_out_run):
    """``--cross-site``: the global model and each local model on each training hospital's test
    split, AUROC with DeLong's CI (the same AUROCs as FLamby's block, the CI recomputed), and
    with ``--hold-out`` on all of the held-out hospital's records too."""
    from server.checkpoint import load_weights
    from shared_models import validation as v
    from shared_models.models import model_for_run, predict_proba

    run_dir, summary, _, _, _ = held_out_run
    block = summary["cross_site"]
    names = ["cleveland", "hungarian", "va"]
    assert [s["hospital"] for s in block["test_splits"]] == [*names, "switzerland"]
    assert block["test_splits"][3] == {"hospital": "switzerland", "n": 46, "positives": 45,
                                       "held_out": True}  # fmt: skip
    assert [r["model"] for r in block["rows"]] == ["global (federated)"] + [
        f"local {n}" for n in names
    ]
    flamby = summary["test_split_auroc"]
    rows = {r["model"]: r for r in block["rows"]}
    for name in names:
        assert rows["global (federated)"]["cells"][name]["auroc"]["value"] == pytest.approx(
            flamby["federated"]["per_test_split"][name]
        )
        for local in flamby["local"]:
            cell = rows[f"local {local['trained_on']}"]["cells"][name]["auroc"]
            assert cell["value"] == pytest.approx(local["per_test_split"][name])
            assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]
    recorded = json.loads(sorted((run_dir / "checkpoints").glob("round-*.json"))[-1].read_text())
    config = RunConfig.from_run_config(recorded["run_config"])
    hospitals = simulated_hospitals_for(config, 3)
    model, _ = model_for_run(config)
    model.load_state_dict(load_weights(run_dir / "model.safetensors"))
    va = hospitals[2]
    p = predict_proba(model, va.x_test)
    assert rows["global (federated)"]["cells"]["va"]["auroc"] == v.delong_ci(va.y_test, p).as_dict()
    assert block["test_splits"][2]["n"] == va.n_test
    report = (run_dir / "report.md").read_text()
    assert (
        "## Cross-site matrix (--cross-site)" in report and "| **global (federated)** |" in report
    )
    assert "| local va |" in report
    assert "cross-site matrix: 4 models x 4 test splits" in held_out_run[4].replace("\n", " ")
    # the held-out column: the global model's cell is the external validation's AUROC
    external = summary["external_validation"]["auroc"]["value"]
    swiss = rows["global (federated)"]["cells"]["switzerland"]["auroc"]
    assert swiss["value"] == pytest.approx(external)
    assert all("switzerland" in r["cells"] for r in block["rows"])
    assert "held out, all records" in report
    # 45 of Switzerland's 46 kept records are positive: no DeLong interval, and the report says why
    assert swiss["ci_low"] is None and "fewer than 2 patients of a class" in swiss["note"]
    assert f"{swiss['value']:.3f} (interval undefined: fewer than 2 patients of a class)" in report
