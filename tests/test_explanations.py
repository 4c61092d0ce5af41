"""DP explanation releases (issue #26): the mechanism, the hospital's handler and ledger, the
policy, a hostile coordinator asking again, and the coordinator's pooling and report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.client_app import HOSPITAL_REFUSED
from client.client_app import app as client_app
from client.explanations import (
    clip_rows,
    noise_for_epsilon,
    release_attributions,
    release_epsilon,
)
from client.secure_random import SecureRandom
from server.explanations import aggregate_explanations, explanation_lines
from shared_models.attributions import attributions, per_feature
from shared_models.models import LogisticRegression, build_model
from tests.handlers import make_context, make_request, use_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


# ------------------------------------------------------------------------------------------
# the mechanism
# ------------------------------------------------------------------------------------------
def test_noise_multiplier_for_epsilon_one_is_pinned():
    """Gaussian mechanism, one release, RDP at δ = 1e-5 (Opacus' orders): σ ≈ 4.05 for ε = 1;
    the schema's default 4.1 gives ε = 0.985."""
    sigma = noise_for_epsilon(1.0, delta=1e-5)
    assert sigma == pytest.approx(4.045, abs=0.01)
    assert release_epsilon(sigma, delta=1e-5) <= 1.0
    assert release_epsilon(4.1, delta=1e-5) == pytest.approx(0.9854, abs=1e-3)


def test_release_adds_noise_of_sigma_times_clip_on_every_coordinate():
    """Zero attributions: the released sums are the noise alone, with standard deviation
    σ·C (a band: silently dropped or mis-scaled noise fails)."""
    zeros = np.zeros((10, 2000))
    signed, absolute = release_attributions(zeros, clip=0.5, noise_multiplier=3.0)
    noise = np.array(signed + absolute)
    assert noise.std() == pytest.approx(1.5, rel=0.05)
    assert abs(noise.mean()) < 0.1
    # released values are multiples of GRID * C: nothing of the float's low bits leaves
    assert np.allclose(np.rint(noise / 5e-4) * 5e-4, noise, atol=1e-9)


def test_one_patient_moves_the_clipped_sums_by_at_most_the_clip_bound():
    """The sensitivity the accountant assumes: [a, |a|] of any one patient, however large, adds
    at most C in L2 to the pre-noise sums."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    outlier = np.full((1, 8), 1e6)
    before = clip_rows(np.concatenate([a, np.abs(a)], axis=1), 0.7).sum(axis=0)
    with_one = np.concatenate([a, outlier])
    after = clip_rows(np.concatenate([with_one, np.abs(with_one)], axis=1), 0.7).sum(axis=0)
    assert np.linalg.norm(after - before) <= 0.7 + 1e-9


def test_non_finite_attributions_count_as_zero_instead_of_refusing():
    """Weights that overflow for some patients only must not make the release fail (a refusal
    would reveal that such a patient exists): that patient counts as zeros."""
    a = np.ones((3, 4))
    a[1, 2] = np.inf
    key = b"k" * 32
    got = release_attributions(a, clip=1.0, noise_multiplier=1.0, randomness=SecureRandom(key))
    clean = np.delete(a, 1, axis=0)
    want = release_attributions(clean, clip=1.0, noise_multiplier=1.0, randomness=SecureRandom(key))
    assert got == want


def test_release_refuses_noiseless_settings():
    with pytest.raises(ValueError, match="noise_multiplier"):
        release_attributions(np.ones((2, 2)), clip=1.0, noise_multiplier=0.0)


def test_exact_logistic_attributions_equal_captums_integrated_gradients():
    """For logistic regression, w_j x_j is Integrated Gradients from the zero baseline; for an
    MLP, Captum's attributions add up to logit(x) - logit(0) (completeness)."""
    x = np.random.default_rng(1).normal(size=(20, 6)).astype(np.float32)
    logreg = build_model("logreg", n_features=6, seed=3)
    exact = attributions(logreg, x, method="exact")
    ig = attributions(logreg, x, method="integrated-gradients", steps=16)
    assert np.allclose(exact, ig, atol=1e-5)
    mlp = build_model("mlp", n_features=6, seed=3)
    ig = attributions(mlp, x, steps=64)
    with torch.no_grad():
        gap = mlp(torch.from_numpy(x)) - mlp(torch.zeros(1, 6))
    assert np.allclose(ig.sum(axis=1), gap.numpy(), atol=0.02)


def test_icu_attributions_are_summed_per_variable():
    """[N, T, V, 3] -> [N, V]: one importance per ICU variable, completeness kept."""
    attr = np.random.default_rng(2).normal(size=(4, 48, 46, 3))
    per_var = per_feature(attr, axis=1)
    assert per_var.shape == (4, 46)
    assert np.allclose(per_var.sum(axis=1), attr.sum(axis=(1, 2, 3)))


def test_icu_models_get_one_attribution_per_variable():
    """The ClientApp's path for ICU stays: Integrated Gradients over [T, V, 3], per variable."""
    from shared_models.attributions import feature_attributions
    from shared_models.tasks import get_task

    task = get_task("icu-mortality")
    shape = task.input_shape("hourly")
    x = np.random.default_rng(4).normal(size=(2, *shape)).astype(np.float32)
    x[..., 1] = x[..., 1] > 0  # observed-in-this-bin masks
    model = build_model("icu-logreg", input_shape=shape, seed=0)
    per_var = feature_attributions(model, x, axis=task.attribution_axis, steps=8)
    assert per_var.shape == (2, 46) and np.isfinite(per_var).all()
    assert task.explained_features("hourly")[:2] == ("ALP", "ALT")
    assert len(task.explained_features("hourly")) == 46


def test_exact_method_refuses_a_non_linear_model():
    with pytest.raises(ValueError, match="needs a linear model"):
        attributions(build_model("mlp", n_features=3), np.zeros((1, 3), np.float32), method="exact")


# ------------------------------------------------------------------------------------------
# acceptance 1: a synthetic task, 20 features of which 3 informative, 3 hospitals x 500
# ------------------------------------------------------------------------------------------
def _fitted_logreg(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    """A logistic regression fitted by full-batch gradient descent (plain torch)."""
    model = LogisticRegression(x.shape[1])
    opt = torch.optim.LBFGS(model.parameters(), max_iter=100)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def closure():  # type: ignore[no-untyped-def]
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt), yt)
        loss.backward()
        return loss

    opt.step(closure)
    return model


