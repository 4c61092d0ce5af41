"""``fedcare evaluate``: external validation of a saved federated model at one hospital, offline.

Loads the final model of a run (``model.safetensors`` and its model card ``model.json``), reads
the hospital's data with the task's own hospital loader (as ``fedcare client check`` does), scores
every record (external validation: no train/test split) and writes ``report.md``,
``evaluation.json`` and four figures into the output folder. Nothing leaves the machine. The
metrics are those of :mod:`shared_models.validation`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from server.model_card import SavedModel, locate_model
from shared_models.files import write_json_atomic
from simulations.harness import UsageError

EVALUATION_DIR = "evaluation"
FIGURES = {
    "roc": "roc.png",
    "pr": "pr.png",
    "calibration": "calibration.png",
    "decision_curve": "decision-curve.png",
}
RECALIBRATION_FIGURE = "recalibration.png"
SENSITIVITY_TARGET = 0.8


def default_out(model: Path) -> Path:
    """``<run>/evaluation/`` for a run folder, ``evaluation/`` next to a model file."""
    return (model if model.is_dir() else model.parent) / EVALUATION_DIR


def load_model(saved: SavedModel) -> Any:
    """The card's model (``shared_models.models.build_model``) with the saved weights.

    Raises
    ------
    UsageError
        The card names an unknown task, preprocessing or model, or the weights do not fit it.
    """
    from server.checkpoint import load_weights
    from shared_models.models import build_model
    from shared_models.tasks import get_task

    info = saved.card["model"]
    try:
        task = get_task(saved.task)
        preprocessing = task.resolve_preprocessing(saved.card["preprocessing"])
        shape = tuple(task.input_shape(preprocessing))
        if tuple(info["input_shape"]) != shape:
            raise ValueError(
                f"the card's input shape {info['input_shape']} is not the task's {list(shape)}"
            )
        model = build_model(info["name"], input_shape=shape, hidden=int(info["hidden"]))
        model.load_state_dict(load_weights(saved.weights))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"{saved.weights}: cannot load the model of its card: {exc}") from None
    return model


def load_records(
    task_name: str, preprocessing: str, data: Path, *, frame: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every record of the hospital's data, preprocessed as in training: ``(x [N, *input_shape]
    float32, y [N])``. Read with the task's hospital loader (``Task.read_file``, as ``fedcare
    client check``; ``frame``: its result when already read), missing values imputed and
    features scaled with the task's fixed constants
    (:func:`shared_models.tasks.base.impute_and_scale`).

    Raises
    ------
    shared_models.errors.DataError
        The loader rejects the data, a preprocessed value is not finite, or the data have one
        class only.
    """
    from shared_models.errors import DataError
    from shared_models.tasks import get_task

    task = get_task(task_name)
    frame = task.read_file(data) if frame is None else frame  # DataError names file and line
    x, y = _preprocess(task, task.resolve_preprocessing(preprocessing), frame, data)
    if len(np.unique(y)) < 2:
        raise DataError(
            f"{data}: all {len(y)} records have label {int(y[0]) if len(y) else '-'}; external "
            "validation needs patients of both classes"
        )
    return x, y


