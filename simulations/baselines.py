"""Non-private baselines on the same simulated hospitals and test splits.

``pooled``: one model trained centrally on all hospitals' training data (the upper reference that
federated learning tries to approach). ``local``: each hospital trains alone on its own data (what
a hospital gets without joining). Both use the same model, optimizer, learning rate and number of
epochs as the federated run, without DP; when the run trains with DP-SGD, they take DP-SGD's
update without its noise (each example's gradient clipped to the run's ``dp.max-grad-norm``,
Opacus with ``noise_multiplier=0``), so that a learning rate tuned for clipped gradients does not
diverge. (Clipping the batch gradient instead left the chest X-ray local baseline at AUROC
0.56-0.57 for two seeds of three at the DP preset's lr 2; per-example clipping gives 0.93-0.94.)

Two ways of scoring the local models:

- the baseline table's ``local`` row pools the scores of each hospital's own model on its own
  test split into ONE AUROC. Under a non-IID split (``--partition dirichlet``) the hospitals'
  base rates differ, and the pooled AUROC then mostly ranks hospitals, not patients: it is no
  measure of any one model, and is kept only as the figure the older reports showed;
- :func:`auroc_on_every_test_split` follows FLamby (Ogier du Terrail et al., "FLamby: Datasets
  and Benchmarks for Cross-Silo Federated Learning in Realistic Healthcare Settings", NeurIPS
  2022 Datasets and Benchmarks): model "Local i" is trained on hospital i's training split only
  and scored on EVERY hospital's test split, one metric per test split
  (``flamby/utils.py::evaluate_model_on_tests``, called for each ``Local i`` in
  ``flamby/benchmarks/fed_benchmark.py``), and a model's figure is the mean of its per-test-split
  metrics, the pooled test set left out (``flamby/results/plot_results.py``; owkin/FLamby at
  commit edacf54). The federated and pooled models are scored the same way, so the three compare
  like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset, TensorDataset

from client.dp_modes import grad_sample_mode_for
from client.training import steps_per_round, train_round
from shared_models.config import RunConfig
from shared_models.metrics import binary_metrics, operating_point_metrics
from shared_models.models import model_for_run, predict_proba
from shared_models.tasks import HospitalData


def _fit(run: RunConfig, data: Dataset, device: str):  # -> nn.Module
    model, _ = model_for_run(run)
    epochs = run.train.rounds * run.train.local_epochs
    train_round(
        model, data,
        steps=steps_per_round(len(data), run.train.batch_size, epochs),
        batch_size=run.train.batch_size, lr=run.train.lr, momentum=run.train.momentum,
        dp=None, seed=run.train.seed, device=device,
        clip_per_sample=run.dp.max_grad_norm if run.dp.sample_level else None,
        grad_sample_mode=grad_sample_mode_for(model, run.dp.grad_sample_mode),
    )  # fmt: skip
    return model


def pooled_train_set(hospitals: tuple[HospitalData, ...]) -> Dataset:
    """All hospitals' training data as one ``TensorDataset`` (moved to a device in one piece)."""
    return TensorDataset(
        torch.from_numpy(np.concatenate([s.x_train for s in hospitals])),
        torch.from_numpy(np.concatenate([s.y_train for s in hospitals])),
    )


@dataclass(frozen=True)
class Baselines:
    """What :func:`compute_baselines` returns.

    Attributes
    ----------
    table : dict
        ``summary.json`` ``baselines``: one row per baseline (``pooled ...``, ``local ...``) with
        AUROC, accuracy, AUPRC and the operating point on the pooled test splits.
    pooled_scores : list[np.ndarray]
        The pooled model's ``[n_test_j]`` probabilities of class 1 on each hospital j's test split.
    local_scores : list[list[np.ndarray]]
        ``local_scores[i][j]``: model "Local i" (trained on hospital i alone) on hospital j's test
        split, ``[n_test_j]`` probabilities of class 1.
    local_external : list[np.ndarray] or None
        ``local_external[i]``: Local i on the ``external`` records of :func:`compute_baselines`
        (a held-out hospital's), ``[n_external]``; None when none were given.
    """

    table: dict[str, dict[str, Any]]
    pooled_scores: list[np.ndarray]
    local_scores: list[list[np.ndarray]]
    local_external: list[np.ndarray] | None = None