def test_released_importance_ranks_the_informative_features_on_top_at_epsilon_one():
    sigma = noise_for_epsilon(1.0, delta=1e-5)
    informative = {4, 11, 17}
    hits = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        hospitals = []
        for _ in range(3):  # 3 hospitals of 500 patients
            x = rng.normal(size=(500, 20)).astype(np.float32)
            logit = 1.5 * x[:, 4] - 1.2 * x[:, 11] + 1.0 * x[:, 17]
            y = (rng.random(500) < 1 / (1 + np.exp(-logit))).astype(np.float32)
            hospitals.append((x[:350], y[:350], x[350:]))  # train / evaluation split
        model = _fitted_logreg(np.concatenate([s[0] for s in hospitals]), np.concatenate([s[1] for s in hospitals]))  # fmt: skip
        releases = []
        for h, (_, _, x_eval) in enumerate(hospitals):
            signed, absolute = release_attributions(
                attributions(model, x_eval), clip=1.0, noise_multiplier=sigma
            )
            releases.append({"hospital": f"h{h}", "n": len(x_eval), "signed": signed,
                             "absolute": absolute, "noise_multiplier": sigma, "clip": 1.0,
                             "epsilon_release": 1.0, "epsilon": None})  # fmt: skip
        pooled = aggregate_explanations(releases, [], [f"x{j}" for j in range(20)])
        hits += set(pooled["ranking"][:3]) == informative
    assert hits >= 9


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("explain.clip", 0.0, "'explain.clip' = 0.0 is outside (0.0"),
        ("explain.noise-multiplier", -1.0, "'explain.noise-multiplier' = -1.0 is outside"),
        ("explain.method", "shap", "'explain.method' = 'shap'; choose one of"),
        ("explain.ig-steps", 1, "'explain.ig-steps' = 1 is outside [2, 1024]"),
        ("explain.enabled", "yes", "'explain.enabled' must be bool"),
    ],
)
def test_explain_settings_are_range_checked(default_cfg, key, value, message):
    from shared_models.config import ConfigError, RunConfig

    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({**default_cfg, key: value})
    assert message in str(err.value)


def test_policy_keys_are_strictly_typed(tmp_path):
    from client.policy import HospitalPolicy, PolicyError

    path = tmp_path / "p.toml"
    path.write_text('allow-explanations = "no"\n')
    with pytest.raises(PolicyError, match="allow-explanations must be true or false"):
        HospitalPolicy.load(path)
    path.write_text("allow-explanations = false\nmax-explanation-epsilon = 0.5\n")
    policy = HospitalPolicy.load(path)
    assert not policy.allow_explanations and policy.max_explanation_epsilon == 0.5