def _preprocess(task: Any, resolved: str, frame: Any, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, *input_shape] float32, y [N] int)`` of a raw frame: the task's features, imputed
    and scaled as in training. Raises ``DataError`` (naming ``data``) for a non-finite input."""
    from shared_models.errors import DataError
    from shared_models.tasks.base import impute_and_scale

    x, y = task.features(frame, resolved)
    x = impute_and_scale(x, task.scaling(resolved))
    y = np.asarray(y).astype(int)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"{data}: {int(bad.sum())} record(s) have a non-finite value after preprocessing; run "
            f"`fedcare client check --task {task.name} --data {data}`"
        )
    return x, y


# A subgroup with fewer patients of either class gets no AUROC: its confidence interval would
# span most of [0.5, 1] (with 10 events DeLong's half-width is typically about 0.15-0.2).
MIN_SUBGROUP_CLASS = 10


def subgroup_results(
    net: Any, task: Any, preprocessing: str, frame: Any, data: Path
) -> dict[str, list[dict[str, Any]]]:
    """Per declared subgroup (``Task.subgroups``, e.g. sex and age bands) and group: ``n``,
    ``positives``, ``prevalence`` and AUROC with DeLong's 95 % CI
    (:func:`shared_models.validation.delong_ci`).

    Each group's rows of the raw ``frame`` are preprocessed and scored like the whole data
    (rows the task drops are dropped here too, so the groups' ``n`` add up to the evaluation's).
    A group with fewer than :data:`MIN_SUBGROUP_CLASS` patients of either class has
    ``auroc: None`` and a ``note`` saying it is too small.

    Parameters
    ----------
    net : torch.nn.Module
        The loaded model.
    task : Task
        The model's task (its ``subgroups``, ``features`` and scaling).
    preprocessing : str
        The model card's preprocessing.
    frame : pd.DataFrame
        The hospital's raw records as ``task.read_file(data)`` returned them.
    data : Path
        Where they came from (for messages).

    Returns
    -------
    dict
        ``{subgroup name: [{"group", "n", "positives", "prevalence", "auroc", "note"?}, ...]}``.

    Raises
    ------
    shared_models.errors.DataError
        The data lack a subgroup's column, or a group's records are not finite after
        preprocessing.
    """
    from shared_models import validation as v
    from shared_models.models import predict_proba

    resolved = task.resolve_preprocessing(preprocessing)
    out: dict[str, list[dict[str, Any]]] = {}
    for subgroup in task.subgroups:
        rows = []
        for group, mask in subgroup.masks(frame).items():
            part = frame[mask].reset_index(drop=True)
            y = np.zeros(0, dtype=int)
            if len(part):
                x, y = _preprocess(task, resolved, part, data)
            n, k = len(y), int(y.sum())
            entry: dict[str, Any] = {
                "group": group, "n": n, "positives": k, "prevalence": k / n if n else None,
                "auroc": None,
            }  # fmt: skip
            if min(k, n - k) < MIN_SUBGROUP_CLASS:
                entry["note"] = (
                    f"too small for an AUROC: {k} positive and {n - k} negative patient(s); at "
                    f"least {MIN_SUBGROUP_CLASS} of each needed"
                )
            else:
                entry["auroc"] = v.delong_ci(y, predict_proba(net, x)).as_dict()
            rows.append(entry)
        out[subgroup.name] = rows
    return out


def evaluate_scores(
    y: np.ndarray,
    p: np.ndarray,
    *,
    training_prevalence: float | None = None,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Every figure of the evaluation from labels ``y [N]`` and probabilities ``p [N]``.

    Discrimination (AUROC with DeLong's CI and with a bootstrap CI, AUPRC with a bootstrap CI),
    the two operating points (0.5 and the
    threshold reaching sensitivity 0.8, as :func:`shared_models.metrics.operating_point_metrics`
    picks it), calibration and the decision curve (:mod:`shared_models.validation`); with
    ``recalibrate``, a hospital-local logistic recalibration
    (:func:`shared_models.validation.recalibration`), recorded and never applied to the model.
    """
    from shared_models import validation as v
    from shared_models.metrics import operating_point_metrics

    points, _ = operating_point_metrics(y, p, min_sensitivity=SENSITIVITY_TARGET)
    prevalence = float(np.mean(y))
    return {
        "n": int(len(y)),
        "positives": int(np.sum(y)),
        "prevalence": prevalence,
        "training_prevalence": training_prevalence,
        "prevalence_warning": v.prevalence_shift(prevalence, training_prevalence),
        "prevalence_note": (
            None if training_prevalence is not None else "training prevalence not recorded"
        ),
        "discrimination": {
            "auroc": v.bootstrap_ci(y, p, "auroc").as_dict(),
            "auroc_delong": v.delong_ci(y, p).as_dict(),
            "auprc": v.bootstrap_ci(y, p, "auprc").as_dict(),
            "bootstrap": v.bootstrap_description(),
            "delong": v.delong_description(),
        },
        "operating_points": {
            "threshold_0.5": v.threshold_metrics(y, p, 0.5),
            "sensitivity_0.8": v.threshold_metrics(
                y, p, v.sensitivity_threshold(y, p, SENSITIVITY_TARGET)
            ),
        },
        "operating_point_metrics": points,
        "calibration": v.calibration(y, p),
        "decision_curve": v.decision_curve(y, p),
        "recalibration": (
            {**v.recalibration(y, p), "applied_to_model": False} if recalibrate else None
        ),
    }