def compute_baselines(
    run: RunConfig,
    hospitals: tuple[HospitalData, ...],
    *,
    device: str = "cpu",
    external: np.ndarray | None = None,
) -> Baselines:
    """Train the pooled and the local non-private baselines and score them on every test split.

    The table's figures: AUROC, accuracy, AUPRC and the operating point at sensitivity 0.8 on the
    pooled test splits, and the unweighted mean of per-hospital test accuracies (the local row:
    each hospital's own model on its own test split, scores pooled). The scores of every model on
    every hospital's test split feed :func:`auroc_on_every_test_split` (FLamby's local baseline).

    Parameters
    ----------
    run : RunConfig
        The run's settings (model, optimizer, lr, rounds x local epochs of training).
    hospitals : tuple[HospitalData, ...]
        The simulated hospitals, in the federation's order.
    device : str
        Where the baselines train (``"cpu"``, ``"cuda"``).
    external : np.ndarray, optional
        ``[n_external, ...]`` records of a hospital that took no part (``--hold-out``): each
        local model is scored on them too (``Baselines.local_external``, for the cross-site
        matrix).
    """
    y_test = np.concatenate([s.y_test for s in hospitals])

    x_test = np.concatenate([s.x_test for s in hospitals])
    ends = np.cumsum([s.n_test for s in hospitals])[:-1]

    def on_every_split(model) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
        # one pass over all test splits (not N models x N splits calls), then cut per hospital
        return np.split(predict_proba(model, x_test, device=device), ends)

    pooled_scores = on_every_split(_fit(run, pooled_train_set(hospitals), device))
    overall = binary_metrics(y_test, np.concatenate(pooled_scores))
    per_hospital = [
        binary_metrics(s.y_test, p).accuracy for s, p in zip(hospitals, pooled_scores, strict=True)
    ]
    table = {
        "pooled (centralised, non-private)": {
            "auroc": overall.auroc,
            "accuracy": overall.accuracy,
            "mean_client_accuracy": float(np.mean([a for a in per_hospital if a is not None])),
            "privacy": "none",
            **operating_point_metrics(y_test, np.concatenate(pooled_scores))[0],
        }
    }
    local_models = [_fit(run, s.train_set(), device) for s in hospitals]
    local_scores = [on_every_split(m) for m in local_models]
    local_external = (
        None
        if external is None
        else [predict_proba(m, external, device=device) for m in local_models]
    )
    own = [local_scores[i][i] for i in range(len(hospitals))]  # Local i on hospital i's test split
    local_acc = [binary_metrics(s.y_test, p).accuracy for s, p in zip(hospitals, own, strict=True)]
    local = binary_metrics(y_test, np.concatenate(own))
    table[LOCAL_POOLED] = {
        "auroc": local.auroc,
        "accuracy": local.accuracy,
        "mean_client_accuracy": float(np.mean([a for a in local_acc if a is not None])),
        "privacy": "none",
        "auroc_method": "computed once over the pooled scores of each hospital's own model on "
        "its own test split: under a non-IID split the models' different base rates make it no "
        "measure of any one model (FLamby's local baseline: summary.json test_split_auroc, "
        "report.md's next section)",
        **operating_point_metrics(y_test, np.concatenate(own))[0],
    }
    return Baselines(
        table=table, pooled_scores=pooled_scores, local_scores=local_scores,
        local_external=local_external,
    )  # fmt: skip


LOCAL_POOLED = "local (each hospital alone, non-private)"