# ------------------------------------------------------------------------------------------
# the hospital's handler, ledger and policy
# ------------------------------------------------------------------------------------------
def _explain_request(model, server_round: int = 3):  # type: ignore[no-untyped-def]
    return make_request("query.explain", model, server_round)


@pytest.fixture
def deployed(tmp_path, default_cfg):
    """A hospital with a ledger and a policy file (simulated data, partition 0 of 3)."""

    def make(policy: str = "", **cfg):  # type: ignore[no-untyped-def]
        (tmp_path / "policy.toml").write_text(policy)
        run = {**default_cfg, "run.id": "exp-run", "explain.enabled": True, **cfg}
        node = {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(tmp_path / "ledger"),
                "policy-path": str(tmp_path / "policy.toml")}  # fmt: skip
        return make_context(run, node)

    return make


def _ledger(tmp_path):  # type: ignore[no-untyped-def]
    from client.ledger import Ledger

    return Ledger(tmp_path / "ledger").load("exp-run")


def test_release_is_its_own_ledger_entry_and_composes_into_the_runs_epsilon(deployed, tmp_path):
    ctx = deployed()
    model = build_model("mlp", n_features=30, seed=1)
    reply = client_app(_explain_request(model), ctx)
    assert not reply.has_error(), reply.error
    m = reply.content["metrics"]
    assert len(m["attr-sum"]) == len(m["attr-abs-sum"]) == 30
    record = _ledger(tmp_path)
    assert record.explanations == [4.1]
    assert record.accountant["history"] == [[4.1, 1.0, 1]]
    assert record.epsilon() == pytest.approx(release_epsilon(4.1, delta=1e-5))
    assert m["epsilon"] == pytest.approx(record.epsilon())
    # after training, the run's ε composes both (RDP), more than either alone
    ctx2 = deployed(**{"run.id": "exp-run-2"})
    client_app(make_request("train", model, 1), ctx2)
    from client.ledger import Ledger

    trained = Ledger(tmp_path / "ledger").load("exp-run-2")
    before = trained.epsilon()
    reply = client_app(_explain_request(model, 5), ctx2)
    assert not reply.has_error(), reply.error
    after = Ledger(tmp_path / "ledger").load("exp-run-2").epsilon()
    assert before < after < before + release_epsilon(4.1, delta=1e-5)


def test_hostile_coordinator_asking_again_gets_the_same_release_or_a_refusal(deployed, tmp_path):
    ctx = deployed()
    model = build_model("mlp", n_features=30, seed=1)
    first = client_app(_explain_request(model), ctx)
    # the identical request: the same release again (post-processing), no new noise, no charge
    again = client_app(_explain_request(model), ctx)
    assert again.content["metrics"]["attr-sum"] == first.content["metrics"]["attr-sum"]
    assert again.content["info"]["replayed"] is True
    assert _ledger(tmp_path).accountant["history"] == [[4.1, 1.0, 1]]
    # other weights (or another round): refused, nothing charged
    other = client_app(_explain_request(build_model("mlp", n_features=30, seed=2)), ctx)
    assert other.has_error() and other.error.code == HOSPITAL_REFUSED
    assert "already received its explanation release" in other.error.reason
    assert _ledger(tmp_path).explanations == [4.1]


def test_asking_under_new_run_ids_is_charged_every_time_until_the_lifetime_cap(deployed, tmp_path):
    """A coordinator that invents a run id per request gets a release each time, each charged:
    the lifetime ε composes them (RDP) and the policy's lifetime cap ends it (a new run is also
    refused once its planned training would not fit next to the releases already made)."""
    from client.ledger import Ledger, lifetime_epsilon

    model = build_model("mlp", n_features=30, seed=1)
    replies = [
        client_app(_explain_request(model), deployed("lifetime-epsilon = 3.0\n", **{"run.id": f"probe-{i}"}))
        for i in range(6)
    ]  # fmt: skip
    ok = [not r.has_error() for r in replies]
    released = ok.index(False)
    assert released >= 1 and not any(ok[released:])  # releases, then refusals only
    assert all("lifetime-epsilon 3" in r.error.reason for r in replies[released:])
    records = Ledger(tmp_path / "ledger").records()
    assert [r.explanations for r in records] == [[4.1]] * released
    total = lifetime_epsilon([r.accountant for r in records], delta=1e-5)
    assert release_epsilon(4.1, delta=1e-5) < total <= 3.0