def training_prevalence(card: dict[str, Any]) -> float | None:
    """The training prevalence the model card records (``training_data.prevalence``, exact in
    simulation, from released histograms in a deployment), or None."""
    value = (card.get("training_data") or {}).get("prevalence")
    return float(value) if isinstance(value, int | float) else None


def shift_check(card: dict[str, Any], task: Any, x: np.ndarray) -> dict[str, Any]:
    """This hospital's model inputs ``x [N, ...]`` against the model card's training profile:
    ``{"provenance", "feature_warnings": [...], "note"?}`` (see
    :func:`shared_models.validation.feature_shift`). No check where the card has no feature
    profile (a deployment releases none) or the inputs are not one vector per record."""
    from shared_models.validation import feature_shift

    data = card.get("training_data") or {}
    out: dict[str, Any] = {
        "provenance": data.get("provenance", "not recorded in the model card"),
        "feature_warnings": [],
    }
    if not data.get("features"):
        why = data.get("features_note") or "the model card records no feature distributions"
        out["note"] = f"feature shift not checked: {why}"
    elif x.ndim != 2:
        out["note"] = "feature shift not checked: the inputs are not one vector per record"
    else:
        resolved = task.resolve_preprocessing(card["preprocessing"])
        out["feature_warnings"] = feature_shift(
            data["features"], x, task.input_names(resolved), scaling=task.scaling(resolved)
        )
    return out


def simulation_training_data(task_name: str, preprocessing: str, hospitals: Any) -> dict[str, Any]:
    """``model.json`` ``training_data`` for ``fedcare simulate``: exact figures of the simulated
    hospitals' training splits (the researcher holds all the data in a simulation, so nothing
    here was released by anyone; marked ``exact``).

    Parameters
    ----------
    task_name, preprocessing : str
        The run's task and resolved preprocessing.
    hospitals : Sequence[HospitalData]
        The hospitals that trained (a held-out hospital is not among them): ``x_train``
        ``[n, ...]`` model inputs after the task's fixed imputation and scaling, ``y_train``.

    Returns
    -------
    dict
        ``provenance``, ``exact`` (True), ``prevalence`` (pooled over the training splits),
        ``hospitals`` (``{name: {"n_train", "prevalence"}}``) and ``features``
        (:func:`shared_models.validation.feature_profile` of the pooled training inputs; None for
        inputs that are not one vector per record, e.g. time series and images).
    """
    from shared_models.tasks import get_task
    from shared_models.validation import feature_profile

    y = np.concatenate([np.asarray(s.y_train, dtype=float) for s in hospitals])
    features = None
    if all(np.ndim(s.x_train) == 2 for s in hospitals):
        x = np.concatenate([s.x_train for s in hospitals])
        task = get_task(task_name)
        features = feature_profile(x, task.input_names(task.resolve_preprocessing(preprocessing)))
    return {
        "provenance": "exact: fedcare simulate holds every simulated hospital's records (a "
        "deployment records only what the hospitals released)",
        "exact": True,
        "prevalence": float(y.mean()) if len(y) else None,
        "hospitals": {
            s.name: {"n_train": int(s.n_train), "prevalence": float(np.mean(s.y_train))}
            for s in hospitals
            if s.n_train
        },
        "features": features,
        "feature_units": "model inputs after the task's fixed imputation and scaling",
        **(
            {}
            if features is not None
            else {"features_note": "the task's inputs are not one vector per record"}
        ),
    }


