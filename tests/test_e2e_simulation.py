"""End-to-end: the real `fedcare simulate` command through Flower's Simulation Engine (Ray).

Each test starts the CLI as a subprocess, exactly as a user does, and checks the run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest
from opacus.accountants import RDPAccountant

from client.training import plan_dp

pytestmark = pytest.mark.slow


def _simulate(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[dict, str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    token = uuid.uuid4().hex  # inherited by every process the run starts (Ray's too)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))}
    env["FEDCARE_TEST_RUN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", *args, "--out", str(out)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    _assert_no_leftover_processes(token)
    return json.loads((out / "summary.json").read_text()), output, out


def _assert_no_leftover_processes(token: str) -> None:
    """No process started by the run (Ray's raylet, GCS, workers ...) survives it: every process
    whose environment carries this run's token must be gone."""
    deadline = time.time() + 15
    while True:
        left = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and p.environ().get("FEDCARE_TEST_RUN") == token:
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:100]}")
            except psutil.Error:
                continue
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"


def test_two_hospitals_two_rounds_with_dp(tmp_path):
    # the default backend: in this process, no Ray node hosted a hospital (the Ray backend runs
    # end to end in test_hospitals_run_on_both_nodes_of_a_ray_cluster)
    summary, output, out = _simulate(
        tmp_path, "--hospitals", "2", "--rounds", "2", "--epsilon", "2"
    )
    assert summary["ray_nodes"] == {}
    assert "Traceback" not in output
    assert "deprecat" not in output.lower()
    assert [h["name"] for h in summary["hospitals"]] == ["hospital-1", "hospital-2"]
    assert summary["dp"]["enabled"] and summary["dp"]["target_epsilon"] == 2.0
    for h in summary["hospitals"]:
        assert 0 < h["epsilon"] <= 2.0 and h["delta"] == 1e-5
        assert h["rounds_trained"] == 2
    assert summary["overall"]["auroc"] > 0.8
    assert set(summary["baselines"]) == {
        "pooled (centralised, non-private)", "local (each hospital alone, non-private)"
    }  # fmt: skip
    metrics = pd.read_csv(out / "metrics.csv")
    for _, grp in metrics.groupby("hospital"):
        eps = grp.sort_values("round")["epsilon"].tolist()
        assert len(eps) == 2 and eps[0] < eps[1]  # strictly increasing, cumulative
    for name in ("round-001", "round-002"):
        sidecar = json.loads((out / "checkpoints" / f"{name}.json").read_text())
        assert (out / "checkpoints" / f"{name}.safetensors").stat().st_size > 0
        assert sidecar["round"] == int(name[-1])
        assert set(sidecar["privacy"]) == {"hospital-1", "hospital-2"}
        assert sidecar["versions"]["flwr"] == "1.41.0"
        # its own round's replies, not the history so far (O(R^2) bytes over R rounds)
        assert "history" not in sidecar
        assert {e["round"] for e in sidecar["events"]} == {sidecar["round"]}
        kinds = ["train"] if name == "round-001" else ["evaluate", "train"]  # evaluate: last round
        assert sorted((e["kind"], e["hospital"]) for e in sidecar["events"]) == [
            (kind, hospital) for kind in kinds for hospital in ("hospital-1", "hospital-2")
        ]
    history = json.loads((out / "history.json").read_text())
    assert sorted(e["round"] for e in history["events"] if e["kind"] == "train") == [1, 1, 2, 2]
    card = json.loads((out / "model.json").read_text())
    assert card["privacy"]["guarantee"].startswith("sample-level")
    assert "ε" in (out / "report.md").read_text() and (out / "curves.png").exists()