def test_a_hospital_without_a_ledger_also_refuses_a_second_release(default_cfg):
    ctx = make_context(
        {**default_cfg, "explain.enabled": True}, {"partition-id": 0, "num-partitions": 3}
    )
    client_app(_explain_request(build_model("mlp", n_features=30, seed=1)), ctx)
    second = client_app(_explain_request(build_model("mlp", n_features=30, seed=1)), ctx)
    assert second.has_error() and "already received" in second.error.reason


@pytest.mark.parametrize(
    ("policy", "cfg", "reason"),
    [
        ("allow-explanations = false\n", {}, "forbids explanation releases"),
        ("max-explanation-epsilon = 0.5\n", {}, "max-explanation-epsilon 0.5"),
        ("", {"explain.enabled": False}, "does not ask for explanations"),
        ("", {"explain.method": "exact"}, "needs a linear model"),
    ],
)
def test_refusals_charge_nothing(deployed, tmp_path, policy, cfg, reason):
    reply = client_app(_explain_request(build_model("mlp", n_features=30)), deployed(policy, **cfg))
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED
    assert reason in reply.error.reason
    record = _ledger(tmp_path)
    assert record is None or not record.explanations


def test_lifetime_cap_refuses_the_release(deployed, tmp_path):
    reply = client_app(
        _explain_request(build_model("mlp", n_features=30)), deployed("lifetime-epsilon = 0.5\n")
    )
    assert reply.has_error() and "lifetime-epsilon 0.5" in reply.error.reason


def test_budget_shows_the_explanation_release(deployed, tmp_path):
    from typer.testing import CliRunner

    from client.cli import app as client_cli

    client_app(_explain_request(build_model("mlp", n_features=30)), deployed())
    out = CliRunner().invoke(client_cli, ["budget", "--ledger", str(tmp_path / "ledger")]).output
    assert "explanation release(s) 1: noise multiplier 4.1, ε alone = 0.985" in out
    assert "lifetime: ε = 0.985" in out


# ------------------------------------------------------------------------------------------
# the coordinator
# ------------------------------------------------------------------------------------------
def test_pooling_divides_by_the_public_counts_and_gives_the_noise_standard_error():
    releases = [
        {"hospital": "a", "n": 100, "signed": [10.0, -20.0], "absolute": [30.0, 40.0],
         "noise_multiplier": 3.0, "clip": 1.0, "epsilon_release": 1.5, "epsilon": 2.0},
        {"hospital": "b", "n": 300, "signed": [30.0, 0.0], "absolute": [50.0, 0.0],
         "noise_multiplier": 4.0, "clip": 1.0, "epsilon_release": 1.0, "epsilon": None},
    ]  # fmt: skip
    block = aggregate_explanations(releases, [{"hospital": "c", "reason": "no"}], ["age", "bp"])
    assert block["mean_abs"] == pytest.approx([0.2, 0.1])
    assert block["mean_signed"] == pytest.approx([0.1, -0.05])
    assert block["standard_error"] == pytest.approx([5.0 / 400] * 2)
    assert block["ranking"] == [0, 1] and block["n"] == 400
    text = "\n".join(explanation_lines(block, "importance.png", "disease"))
    assert (
        "1. **age**" in text
        and "c refused" in text
        and "| a | 100 | 3 | 1 | 1.500 | 2.000 |" in text
    )
    with pytest.raises(ValueError, match="released 3 attributions; the task has 2"):
        aggregate_explanations([{**releases[0], "signed": [1.0] * 3}], [], ["age", "bp"])


# ------------------------------------------------------------------------------------------
# end to end: `fedcare simulate` through Flower's Simulation Engine
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_simulation_releases_explanations_after_the_last_round(tmp_path):
    """Two simulated hospitals, two rounds: each releases once (its ledger's own entry, in the
    run's ε the summary shows), and report.md / model.md carry the chart and the top features."""
    import json
    import subprocess
    import sys

    from client.ledger import Ledger

    out, ledgers = tmp_path / "run", tmp_path / "ledgers"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--hospitals", "2", "--rounds", "2",
         "--out", str(out), "--ledger-dir", str(ledgers), "--run-config", "explain.enabled=true"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    block = summary["explanations"]
    assert [h["hospital"] for h in block["hospitals"]] == ["hospital-1", "hospital-2"]
    assert block["refused"] == [] and len(block["mean_abs"]) == 30
    assert block["features"][:2] == ["mean radius", "mean texture"]
    for h in summary["hospitals"]:
        record = Ledger(ledgers / h["name"]).records()[0]
        assert record.explanations == [4.1]
        assert h["epsilon"] == pytest.approx(record.epsilon())  # the release is in the run's ε
    assert "includes that release" in summary["dp"]["guarantee"]
    assert (out / "importance.png").stat().st_size > 1000
    for name in ("report.md", "model.md"):
        text = (out / name).read_text()
        assert "## Explanations (released under DP)" in text
        assert "![Feature importance](importance.png)" in text and "1. **" in text


