"""The benchmark report's pure parts (#14): the cache key, FLamby's metric, and that the
heart-disease benchmark's split is FLamby's own (no training, no Flower)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # benchmarks/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


report = _load("report")


def test_cell_key_changes_with_what_changes_the_result_and_only_with_it():
    cfg = {"task.name": "heart-disease", "train.lr": 0.5, "run.id": "a1", "output.dir": "/tmp/x",
           "data.dir": "/data/heart_disease_uci"}  # fmt: skip
    key = report.cell_key("heart-disease", "fedavg", 1.0, 0, cfg)
    assert key.startswith("heart-disease__fedavg__eps1__s0__") and key.endswith(".json")
    # a fresh run id, another output folder, the same data elsewhere: the same cell
    moved = {**cfg, "run.id": "b2", "output.dir": "/y", "data.dir": "/elsewhere/heart_disease_uci"}
    assert report.cell_key("heart-disease", "fedavg", 1.0, 0, moved) == key
    # a changed hyper-parameter or method: another cell
    assert report.cell_key("heart-disease", "fedavg", 1.0, 0, {**cfg, "train.lr": 0.1}) != key
    assert report.cell_key("heart-disease", "fedprox", 1.0, 0, cfg) != key
    assert "nodp" in report.cell_key("heart-disease", "fedavg", None, 0, cfg)


def test_flamby_metric_is_the_unweighted_mean_of_per_centre_accuracies():
    # centre A: 3 of 4 right; centre B: 1 of 2 right -> (0.75 + 0.5) / 2, not 4/6 pooled
    y = [np.array([1, 0, 1, 1]), np.array([0, 1])]
    s = [np.array([0.9, 0.2, 0.4, 0.7]), np.array([0.6, 0.8])]
    mean, per_centre = report.flamby_metric(y, s)
    assert per_centre == [0.75, 0.5]
    assert mean == pytest.approx(0.625)
    # FLamby thresholds with '>': a score of exactly 0.5 is class 0
    assert report.flamby_metric([np.array([0])], [np.array([0.5])])[0] == 1.0
    with pytest.raises(ValueError, match="centre 1"):
        report.flamby_metric(
            [np.array([1]), np.array([], dtype=int)], [np.array([0.9]), np.array([])]
        )


def test_mean_sd_uses_the_sample_standard_deviation():
    assert report.mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert report.mean_sd([0.7]) == (0.7, 0.0)


def _flamby_test_rows(path: Path) -> Counter:
    """FLamby's own split of one centre (fed_heart_disease/dataset.py, verbatim logic): drop
    columns 10-12, drop rows with '?', stratified train_test_split(0.34/0.66, seed 43)."""
    df = pd.read_csv(path, header=None).replace("?", np.nan).drop([10, 11, 12], axis=1).dropna()
    df = df.apply(pd.to_numeric)
    y = df.iloc[:, -1].where(df.iloc[:, -1] == 0, 1)
    stratify = y if y.nunique() > 1 and all((y == v).sum() > 2 for v in y.unique()) else None
    _, test = train_test_split(np.arange(len(df)), test_size=0.34, train_size=0.66,
                               random_state=43, shuffle=True, stratify=stratify)  # fmt: skip
    rows = df.iloc[np.sort(test)]
    # age, trestbps, chol, thalach, label
    return Counter(
        (int(a), int(b), int(c), int(d), int(t > 0))
        for a, b, c, d, t in rows[[0, 3, 4, 7, 13]].itertuples(index=False)
    )


def test_heart_disease_benchmark_split_is_flambys(heart_dir):
    from shared_models.hospitals import simulated_hospitals

    bench = report.TASK_BENCHES["heart-disease"]
    assert bench.overrides["data.split-seed"] == 43
    assert bench.overrides["data.split"] == "stratified"
    hospitals = simulated_hospitals(
        "heart-disease", data_dir=str(heart_dir), num_hospitals=4, scheme="iid", alpha=0.5,
        seed=43, preprocessing="flamby", test_fraction=0.0, split="stratified",
    )  # fmt: skip
    assert [(s.name, s.n_train, s.n_test) for s in hospitals] == [
        ("cleveland", 199, 104),
        ("hungarian", 172, 89),
        ("switzerland", 30, 16),
        ("va", 85, 45),
    ]  # fmt: skip  FLamby: 486 train / 254 test
    for hospital in hospitals:
        x = (
            hospital.x_test
        )  # inputs in task-file order: age, sex, trestbps, chol, fbs, thalach, ...
        ours = Counter(
            (
                round(a * 10 + 50),
                round(b * 20 + 130),
                round(c * 100 + 200),
                round(d * 25 + 140),
                int(t),
            )
            for a, b, c, d, t in zip(
                x[:, 0], x[:, 2], x[:, 3], x[:, 5], hospital.y_test, strict=True
            )
        )
        assert ours == _flamby_test_rows(heart_dir / f"processed.{hospital.name}.data"), (
            hospital.name
        )


def test_split_seed_fixes_the_split_while_the_training_seed_varies(heart_dir):
    from server.run_config import RunOptions
    from shared_models.config import RunConfig
    from shared_models.hospitals import simulated_hospitals_for

    def test_rows(seed: int, split_seed: int) -> list[np.ndarray]:
        cfg = RunOptions(task="heart-disease", data_dir=str(heart_dir), seed=seed).build()
        cfg["data.split-seed"] = split_seed
        return [s.x_test for s in simulated_hospitals_for(RunConfig.from_run_config(cfg), 4)]

    fixed = test_rows(0, 43)
    assert all(np.array_equal(a, b) for a, b in zip(fixed, test_rows(1, 43), strict=True))
    # the default (-1) splits with train.seed, as before
    assert not all(
        np.array_equal(a, b) for a, b in zip(test_rows(0, -1), test_rows(1, -1), strict=True)
    )


@pytest.mark.parametrize("name", ["logreg", "cnn"])
def test_the_batch_clipped_cells_train_as_fedcare_does_without_dp(name):
    """The report's non-private cells (cached) train with fedcare's non-private batch order and
    augmentation seed: unclipped, train_batch_clipped ends at train_round's weights exactly;
    clipped, each step moves the weights by at most lr x clip_norm."""
    import torch
    from torch.utils.data import TensorDataset

    from client.training import train_round
    from shared_models.models import build_model

    shape = (13,) if name == "logreg" else (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(40, *shape, generator=g), (torch.rand(40, generator=g) > 0.5).float()
    )
    shipped = build_model(name, input_shape=shape)
    bench, clipped = copy.deepcopy(shipped), copy.deepcopy(shipped)
    start = [p.detach().clone() for p in clipped.parameters()]
    kwargs = dict(steps=7, batch_size=16, lr=0.5, momentum=0.0, seed=3)  # 3 batches: 2 passes
    train_round(shipped, data, dp=None, **kwargs)
    report.train_batch_clipped(bench, data, clip_norm=1e9, **kwargs)
    for key, value in shipped.state_dict().items():
        assert torch.equal(bench.state_dict()[key], value), key
    report.train_batch_clipped(clipped, data, clip_norm=1e-3, **{**kwargs, "steps": 1})
    moved = torch.cat(
        [(p.detach() - s).flatten() for p, s in zip(clipped.parameters(), start, strict=True)]
    )
    assert 0 < float(moved.norm()) <= 0.5 * 1e-3 * (1 + 1e-5)


scale = _load("simulation_scale")


def test_scale_slope_is_the_least_squares_line():
    # y = 2x + 1 exactly, then one point off the line: the OLS slope of (0,1) (1,3) (2,5) (3,10)
    assert scale.slope([0, 1, 2], [1, 3, 5]) == pytest.approx((2.0, 1.0))
    b, a = scale.slope([0, 1, 2, 3], [1, 3, 5, 10])
    # by hand: mean x 1.5, mean y 4.75, Sxy = 14.5, Sxx = 5 -> b = 2.9, a = 4.75 - 4.35 = 0.4
    assert (b, a) == (pytest.approx(2.9), pytest.approx(0.4))
    with pytest.raises(ValueError, match="at least two"):
        scale.slope([1], [1])
    with pytest.raises(ValueError, match="all x are equal"):
        scale.slope([2, 2], [1, 3])


def test_scale_resampled_rows_are_real_records_drawn_with_replacement():
    rows = scale.resampled_rows(300, 19, seed=0)
    assert rows.shape == (300 * 19,)
    assert rows.min() >= 0 and rows.max() < scale.REAL_ROWS == 569
    assert len(set(rows.tolist())) < len(rows)  # with replacement: repeats
    assert (scale.resampled_rows(300, 19, seed=0) == rows).all()  # deterministic