def run_evaluation(
    *,
    model: Path,
    data: Path,
    task: str | None = None,
    out: Path | None = None,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """``fedcare evaluate``: check, load, score, and write the output folder; returns the
    content of ``evaluation.json``. With ``recalibrate`` the hospital-local recalibration is fitted
    and recorded (``evaluation.json`` ``recalibration``, the report, ``recalibration.png``); the
    model file is only read.

    Raises
    ------
    UsageError
        No model or card at ``model``, ``task`` given and not the model's, or ``out`` exists
        and is not empty (nothing is written then).
    shared_models.errors.DataError
        The task's loader rejects ``data``.
    """
    saved = locate_model(model)
    if task is not None and task != saved.task:
        raise UsageError(
            f"--task {task}: the model at {model} was trained for task {saved.task} (its model "
            f"card {saved.weights.with_suffix('.json').name}); evaluate it on {saved.task} data "
            "or leave --task out"
        )
    out = out if out is not None else default_out(model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: output folder exists and is not empty; choose another --out")
    if not data.exists():
        raise UsageError(f"--data {data} does not exist")
    net = load_model(saved)
    from shared_models.models import predict_proba
    from shared_models.tasks import get_task

    task_def = get_task(saved.task)
    frame = task_def.read_file(data)  # raises DataError naming file, line and column
    x, y = load_records(saved.task, saved.card["preprocessing"], data, frame=frame)

    p = predict_proba(net, x)
    result = {
        "model": str(saved.weights),
        "task": saved.task,
        "preprocessing": saved.card["preprocessing"],
        "data": str(data),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **evaluate_scores(
            y, p, training_prevalence=training_prevalence(saved.card), recalibrate=recalibrate
        ),
    }
    result["shift"] = shift_check(saved.card, task_def, x)
    result["subgroups"] = subgroup_results(net, task_def, saved.card["preprocessing"], frame, data)
    result["positive_class"] = task_def.positive_class_for(str(data))
    result["attributions"] = local_attributions(net, x, saved)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = write_figures(out, y, p, result)
    if result["attributions"] is not None:
        from server.explanations import IMPORTANCE_CHART, plot_importance

        title = "Feature importance at this hospital (non-private, stays here)"
        if plot_importance(out / IMPORTANCE_CHART, result["attributions"], title=title):
            result["figures"].append(IMPORTANCE_CHART)
    write_json_atomic(out / "evaluation.json", result, indent=1)
    (out / "report.md").write_text(report_markdown(result, saved.card))
    return result


def local_attributions(net: Any, x: np.ndarray, saved: SavedModel) -> dict[str, Any] | None:
    """The hospital's own, non-private feature attributions of the model (exact ``w_j x_j`` for
    logistic regression, Integrated Gradients otherwise: :mod:`shared_models.attributions`),
    pooled over every record: mean |attribution| and signed mean per feature. They never leave
    the machine; the federation sees only the DP release (``explain.enabled``). None for a
    task without per-feature explanations (images)."""
    from shared_models.attributions import feature_attributions, importance, resolve_method
    from shared_models.tasks import get_task

    task = get_task(saved.task)
    if task.attribution_axis is None:
        return None
    per_example = feature_attributions(net, x, axis=task.attribution_axis)
    mean_abs, mean_signed = importance(per_example)
    return {
        "method": resolve_method("auto", net),
        "features": list(task.explained_features(saved.card["preprocessing"])),
        "mean_abs": mean_abs.tolist(),
        "mean_signed": mean_signed.tolist(),
        "standard_error": [0.0] * len(mean_abs),  # no noise: nothing is released
        "ranking": [int(i) for i in np.argsort(-mean_abs, kind="stable")],
        "n": len(x),
    }


def _attribution_lines(block: dict[str, Any] | None, positive_class: str) -> list[str]:
    """The report's section on the hospital's own attributions (empty without them)."""
    if block is None:
        return []
    lines = [
        "## What drives the predictions here (non-private: these never leave this machine)",
        "",
        f"Mean attribution of each feature to the model's logit over all {block['n']} records "
        f"({block['method']}; reference patient: every input at the task's fixed centre), the "
        "most important first. The federation's report shows the same quantity pooled over the "
        "hospitals' DP releases.",
        "",
        "![Feature importance at this hospital](importance.png)",
        "",
        "| feature | mean \\|attribution\\| (logit) | signed mean | effect on the risk of "
        f"{positive_class} |",
        "|---|---|---|---|",
    ]
    for j in block["ranking"][:15]:
        signed = block["mean_signed"][j]
        lines.append(
            f"| {block['features'][j]} | {block['mean_abs'][j]:.3f} | {signed:+.3f} | "
            f"{'raises' if signed > 0 else 'lowers'} it on average |"
        )
    return [*lines, ""]


def write_figures(out: Path, y: np.ndarray, p: np.ndarray, result: dict[str, Any]) -> list[str]:
    """ROC, precision-recall, reliability diagram and decision curve as PNGs in ``out``
    (matplotlib, Agg backend); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    disc, cal, dca = result["discrimination"], result["calibration"], result["decision_curve"]

    def ci(d: dict[str, Any]) -> str:
        return f"{d['value']:.3f}" + (
            f" [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if d["ci_low"] is not None else ""
        )

    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"model, AUROC {ci(disc['auroc_delong'])} (DeLong)")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out / FIGURES["roc"])

    precision, recall, _ = precision_recall_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.step(recall, precision, where="post", label=f"model, AUPRC {ci(disc['auprc'])}")
    ax.axhline(result["prevalence"], ls="--", color="grey", label="prevalence (chance)")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, out / FIGURES["pr"])

    plot_reliability(out / FIGURES["calibration"], cal)
    written = list(FIGURES.values())
    if (recal := result.get("recalibration")) and recal["after"] is not None:
        plot_reliability(
            out / RECALIBRATION_FIGURE, recal["before"], after=recal["after"],
            title="Recalibration",
        )  # fmt: skip
        written.append(RECALIBRATION_FIGURE)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(dca["threshold"], dca["model"], label="model")
    ax.plot(dca["threshold"], dca["treat_all"], color="grey", label="treat all")
    ax.plot(dca["threshold"], dca["treat_none"], "--", color="black", label="treat none")
    prev = result["prevalence"]
    ax.set(xlabel="threshold probability", ylabel="net benefit", xlim=(0, 1))
    ax.set(ylim=(-0.05, max(prev, 0.01) * 1.1), title="Decision curve")
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, out / FIGURES["decision_curve"])
    return written


def plot_reliability(
    path: Path,
    cal: dict[str, Any],
    *,
    title: str = "Reliability",
    after: dict[str, Any] | None = None,
) -> None:
    """The reliability diagram of :func:`shared_models.validation.calibration`'s result ``cal``
    (observed rate against mean predicted risk per equal-width bin, the calibration slope in the
    legend) as a PNG at ``path`` (matplotlib, Agg backend). ``fedcare evaluate`` and
    ``fedcare simulate`` (pooled test splits) both draw it. ``after``: a second curve, the
    calibration after ``--recalibrate`` (cross-fitted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = cal["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    slope = "undefined" if cal["slope"] is None else f"{cal['slope']:.2f}"
    ax.plot(rel["mean_predicted"], rel["observed"], "o-", label=f"model (slope {slope})")
    if after is not None:
        rel2 = after["reliability"]
        slope2 = "undefined" if after["slope"] is None else f"{after['slope']:.2f}"
        ax.plot(
            rel2["mean_predicted"], rel2["observed"], "s-",
            label=f"recalibrated, cross-fitted (slope {slope2})",
        )  # fmt: skip
    ax.set(xlabel="mean predicted risk (bin)", ylabel="observed rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"{title} ({rel['bins']} equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(d: dict[str, Any], pct: bool = False) -> str:
    if d["value"] is None:
        return d.get("note", "undefined")
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.3f}")
    ci = f" [{f(d['ci_low'])}, {f(d['ci_high'])}]" if d["ci_low"] is not None else ""
    return f(d["value"]) + ci


def _recalibration_lines(recal: dict[str, Any] | None) -> list[str]:
    """``report.md``'s section on ``--recalibrate`` (nothing without it)."""
    if recal is None:
        return []
    lines = ["## Hospital-local recalibration (--recalibrate)", ""]
    if recal["slope"] is None:
        return [*lines, f"Not fitted: {recal.get('note', '')}.", ""]
    lines += [
        "Fitted on all of this hospital's records: "
        f"`logit p' = {recal['intercept']:.3f} + {recal['slope']:.3f} logit p` "
        f"({recal['formula']}). It is recorded here and in evaluation.json and NOT applied to "
        "the model file; a hospital that adopts it applies it to the model's output itself.",
        "",
    ]
    after = recal["after"]
    if after is None:
        return [*lines, f"{recal.get('note', '')}.", ""]

    def f(v: float | None, d: int = 3) -> str:
        return "n/a" if v is None else f"{v:.{d}f}"

    before = recal["before"]
    lines += [
        f"| measure | before | after ({recal['folds']}-fold cross-fitted) | ideal |",
        "|---|---|---|---|",
        f"| calibration-in-the-large | {before['calibration_in_the_large']:+.3f} | "
        f"{after['calibration_in_the_large']:+.3f} | 0 |",
        f"| calibration slope | {f(before['slope'], 2)} | {f(after['slope'], 2)} | 1 |",
        f"| calibration intercept | {f(before['intercept'], 2)} | {f(after['intercept'], 2)} | 0 |",
        f"| Brier score | {before['brier']:.4f} | {after['brier']:.4f} | lower |",
        f"| AUROC | - | {f(recal['auroc_after'])} | unchanged within a fold |",
        "",
        f"The after-figures are cross-fitted: each of {recal['folds']} stratified folds is "
        "recalibrated by the fit on the other folds, so they are not judged on the records they "
        "were fitted to. Recalibration fixes calibration for this hospital only; it cannot improve "
        "discrimination.",
        "",
        "![Reliability before and after recalibration](recalibration.png)",
        "",
    ]
    return lines


def _subgroup_lines(subgroups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """``report.md``'s subgroup table (nothing when the task declares no subgroups)."""
    if not subgroups:
        return []
    lines = [
        "## Subgroups",
        "",
        "| subgroup | group | n | positive | prevalence | AUROC [95 % CI, DeLong] |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in subgroups.items():
        for r in rows:
            prevalence = "n/a" if r["prevalence"] is None else f"{r['prevalence']:.1%}"
            auroc = _fmt(r["auroc"]) if r["auroc"] is not None else r["note"]
            lines.append(
                f"| {name} | {r['group']} | {r['n']} | {r['positives']} | {prevalence} | {auroc} |"
            )
    lines += [
        "",
        "Subgroups as the task declares them. A group with fewer than "
        f"{MIN_SUBGROUP_CLASS} patients of either class gets no AUROC. Differences between "
        "groups within their intervals are not evidence of a difference.",
        "",
    ]
    return lines


def report_markdown(result: dict[str, Any], card: dict[str, Any]) -> str:
    """``report.md``: the evaluation for a clinician and a reviewer, with the methods."""
    from server.report import calibration_rows

    disc, cal = result["discrimination"], result["calibration"]
    boot = disc["bootstrap"]
    dca = result["decision_curve"]
    privacy = card.get("privacy", {}).get("guarantee", "not recorded")
    lines = [
        f"# External validation: {result['task']} model",
        "",
        f"- model: `{result['model']}` ({card['model'].get('name')}, preprocessing "
        f"{result['preprocessing']}; trained with {card.get('training', {}).get('strategy', '?')}"
        f" for {card.get('training', {}).get('rounds', '?')} rounds; privacy: {privacy})",
        f"- data: `{result['data']}`, all {result['n']} records scored (no train/test split); "
        f"{result['positives']} positive ({result['positive_class']}), prevalence "
        f"{result['prevalence']:.1%}",
        f"- evaluated {result['evaluated_at']}, offline: nothing left this machine",
        "",
    ]
    if result["prevalence_warning"]:
        lines += [f"> warning: {result['prevalence_warning']}", ""]
    elif result["prevalence_note"]:
        lines += [f"Prevalence shift: {result['prevalence_note']} in the model card.", ""]
    shift = result.get("shift") or {}
    for warning in shift.get("feature_warnings", []):
        lines += [f"> warning: {warning}", ""]
    if shift:
        checked = (
            shift["note"]
            if shift.get("note")
            else f"{len(shift['feature_warnings'])} feature(s) differ strongly"
        )
        trained = result["training_prevalence"]
        lines += [
            f"Shift against the training data ({shift['provenance']}): training prevalence "
            f"{'n/a' if trained is None else format(trained, '.1%')}; {checked}."
            + (
                " A warning means the model is used outside what it saw in training: check the "
                "data (units, coding) and read calibration with care."
                if shift["feature_warnings"] or result["prevalence_warning"]
                else ""
            ),
            "",
        ]
    lines += [
        "## Discrimination",
        "",
        "| metric | value [95 % CI] | CI method |",
        "|---|---|---|",
        f"| AUROC | {_fmt(disc['auroc_delong'])} | DeLong |",
        f"| AUROC | {_fmt(disc['auroc'])} | {boot['method']} bootstrap |",
        f"| AUPRC | {_fmt(disc['auprc'])} (chance: prevalence {result['prevalence']:.3f}) | "
        f"{boot['method']} bootstrap |",
        "",
        "95 % confidence intervals. DeLong: the AUROC's asymptotic variance from its structural "
        "components (DeLong, DeLong & Clarke-Pearson 1988; Sun & Xu's fast algorithm), as R's "
        f"`pROC::ci.auc`. Bootstrap: {boot['method']}, {boot['resamples']} resamples of the "
        f"patients (paired label and score, seed {boot['seed']}), `scipy.stats.bootstrap`. The "
        "two should roughly agree; where they do not (small samples, AUROC near 1), prefer the "
        "bootstrap.",
        "",
        "![ROC](roc.png) ![Precision-recall](pr.png)",
        "",
        "## Operating points",
        "",
        "| threshold | sensitivity | specificity | PPV | NPV | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, op in result["operating_points"].items():
        cm = op["confusion_matrix"]
        label = "0.5" if name == "threshold_0.5" else f"{op['threshold']:.3f} (sensitivity >= 0.8)"
        lines.append(
            f"| {label} | {_fmt(op['sensitivity'], True)} | {_fmt(op['specificity'], True)} | "
            f"{_fmt(op['ppv'], True)} | {_fmt(op['npv'], True)} | {cm['tp']} | {cm['fp']} | "
            f"{cm['fn']} | {cm['tn']} |"
        )
    lines += [
        "",
        "A patient is predicted positive when the predicted risk is at least the threshold. The "
        "second threshold is the first ROC point whose sensitivity reaches 0.8. Proportions with "
        "95 % Wilson score intervals.",
        "",
        "## Calibration",
        "",
        "| measure | value | ideal |",
        "|---|---|---|",
        f"| mean predicted risk / observed rate | {cal['mean_predicted']:.3f} / "
        f"{cal['observed_rate']:.3f} | equal |",
        *calibration_rows(cal),
    ]
    lines += [
        "Slope and intercept of the logistic recalibration `logit P(y=1) = a + b logit(p)` "
        "(unpenalised). A slope below 1: predictions too extreme (over-confident); above 1: too "
        "moderate. Nothing is recalibrated here"
        + ("" if result.get("recalibration") else " (`--recalibrate` fits a hospital-local one)")
        + ".",
        "",
        "![Reliability diagram](calibration.png)",
        "",
        *_recalibration_lines(result.get("recalibration")),
        *_subgroup_lines(result.get("subgroups") or {}),
        "## Clinical utility (decision curve)",
        "",
        "| threshold probability | net benefit: model | treat all | treat none |",
        "|---|---|---|---|",
    ]
    for t in (0.05, 0.1, 0.2, 0.3, 0.5):
        i = dca["threshold"].index(t)
        lines.append(f"| {t:.2f} | {dca['model'][i]:.3f} | {dca['treat_all'][i]:.3f} | 0 |")
    lines += [
        "",
        "Net benefit = TP/n - FP/n x pt/(1 - pt) when treating the patients whose predicted risk "
        "is at least the threshold probability pt, against treating everyone and no one. The "
        "model is useful at thresholds where its curve lies above both.",
        "",
        "![Decision curve](decision-curve.png)",
        "",
        *_attribution_lines(result.get("attributions"), result["positive_class"]),
        "## Methods",
        "",
        "- AUROC (`sklearn.metrics.roc_auc_score`, computed as the Mann-Whitney statistic) with "
        "DeLong's confidence interval (DeLong, DeLong & Clarke-Pearson, Biometrics 1988; Sun & "
        "Xu, IEEE SPL 2014) and AUPRC (`sklearn.metrics.average_precision_score`); bias-corrected and accelerated (BCa) "
        "bootstrap confidence intervals (Efron & Tibshirani, An Introduction to the Bootstrap, "
        "1993) through `scipy.stats.bootstrap`.",
        "- Wilson score intervals for proportions (Wilson, JASA 1927), "
        "`scipy.stats.binomtest(...).proportion_ci(method='wilson')`.",
        "- Brier score (`sklearn.metrics.brier_score_loss`); reliability diagram "
        f"(`sklearn.calibration.calibration_curve`, {cal['reliability']['bins']} equal-width "
        "bins); calibration slope and intercept by logistic recalibration (Cox, Biometrika 1958), "
        "`sklearn.linear_model.LogisticRegression` without penalty on logit(p).",
        "- Decision curve analysis (Vickers & Elkin, Med Decis Making 2006;26:565-574), "
        "thresholds 0.01 to 0.99.",
        "- Reported following TRIPOD+AI (Collins et al., BMJ 2024;385:e078378).",
        "",
        f"Reproduce: `fedcare evaluate --model {result['model']} --data {result['data']}"
        + (" --recalibrate" if result.get("recalibration") else "")
        + "`",
        "",
    ]
    return "\n".join(lines)