def test_a_useless_model_is_said_and_one_class_test_splits_are_named(tmp_path):
    """One round at the largest learning rate the schema allows diverges: the model predicts one
    class. The console and report.md say so with what to try, and name the Dirichlet split's
    hospitals whose test split has one class (seed 0: hospital-2 all positive, hospital-3 all
    negative), the FLamby averages being over the other two."""
    summary, output, out = _simulate(
        tmp_path, "--partition", "dirichlet", "--hospitals", "4", "--no-dp", "--rounds", "1",
        "--run-config", "train.lr=100",
    )  # fmt: skip
    report = (out / "report.md").read_text()
    console = " ".join(output.split())  # rich wraps long lines
    block = summary["test_split_auroc"]
    assert set(block["undefined"]) == {"hospital-2", "hospital-3"} and block["n_splits"] == 2
    for text in (console, report):
        assert "hospital-2's test split has no AUROC: test split has only one class (" in text
        assert "hospital-3's test split has no AUROC" in text
        assert "the averages are over the other 2 test split(s)" in text
    one_class, below = summary["quality_warnings"]
    assert one_class.startswith("the federated model predicts ")
    assert "for every test patient at threshold 0.5" in one_class
    assert block["federated"]["average"] < block["local_mean"]
    assert f"{block['federated']['average']:.3f}, is below the mean local" in below
    for warning in (one_class, below):
        assert "Try more rounds (--rounds; this run 1)" in warning and "train.lr" in warning
        assert f"**Warning: {warning}**" in report
        assert f"warning: {warning}" in console


def test_heart_disease_real_hospitals_no_dp(tmp_path, heart_dir):
    """FLamby reports mean client accuracy 0.685 (FedAvg) and 0.735 (pooled)."""
    summary, _, _ = _simulate(tmp_path, "--task", "heart-disease", "--data-dir", str(heart_dir),
                              "--no-dp", "--rounds", "15", "--seed", "0")  # fmt: skip
    assert [h["name"] for h in summary["hospitals"]] == [
        "cleveland",
        "hungarian",
        "switzerland",
        "va",
    ]
    assert summary["overall"]["mean_client_accuracy"] >= 0.70
    assert all(h["epsilon"] is None for h in summary["hospitals"])


