"""``model.md``: the model card (Mitchell et al. 2019; TRIPOD+AI, Collins et al. 2024) written
next to the final model by the real ``fedcare simulate`` (in this process)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from server.model_card import MODEL_CARD, SECTIONS


def _simulate(out: Path, *args: str) -> None:
    from simulations.cli import app

    app(
        ["simulate", "--rounds", "2", "--seed", "0", "--backend", "in-process", "--out", str(out),
         *args],
        standalone_mode=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """Two 2-round breast-cancer runs: with the default DP and with ``--no-dp``."""
    root = tmp_path_factory.mktemp("card")
    _simulate(root / "dp")
    _simulate(root / "no-dp", "--no-dp")
    return {"dp": root / "dp", "no-dp": root / "no-dp"}


def _card(run: Path) -> tuple[str, dict]:
    assert (run / "model.safetensors").exists() and (run / "model.json").exists()
    return (run / MODEL_CARD).read_text(), json.loads((run / "summary.json").read_text())


def _row(text: str, hospital: str, header: str) -> list[str]:
    """The cells of ``hospital``'s row in the table under the ``## header`` section."""
    section = text.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {hospital} |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("kind", ["dp", "no-dp"])
def test_model_card_has_every_section_and_the_hospitals(runs, kind):
    text, summary = _card(runs[kind])
    headers = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headers == list(SECTIONS)
    assert "Mitchell et al." in text and "TRIPOD+AI" in text
    assert "**Label 1 means**: malignant" in text
    assert "**Parameters**: " in text and "flwr 1.41" in text
    assert len(summary["hospitals"]) == 3
    for h in summary["hospitals"]:
        name, n_train, n_test, trained, missed = _row(text, h["name"], "Hospitals (training data)")
        assert (n_train, n_test) == (str(h["n_train"]), str(h["n_test"]))
        assert (trained, missed) == ("2 of 2", "none")
    assert "not validated for clinical use" in text
    assert summary["overall"]["method"] in text
    assert "train.rounds = 2" in text  # how to reproduce: the recorded run config


def test_model_card_privacy_epsilon_per_hospital_equals_the_summary(runs):
    text, summary = _card(runs["dp"])
    assert "sample-level DP" in text and "**Accountant**: rdp" in text
    for h in summary["hospitals"]:
        eps, delta, sigma = _row(text, h["name"], "Privacy")[1:]
        assert h["epsilon"] is not None and float(eps) == pytest.approx(h["epsilon"], rel=1e-3)
        assert float(delta) == pytest.approx(h["delta"])
        assert float(sigma) > 0


def test_model_card_says_none_without_dp(runs):
    text, _ = _card(runs["no-dp"])
    privacy = text.split("## Privacy\n", 1)[1].split("\n## ", 1)[0]
    assert "**none: trained without DP**" in privacy
    assert "ε" not in privacy


def test_model_card_of_a_deployed_client_level_run():
    """A ``fedcare server run``-shaped summary (no ``positive_class``, client-level DP, noisy
    per-hospital counts, a missed round) renders every section from what it holds."""
    from server.model_card import render_model_card

    card = {"task": "breast-cancer", "model": {"name": "mlp", "input_shape": [30]}}
    summary = {
        "task": "breast-cancer", "strategy": "fedavg", "model": "default", "rounds": 3,
        "dp": {"enabled": True, "level": "client", "guarantee": "client-level (ε, δ)-DP",
               "target_epsilon": 5.0, "delta": 1e-5, "clipping_norm": 1.0,
               "noise_multiplier_set": None, "epsilon": 4.2, "releases": 3},
        "hospitals": [
            {"name": "a", "n_train": 80, "n_test": 40, "rounds_trained": 2,
             "evaluation": "noisy counts (Gaussian, σ = 5 patients)", "metrics": {"auroc": 0.7}},
        ],
        "overall": {"auroc": 0.8, "method": "pooled test counts of 1 hospital(s)"},
        "failures": [{"round": 2, "kind": "train", "hospital": "a", "cause": "timed out"}],
        "quality_warnings": ["the federated model predicts negative for every test patient"],
    }  # fmt: skip
    text = render_model_card(card, summary, parameters=31)
    assert re.findall(r"^## (.+)$", text, flags=re.M) == list(SECTIONS)
    assert "**Label 1 means**: malignant (as the task declares it)" in text
    assert _row(text, "a", "Hospitals (training data)")[1:] == ["80", "40", "2 of 3", "2"]
    assert "**ε spent** (released models): 4.2 over 3 release(s)" in text
    assert "**Noise multiplier**: calibrated to the target ε" in text
    assert "noisy counts (Gaussian, σ = 5 patients)" in text and "DP-noised" in text
    assert "Quality warning: the federated model predicts negative" in text
    assert "No command line or run config was recorded" in text


def test_a_deployment_card_records_only_the_released_prevalence():
    """``model.json`` ``training_data`` in a deployment: the test-split prevalence from the score
    histograms the hospitals released (noisy ones marked), no feature distributions."""
    from server.history import HospitalEvent, RunHistory
    from server.server_app import released_training_data

    history = RunHistory()
    history.events += [
        HospitalEvent(round=3, kind="evaluate", node_id=1, hospital="a",
                  histograms={"hist-neg": [6.0, 2.0, 0.0], "hist-pos": [0.0, 1.0, 1.0]},
                  metrics={"eval-noise-multiplier": 5.0}),
        # a negative noisy count counts as 0
        HospitalEvent(round=3, kind="evaluate", node_id=2, hospital="b",
                  histograms={"hist-neg": [3.0, -1.0, 0.0], "hist-pos": [0.0, 0.0, 1.0]}),
        HospitalEvent(round=3, kind="evaluate", node_id=3, hospital="c", error="refused"),
    ]  # fmt: skip
    block = released_training_data(history)
    assert block["exact"] is False and block["features"] is None
    assert block["hospitals"] == {
        "a": {"prevalence": pytest.approx(0.2), "noisy": True},
        "b": {"prevalence": pytest.approx(0.25), "noisy": False},
    }
    assert block["prevalence"] == pytest.approx(0.225)
    assert "released" in block["provenance"]