FLAMBY_METHOD = (
    "FLamby (Ogier du Terrail et al., NeurIPS 2022): each model scored on each hospital's test "
    "split (scikit-learn roc_auc_score), then the unweighted mean over the test splits where "
    "AUROC is defined; Local i = trained on hospital i's training split only, non-private"
)

# Above this many hospitals the N x N matrix is not computed: N^2 scikit-learn AUROCs at 1-5 ms
# each (this 2-core VM) would add minutes to a 300-hospital load test. FLamby has 2-6 centres.
MAX_MATRIX_HOSPITALS = 50


def auroc_on_every_test_split(
    hospitals: Sequence[HospitalData],
    *,
    federated: Sequence[np.ndarray] | None,
    baselines: Baselines,
) -> dict[str, Any]:
    """FLamby's comparison: the federated, pooled and local models, each scored on every test split.

    Method: FLamby's benchmark (owkin/FLamby ``flamby/utils.py::evaluate_model_on_tests``, one
    metric per client test set; each "Local i" evaluated on all test sets in
    ``flamby/benchmarks/fed_benchmark.py``; a method's figure is the mean over the client test
    sets, the pooled test set left out, ``flamby/results/plot_results.py``). A test split with one
    class has no AUROC: it is listed in ``undefined`` with the reason, never imputed, and every
    average is over the ``n_splits`` other splits.

    Parameters
    ----------
    hospitals : Sequence[HospitalData]
        The hospitals; their ``y_test`` ``[n_test_j]`` labels in {0, 1} and names.
    federated : Sequence[np.ndarray] or None
        The final federated model's ``[n_test_j]`` probabilities of class 1 on each test split
        (None: not available, e.g. no final model).
    baselines : Baselines
        The pooled and local models' scores on every test split (:func:`compute_baselines`).

    Returns
    -------
    dict
        Above :data:`MAX_MATRIX_HOSPITALS` hospitals only ``{"skipped": reason}``. Else ``method``; ``test_splits`` (hospital names); ``undefined`` (hospital -> why its AUROC
        is undefined); ``n_splits`` (test splits with an AUROC); ``federated`` and ``pooled``:
        ``{"per_test_split": {hospital: AUROC or None}, "average": float or None}``; ``local``:
        one such dict per hospital i with ``model`` ("Local <hospital i>"), ``trained_on`` and
        ``own`` (AUROC on hospital i's own test split); ``local_mean`` (mean of the local models'
        averages) and ``local_best`` (``{"model", "average"}`` of the best local model).
    """
    if len(hospitals) > MAX_MATRIX_HOSPITALS:
        return {
            "skipped": f"not computed for {len(hospitals)} hospitals (at most {MAX_MATRIX_HOSPITALS}: "
            "the matrix takes N x N AUROCs)"
        }
    names = [s.name for s in hospitals]
    undefined = {
        s.name: reason
        for s in hospitals
        if (reason := binary_metrics(s.y_test, np.zeros(len(s.y_test))).undefined.get("auroc"))
    }

    def scored(scores: Sequence[np.ndarray]) -> dict[str, Any]:
        per = {
            s.name: None if s.name in undefined else float(roc_auc_score(s.y_test, p))
            for s, p in zip(hospitals, scores, strict=True)
        }
        defined = [a for a in per.values() if a is not None]
        return {"per_test_split": per, "average": float(np.mean(defined)) if defined else None}

    local = [
        {"model": f"Local {s.name}", "trained_on": s.name, **scored(scores)}
        for s, scores in zip(hospitals, baselines.local_scores, strict=True)
    ]
    for entry in local:
        entry["own"] = entry["per_test_split"][entry["trained_on"]]
    averages = [(e["average"], e["model"]) for e in local if e["average"] is not None]
    best = max(averages, default=None)
    return {
        "method": FLAMBY_METHOD,
        "test_splits": names,
        "undefined": undefined,
        "n_splits": len(names) - len(undefined),
        "federated": scored(federated) if federated is not None else None,
        "pooled": scored(baselines.pooled_scores),
        "local": local,
        "local_mean": float(np.mean([a for a, _ in averages])) if averages else None,
        "local_best": {"model": best[1], "average": best[0]} if best else None,
    }