def test_heart_disease_epsilon_equals_the_accountant(tmp_path, heart_dir):
    summary, _, _ = _simulate(tmp_path, "--task", "heart-disease", "--data-dir", str(heart_dir),
                              "--epsilon", "1", "--rounds", "5", "--seed", "0")  # fmt: skip
    settings = {k: row["value"] for k, row in summary["run_settings"].items()}
    assert summary["run_settings"]["train.rounds"]["source"] == "--rounds"
    assert summary["run_settings"]["train.batch-size"]["source"].startswith("rule for DP-SGD")
    for h in summary["hospitals"]:
        plan = plan_dp(
            n_train=h["n_train"], batch_size=settings["train.batch-size"],
            local_epochs=settings["train.local-epochs"], rounds=5,
            target_epsilon=1.0, target_delta=1e-5, max_grad_norm=settings["dp.max-grad-norm"],
        )  # fmt: skip
        reference = RDPAccountant()
        for _ in range(h["rounds_trained"] * plan.steps_per_round):
            reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert h["epsilon"] <= 1.0
        assert h["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


def test_ledger_and_policy_hold_across_two_simulations(tmp_path):
    """Run 1 spends ε=2 at every simulated hospital; run 2 would take the lifetime past the
    policy's 2.5 and is refused before any training, with the refusals in its report."""
    policy = tmp_path / "policy.toml"
    policy.write_text("lifetime-epsilon = 2.5\n")
    common = ["--hospitals", "2", "--rounds", "2", "--epsilon", "2", "--ledger-dir", str(tmp_path / "ledgers"),
              "--policy", str(policy)]  # fmt: skip
    summary, _, _ = _simulate(tmp_path / "one", *common)
    assert all(0 < h["epsilon"] <= 2.0 for h in summary["hospitals"])
    out = tmp_path / "two" / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", *common, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "no hospital trained" in proc.stderr
    refusals = json.loads((out / "summary.json").read_text())["failures"]
    assert {f["hospital"] for f in refusals} == {"hospital-1", "hospital-2"}
    assert all(
        "lifetime ε above the policy's lifetime-epsilon 2.5" in f["reason"] for f in refusals
    )
    entries = sorted((tmp_path / "ledgers" / "hospital-1" / "runs").glob("*.json"))
    assert len(entries) == 1  # the refused run left nothing in the ledger


def test_client_level_dp_with_secure_aggregation(tmp_path):
    """dp.level = client + SecAgg+: hospitals clip, the coordinator noises only the unmasked sum;
    the report states the guarantee and ε is Flower's accountant over the rounds released."""
    from server.strategies import calibrate_client_noise, client_dp_epsilon

    summary, output, out = _simulate(
        tmp_path, "--hospitals", "4", "--rounds", "2",
        "--run-config", "dp.level='client' secagg.enabled=true",
    )  # fmt: skip
    dp = summary["dp"]
    assert dp["level"] == "client" and dp["guarantee"].startswith("client-level (ε, δ)-DP")
    sigma = calibrate_client_noise(2.0, 1e-5, 2, 4)
    assert dp["epsilon"] == pytest.approx(client_dp_epsilon(sigma, 2, 1e-5, 4), rel=1e-6)
    assert 1.99 < dp["epsilon"] <= 2.0 and dp["releases"] == 2
    assert summary["secure_aggregation"]["enabled"] is True
    assert all(h["epsilon"] is None and h["rounds_trained"] == 2 for h in summary["hospitals"])
    assert not summary["failures"]
    assert "privacy: client-level ε = 2.000" in output
    assert "**client-level** DP" in (out / "report.md").read_text()


def test_same_seed_same_weights_only_without_dp(tmp_path):
    """The seed fixes the partitions, the initial model and (without DP) the batch order; DP-SGD
    noise and Poisson sampling come from each hospital's CSPRNG, so two DP runs differ."""
    from safetensors.torch import load_file

    def final(name: str, *args: str) -> dict:
        _, _, out = _simulate(tmp_path / name, "--hospitals", "2", "--rounds", "1", *args)
        return load_file(str(out / "model.safetensors"))

    dp = [final(f"dp{i}", "--epsilon", "2", "--seed", "3") for i in (1, 2)]
    plain = [final(f"plain{i}", "--no-dp", "--seed", "3") for i in (1, 2)]
    assert max(float((dp[0][k] - dp[1][k]).abs().max()) for k in dp[0]) > 1e-3
    assert all(bool((plain[0][k] == plain[1][k]).all()) for k in plain[0])


def test_a_run_resumes_from_its_checkpoint_of_round_1000(tmp_path):
    """Checkpoints are numbered past 999 and a resume finds round 1000 (not round 999 by name),
    with the run's history from history.json up to that round."""
    import shutil

    from server.run_config import default_run_config
    from simulations.engine import run_federation

    out = tmp_path / "run"
    cfg = {**default_run_config(), "train.rounds": 1, "simulation.hospitals": 2, "dp.enabled": False,
           "model.name": "logreg", "output.dir": str(out), "strategy.min-available-nodes": 2,
           "run.id": "long-run"}  # fmt: skip
    run_federation(run_config=cfg, num_supernodes=2, in_process=True)  # simulate's default
    ckpt = out / "checkpoints"
    for rnd in (999, 1000):  # pretend the run got that far
        shutil.copy(ckpt / "round-001.safetensors", ckpt / f"round-{rnd:03d}.safetensors")
        sidecar = json.loads((ckpt / "round-001.json").read_text())
        sidecar["round"] = rnd
        (ckpt / f"round-{rnd:03d}.json").write_text(json.dumps(sidecar))
    # and stopped after history.json had round 1001's replies, before round 1001's checkpoint:
    # the resume repeats round 1001, and history.json must not count it twice
    history = json.loads((out / "history.json").read_text())
    history["events"] += [{**e, "round": 1001} for e in history["events"] if e["kind"] == "train"]
    (out / "history.json").write_text(json.dumps(history))
    run_federation(
        run_config={**cfg, "train.rounds": 1001, "run.resume-from": str(out)}, num_supernodes=2,
        in_process=True,
    )  # fmt: skip
    assert json.loads((ckpt / "round-1001.json").read_text())["round"] == 1001
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1001 and all(h["rounds_trained"] == 2 for h in summary["hospitals"])
    history = json.loads((out / "history.json").read_text())
    assert sorted({e["round"] for e in history["events"]}) == [1, 1001]


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(tmp_path):
    """Without DP (hospitals' batches follow the run's seed): 1 round, then a resume to 3 rounds,
    ends at the weights of an uninterrupted 3-round FedAdam run (the strategy's moments come from
    the checkpoint); a fresh 2-round run (a resume that ignored its checkpoint) ends elsewhere."""
    import torch
    from safetensors.torch import load_file

    from server.run_config import default_run_config
    from simulations.engine import run_federation

    base = {**default_run_config(), "simulation.hospitals": 2, "dp.enabled": False,
            "model.name": "logreg", "strategy.name": "fedadam", "strategy.min-available-nodes": 2}  # fmt: skip
    ends = {}
    for name, rounds in (("whole", 3), ("fresh", 2), ("resumed", 1)):
        cfg = {**base, "train.rounds": rounds, "output.dir": str(tmp_path / name), "run.id": name}
        run_federation(run_config=cfg, num_supernodes=2, in_process=True)  # simulate's default
        if name == "resumed":
            resumed = {**cfg, "train.rounds": 3, "run.resume-from": str(tmp_path / name)}
            run_federation(run_config=resumed, num_supernodes=2, in_process=True)
        ends[name] = load_file(str(tmp_path / name / "model.safetensors"))
    for key, value in ends["whole"].items():
        torch.testing.assert_close(ends["resumed"][key], value, atol=1e-5, rtol=0)
    assert any(not torch.allclose(ends["fresh"][k], v, atol=1e-3) for k, v in ends["whole"].items())


def test_chest_xray_on_hospital_image_folders(tmp_path):
    """Two hospitals' own folders (PNG + 16-bit DICOM + labels.csv) train a DP CNN through
    Flower's Simulation Engine and the report covers both."""
    from tests.images_data import write_hospital_folder

    data = tmp_path / "data"
    write_hospital_folder(data / "hospital-a", 60, seed=0)
    write_hospital_folder(data / "hospital-b", 50, seed=1)
    # the CNN, not the DP recipe's scattering model: naming the model drops the recipe's pair
    summary, output, out = _simulate(
        tmp_path, "--task", "chest-xray", "--data-dir", str(data), "--rounds", "3",
        "--epsilon", "8", "--run-config", "model.name='cnn' train.batch-size=16 train.lr=1.0",
    )  # fmt: skip
    assert "Traceback" not in output
    # the hospitals train in this process, beside the baselines' thread: no library notice
    # (Opacus' hooks, its RNG, RDP's optimal order) reaches the researcher's console
    assert "Warning" not in output, output
    assert [h["name"] for h in summary["hospitals"]] == ["hospital-a", "hospital-b"]
    sizes = [(h["n_train"], h["n_test"]) for h in summary["hospitals"]]
    assert [a + b for a, b in sizes] == [60, 50] and all(b >= 5 for _, b in sizes)  # 20 % each
    for h in summary["hospitals"]:
        assert h["rounds_trained"] == 3 and 0 < h["epsilon"] <= 8
    assert summary["overall"]["auroc"] > 0.8  # the synthetic lesion is easy to see
    assert set(summary["baselines"]) == {
        "pooled (centralised, non-private)", "local (each hospital alone, non-private)"
    }  # fmt: skip
    card = json.loads((out / "model.json").read_text())
    assert card["model"]["name"] == "cnn" and card["model"]["input_shape"] == [1, 28, 28]


def test_hospitals_run_on_both_nodes_of_a_ray_cluster(tmp_path):
    """`fedcare simulate --ray-address` on Ray's own two-node test cluster (a head and a worker
    node on this machine, loopback only, one CPU each): the run's summary shows that both nodes
    hosted hospitals."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # nodes on 127.0.0.1, not the LAN IP
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_ADDRESS"))}
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.cli", "simulate", "--hospitals", "4", "--rounds",
             "2", "--ray-address", cluster.address, "--out", str(out)],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        nodes = json.loads((out / "summary.json").read_text())["ray_nodes"]
        assert len(nodes) == 2  # the head's and the worker's actor each trained hospitals
        assert {s for hospitals in nodes.values() for s in hospitals} == {
            f"hospital-{i}" for i in range(1, 5)
        }
        assert "Ray node" in proc.stdout
    finally:
        cluster.shutdown()
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