# ------------------------------------------------------------------------------------------
# chest X-rays: class-conditional mean saliency maps
# ------------------------------------------------------------------------------------------
def test_saliency_cells_keep_completeness_and_the_image_is_channel_zero():
    from shared_models.attributions import saliency_cells, spatial_saliency

    assert [saliency_cells(s, 7) for s in (28, 64, 128, 224)] == [7, 8, 8, 7]
    x = np.random.default_rng(3).uniform(-1, 1, size=(3, 81, 7, 7)).astype(np.float32)
    model = build_model("scatter-linear", input_shape=(81, 7, 7), seed=0)
    saliency, image = spatial_saliency(model, x, grid=7)  # exact: w * GN(x)
    assert saliency.shape == image.shape == (3, 7, 7)
    with torch.no_grad():
        gap = model(torch.from_numpy(x)) - model.head.bias
    assert np.allclose(saliency.sum(axis=(1, 2)), gap.numpy(), atol=1e-4)
    cnn = build_model("cnn", input_shape=(1, 28, 28), seed=0)  # Integrated Gradients
    pixels = x[:, :1].repeat(4, axis=2).repeat(4, axis=3)  # [3, 1, 28, 28]
    saliency, image = spatial_saliency(cnn, pixels, grid=7, steps=64)
    with torch.no_grad():
        gap = cnn(torch.from_numpy(pixels)) - cnn(torch.zeros(1, 1, 28, 28))
    assert np.allclose(saliency.sum(axis=(1, 2)), gap.numpy(), atol=0.02)
    assert np.allclose(image, x[:, 0])


def test_saliency_release_noises_every_class_sum_and_count_at_sigma_sqrt3():
    """Zero maps and images: the released sums are the noise alone, std σ·√3 × the bound
    (saliency: C, image: the image bound, counts: 1); one patient's class gets its count."""
    from client.explanations import release_saliency

    n, g = 40, 30
    y = np.array([0] * 10 + [1] * 30)
    zeros = np.zeros((n, g, g))
    out = release_saliency(zeros, zeros, y, clip=0.5, image_clip=2.0, noise_multiplier=2.0)
    sal = np.array(out["saliency-0"] + out["saliency-1"])
    img = np.array(out["image-0"] + out["image-1"])
    assert sal.std() == pytest.approx(2.0 * np.sqrt(3) * 0.5, rel=0.08)
    assert img.std() == pytest.approx(2.0 * np.sqrt(3) * 2.0, rel=0.08)
    # counts: 10 and 30 plus noise of std 2√3 (a wide band: one draw each)
    assert abs(out["count-0"][0] - 10) < 6 * 2 * np.sqrt(3)
    assert abs(out["count-1"][0] - 30) < 6 * 2 * np.sqrt(3)


def test_saliency_pooling_and_chart(tmp_path):
    from server.explanations import aggregate_saliency, explanation_lines, plot_saliency

    def release(hospital: str, count0: float, count1: float) -> dict:
        return {"hospital": hospital, "n": 10, "saliency-0": [1.0] * 4, "image-0": [2.0] * 4,
                "count-0": [count0], "saliency-1": [3.0] * 4, "image-1": [-1.0] * 4,
                "count-1": [count1], "noise_multiplier": 2.0, "clip": 1.0, "image_clip": 2.0,
                "epsilon_release": 1.0, "epsilon": 1.5}  # fmt: skip

    block = aggregate_saliency([release("a", 4.0, 6.0), release("b", 4.0, 2.0)], [])
    assert block["grid"] == 2
    normal, pneumonia = block["classes"]
    assert normal["mean_saliency"] == pytest.approx([0.25] * 4)
    assert pneumonia["mean_image"] == pytest.approx([-0.25] * 4)
    assert normal["saliency_se"] == pytest.approx(np.sqrt(2) * np.sqrt(3) * 2.0 / 8)
    assert plot_saliency(tmp_path / "s.png", block, ("normal", "pneumonia"))
    text = "\n".join(explanation_lines(block, "", "pneumonia"))
    assert "![Class-conditional mean saliency](saliency.png)" in text and "| a | 10 |" in text