CROSS_SITE_METHOD = (
    "NVFlare's cross-site validation (nvflare.app_common.workflows.cross_site_model_eval): "
    "every model evaluated on every hospital's test split; here the global model is the final "
    "federated model and each local model is FLamby's Local i (trained on hospital i's "
    "training split alone, non-private). AUROC with DeLong's 95 % CI, accuracy at threshold 0.5"
)


def cross_site_matrix(
    hospitals: Sequence[HospitalData],
    *,
    federated: Sequence[np.ndarray] | None,
    baselines: Baselines,
    held_out: tuple[str, np.ndarray, np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """The cross-site matrix (``fedcare simulate --cross-site``): the global model and each local
    model, each scored on each hospital's test split.

    Parameters
    ----------
    hospitals : Sequence[HospitalData]
        The hospitals; their test splits ``y_test [n_test_j]``.
    federated : Sequence[np.ndarray] or None
        The final federated model's ``[n_test_j]`` probabilities on each test split (None: no
        final model; its row is left out).
    baselines : Baselines
        ``local_scores[i][j]``: Local i on hospital j's test split (:func:`compute_baselines`);
        with ``held_out``, ``local_external[i]``: Local i on the held-out hospital's records.
    held_out : (name, y, federated scores), optional
        ``--hold-out``: the held-out hospital's name, ``[n]`` labels of all its records and the
        final federated model's ``[n]`` scores on them (None: no final model). It becomes the
        last column, marked ``held_out``.

    Returns
    -------
    dict
        ``method``; ``test_splits`` (``[{"hospital", "n", "positives", "held_out"?}]``; the
        held-out hospital's column has all its records); ``rows``: one per
        model, ``{"model", "trained_on", "cells": {hospital: {"auroc": {"value", "ci_low",
        "ci_high", "note"?}, "accuracy"}}}``, the global model first. Above
        :data:`MAX_MATRIX_HOSPITALS` hospitals only ``{"skipped": reason}``.
    """
    from shared_models.validation import delong_ci

    if len(hospitals) > MAX_MATRIX_HOSPITALS:
        return {
            "skipped": f"not computed for {len(hospitals)} hospitals (at most {MAX_MATRIX_HOSPITALS})"
        }

    columns = [(s.name, np.asarray(s.y_test).astype(int)) for s in hospitals]
    if held_out is not None:
        columns.append((held_out[0], np.asarray(held_out[1]).astype(int)))

    def cells(scores: Sequence[np.ndarray | None]) -> dict[str, dict[str, Any]]:
        out = {}
        for (name, y), p in zip(columns, scores, strict=True):
            if p is None:
                continue
            p = np.asarray(p, dtype=float)
            out[name] = {
                "auroc": delong_ci(y, p).as_dict(),
                "accuracy": float(np.mean((p >= 0.5) == y)) if len(y) else None,
            }
        return out

    extra = held_out is not None
    rows = []
    if federated is not None:
        scores = [*federated, *([held_out[2]] if held_out is not None else [])]
        rows.append({"model": "global (federated)", "trained_on": "all", "cells": cells(scores)})
    external = baselines.local_external if extra else None
    for i, (s, scores) in enumerate(zip(hospitals, baselines.local_scores, strict=True)):
        row = [*scores, *([external[i] if external is not None else None] if extra else [])]
        rows.append({"model": f"local {s.name}", "trained_on": s.name, "cells": cells(row)})
    splits: list[dict[str, Any]] = [
        {"hospital": name, "n": len(y), "positives": int(y.sum())} for name, y in columns
    ]
    if extra:
        splits[-1]["held_out"] = True
    return {"method": CROSS_SITE_METHOD, "test_splits": splits, "rows": rows}
