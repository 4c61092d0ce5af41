"""Run reports: ``summary.json``, ``metrics.csv``, ``report.md`` and ``curves.png``.

All four are rendered from the :class:`~server.history.RunHistory` and the run settings; the
summary's ``overall`` block is the pooled test evaluation when the run had one (simulation),
otherwise test-size-weighted means of the hospitals' metrics (which equals pooled accuracy).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from shared_models.config import RunConfig
from shared_models.metrics import ALL_METRIC_NAMES as METRIC_NAMES
from shared_models.protocol import PERSONAL_PREFIX
from shared_models.recipes import RUN_CONFIG, Sources, settings_table

from .checkpoint import write_json_atomic
from .history import RunHistory


def build_summary(run: RunConfig, history: RunHistory, *, wall_seconds: float) -> dict[str, Any]:
    """The ``summary.json`` document (final-round test metrics, per-hospital epsilon and delta)."""
    trained = history.latest("train")
    evaluated = history.latest("evaluate")
    nodes = set(history.hospitals) | set(history.registered)
    names = sorted(set(trained) | set(evaluated) | {history.hospital_name(n) for n in nodes})
    registered, mismatches = set(history.registered.values()), history.name_mismatches()
    hospitals: list[dict[str, Any]] = []
    for name in names:
        tr = trained.get(name)
        ev = evaluated.get(name)
        privacy = _latest_privacy(history, name) if run.dp.sample_level else {}
        hospitals.append(
            {
                "name": name,
                "n_train": _int(tr.metrics.get("num-examples")) if tr else None,
                "n_test": _int(ev.metrics.get("num-examples")) if ev else None,
                "epsilon": privacy.get("epsilon"),
                "delta": privacy.get("delta"),
                "evaluation": _evaluation_kind(ev),
                "rounds_trained": sum(
                    1
                    for e in history.events
                    if e.kind == "train" and e.hospital == name and not e.error
                ),
                "metrics": {m: ev.metrics.get(m) if ev else None for m in METRIC_NAMES},
                **(
                    {
                        "personal_metrics": {
                            m: ev.metrics.get(PERSONAL_PREFIX + m) if ev else None
                            for m in METRIC_NAMES
                        }
                    }
                    if run.personal.enabled
                    else {}
                ),
                "undefined": dict(ev.undefined) if ev else {},
                "intervals": noise_intervals(ev),
                "named_by": "registered key" if name in registered else "self-reported",
                "self_reported_name": mismatches.get(name),
            }
        )
    accs = [h["metrics"]["accuracy"] for h in hospitals if h["metrics"]["accuracy"] is not None]
    overall: dict[str, Any] = {"mean_client_accuracy": sum(accs) / len(accs) if accs else None}
    if run.personal.enabled:
        own = [
            a for h in hospitals if (a := h["personal_metrics"]["accuracy"]) is not None
        ]  # each hospital's personal model on its own test split
        overall["mean_client_accuracy_personal"] = sum(own) / len(own) if own else None
    final_round = max(history.centralized) if history.centralized else None
    if final_round is not None and final_round > 0:
        overall.update(history.centralized[final_round])
        overall["method"] = "pooled test splits of all hospitals (centralized evaluation)"
    else:
        overall.update(_pooled_from_histograms(evaluated.values()))
    return {
        "task": run.task.name,
        "strategy": run.strategy.name,
        "model": run.model.name,
        "rounds": run.train.rounds,
        "run_settings": settings_table(run.recipe_values(), run.settings_from),
        "dp": _dp_summary(run, history),
        "secure_aggregation": _secagg_summary(run),
        "wall_seconds": round(wall_seconds, 2),
        "hospitals": hospitals,
        "overall": overall,
        "failures": history.missed(),
        "ray_nodes": _ray_nodes(history),
        "name_mismatches": [
            {"hospital": name, "self_reported_name": reported}
            for name, reported in sorted(mismatches.items())
        ],
        "baselines": {},
        "personalization": asdict(run.personal) if run.personal.enabled else None,
    }


def _ray_nodes(history: RunHistory) -> dict[str, list[str]]:
    """Simulation: Ray node id -> the hospitals whose training ran there (empty when deployed)."""
    nodes: dict[str, set[str]] = {}
    for ev in history.events:
        if ev.host is not None:
            nodes.setdefault(ev.host, set()).add(ev.hospital)
    return {node: sorted(hospitals) for node, hospitals in sorted(nodes.items())}


def _latest_privacy(history: RunHistory, hospital: str) -> dict[str, float | None]:
    """The hospital's cumulative (ε, δ) from its latest reply that carried one: a training round
    or, later, an evaluation release (both charged to the same accountant)."""
    for ev in reversed(history.events):
        if ev.hospital == hospital and ev.error is None and ev.metrics.get("epsilon") is not None:
            return {"epsilon": ev.metrics["epsilon"], "delta": ev.metrics.get("delta")}
    return {}


def _evaluation_kind(ev: Any) -> str | None:
    if ev is None:
        return None
    if ev.metrics.get("eval-noise-multiplier") is not None:
        return f"noisy counts (Gaussian, σ = {ev.metrics['eval-noise-multiplier']:g} patients)"
    return "exact" if ev.histograms else "exact (withheld or without counts)"


def noise_intervals(ev: Any) -> dict[str, Any] | None:
    """A noisy release's figures with 95 % intervals that include the noise and the sampling of
    patients (:func:`shared_models.noisy_metrics.histogram_intervals`); None for exact metrics."""
    if ev is None or not ev.histograms or ev.metrics.get("eval-noise-multiplier") is None:
        return None
    from shared_models.noisy_metrics import histogram_intervals

    return histogram_intervals(
        ev.histograms["hist-neg"], ev.histograms["hist-pos"],
        noise_multiplier=float(ev.metrics["eval-noise-multiplier"]),
    )  # fmt: skip


def _pooled_from_histograms(evaluated: Any) -> dict[str, Any]:
    """Overall metrics from the hospitals' summed score histograms: pooled sensitivity,
    specificity and accuracy at 0.5 from pooled counts, pooled AUROC at the histograms' bin
    resolution; noisy where a hospital released noisy counts."""
    import numpy as np

    from shared_models.metrics import histogram_metrics

    events = [ev for ev in evaluated if ev.histograms]
    if events:  # histograms of the most common length (a reply with other bins is left out)
        from collections import Counter

        sizes = Counter(len(ev.histograms.get("hist-neg", [])) for ev in events)
        size = sizes.most_common(1)[0][0]
        events = [
            ev for ev in events
            if len(ev.histograms.get("hist-neg", [])) == len(ev.histograms.get("hist-pos", [])) == size
        ]  # fmt: skip
    if not events:
        return {m: None for m in METRIC_NAMES} | {
            "method": "no hospital released test counts (metrics withheld or not evaluated)"
        }
    neg = np.sum([ev.histograms["hist-neg"] for ev in events], axis=0)
    pos = np.sum([ev.histograms["hist-pos"] for ev in events], axis=0)
    pooled, _ = histogram_metrics(neg, pos)
    noisy = [ev.hospital for ev in events if ev.metrics.get("eval-noise-multiplier") is not None]
    intervals = None
    if noisy:  # independent Gaussian noise of each release: the sum's σ adds in quadrature
        from shared_models.noisy_metrics import histogram_intervals

        sigma = math.sqrt(
            sum(float(ev.metrics.get("eval-noise-multiplier") or 0) ** 2 for ev in events)
        )
        intervals = histogram_intervals(neg, pos, noise_multiplier=sigma)
    method = (
        f"pooled test counts of {len(events)} hospital(s) (score histograms summed; AUROC at "
        f"{len(neg)}-bin resolution"
        + (f"; noisy counts from {', '.join(noisy)}" if noisy else "")
        + ")"
    )
    return {**pooled, "method": method} | ({"intervals": intervals} if intervals else {})


def _dp_summary(run: RunConfig, history: RunHistory) -> dict[str, Any]:
    """Which privacy guarantee the run had, in words and numbers (never more than was spent)."""
    dp = run.dp
    if not dp.enabled:
        return {
            "enabled": False,
            "level": None,
            "guarantee": "none: trained without differential privacy",
        }
    out: dict[str, Any] = {
        "enabled": True, "level": dp.level, "target_epsilon": dp.target_epsilon,
        "delta": dp.target_delta,
    }  # fmt: skip
    if dp.sample_level:
        out.update(
            guarantee="sample-level (ε, δ)-DP per hospital: DP-SGD at each hospital (Opacus), "
            "each hospital's ε for its own patients, computed by its own accountant over every "
            "DP-SGD step and every noisy evaluation release it made; a hospital whose policy "
            "allows exact metrics released them outside this ε",
            max_grad_norm=dp.max_grad_norm,
            accountant=dp.accountant,
            eval_noise_multiplier=dp.eval_noise_multiplier,
        )
        return out
    spent = (
        history.central_privacy[max(history.central_privacy)] if history.central_privacy else None
    )
    out.update(
        guarantee="client-level (ε, δ)-DP of the released global models with respect to any one "
        "hospital's whole participation (clipped updates, Gaussian noise added by the "
        "coordinator: Flower DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod, "
        "RDP accountant); it covers the model weights only, not the per-hospital metrics in "
        "this report; hospitals train without per-patient DP and must trust the coordinator "
        "to add the noise",
        clipping_norm=dp.client_clipping_norm,
        noise_multiplier_set=dp.client_noise_multiplier or None,
        epsilon=spent["epsilon"] if spent else None,
        releases=int(spent["releases"]) if spent else 0,
    )
    return out


def _secagg_summary(run: RunConfig) -> dict[str, Any]:
    """Whether the run used SecAgg+, with its protocol parameters and what it protects."""
    sa = run.secagg
    if not sa.enabled:
        return {"enabled": False}
    return {
        "enabled": True,
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod): a coordinator that "
        "follows the protocol sees only the sum of the hospitals' model updates (each "
        "hospital's train metrics: example count, ε, still travel unmasked)",
        "num_shares": sa.num_shares, "reconstruction_threshold": sa.reconstruction_threshold,
        "clipping_range": sa.clipping_range, "max_weight": sa.max_weight,
    }  # fmt: skip


def metrics_frame(history: RunHistory) -> pd.DataFrame:
    """One row per round x hospital: train loss, epsilon, delta and test metrics."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for ev in history.events:
        row = rows.setdefault((ev.round, ev.hospital), {"round": ev.round, "hospital": ev.hospital})
        if ev.error:
            row[f"{ev.kind}_error"] = ev.error
            continue
        if ev.kind == "train":
            row["n_train"] = _int(ev.metrics.get("num-examples"))
            row["train_loss"] = ev.metrics.get("train-loss")
            row["epsilon"] = ev.metrics.get("epsilon")
            row["delta"] = ev.metrics.get("delta")
            row["train_seconds"] = ev.metrics.get("compute-seconds")
        else:
            row["n_test"] = _int(ev.metrics.get("num-examples"))
            for m in METRIC_NAMES:
                row[m] = ev.metrics.get(m)
            row["eval_seconds"] = ev.metrics.get("compute-seconds")
    columns = [
        "round", "hospital", "n_train", "train_loss", "epsilon", "delta", "n_test",
        *METRIC_NAMES, "train_seconds", "eval_seconds", "train_error", "evaluate_error",
    ]  # fmt: skip
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    return frame.sort_values(["round", "hospital"]).reset_index(drop=True)


def write_reports(
    run_dir: Path, run: RunConfig, history: RunHistory, summary: dict[str, Any]
) -> None:
    """Write summary.json, metrics.csv, report.md and curves.png into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary["quality_warnings"] = quality_warnings(run, summary)
    write_json_atomic(run_dir / "summary.json", summary)
    frame = metrics_frame(history)
    frame.to_csv(run_dir / "metrics.csv", index=False)
    (run_dir / "report.md").write_text(render_markdown(run, summary, frame))
    plot_curves(
        run_dir / "curves.png", frame, history, dp=run.dp.sample_level,
        dp_target=run.dp.target_epsilon if run.dp.sample_level else None,
        baselines=summary.get("baselines"),
    )  # fmt: skip
    if block := summary.get("explanations"):
        from server.explanations import plot_explanations

        plot_explanations(run_dir, block, summary.get("positive_class") or _positive_class_of(run))


def _positive_class_of(run: RunConfig) -> str:
    """What label 1 means for the run's task (its data folder), else "the outcome"."""
    from shared_models.tasks import get_task

    try:
        return get_task(run.task.name).positive_class_for(run.data.dir)
    except (ValueError, OSError):
        return "the outcome"


def _operating_point(m: dict[str, Any]) -> str:
    """``sensitivity / specificity`` at the threshold reaching sensitivity 0.8."""
    return f"{_fmt(m.get('sensitivity@sens0.8'))} / {_fmt(m.get('specificity@sens0.8'))}"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(run: RunConfig, summary: dict[str, Any], frame: pd.DataFrame) -> str:
    """A readable report: settings, privacy per hospital, final metrics, baselines, failures."""
    dp = summary["dp"]
    lines = [
        f"# fedcare run: {summary['task']} / {summary['strategy']} / {summary['model']}",
        "",
        f"- rounds: {summary['rounds']}; wall time: {summary['wall_seconds']:.1f} s",
        f"- local training: {run.train.local_epochs:g} epoch(s) per round, expected batch "
        f"{run.train.batch_size}, lr {run.train.lr:g}",
    ]
    if summary.get("positive_class"):
        lines.append(f"- label 1 (the positive class of every metric): {summary['positive_class']}")
    if dp["enabled"] and dp["level"] == "sample":
        lines.append(
            f"- privacy: sample-level DP-SGD (Opacus, Poisson sampling, {dp['accountant'].upper()} "
            f"accountant), target ε = {dp['target_epsilon']:g} at δ = {dp['delta']:g} per "
            f"hospital for the whole run, max_grad_norm = {dp['max_grad_norm']:g}"
        )
    elif dp["enabled"]:
        lines.append(
            f"- privacy: **client-level** DP: ε = {_fmt(dp['epsilon'], 4)} at δ = {dp['delta']:g} "
            f"for the released models after {dp['releases']} release(s) "
            + (
                f"(noise multiplier set to {dp['noise_multiplier_set']:g})"
                if dp["noise_multiplier_set"]
                else f"(noise calibrated to ε = {dp['target_epsilon']:g})"
            )
            + f", update clipping norm {dp['clipping_norm']:g}. {dp['guarantee']}."
        )
    else:
        lines.append("- privacy: **none** (dp.enabled = false: non-private baseline run)")
    if summary["secure_aggregation"]["enabled"]:
        lines.append(f"- secure aggregation: {summary['secure_aggregation']['protocol']}")
    for warning in summary.get("quality_warnings", []):
        lines += ["", f"**Warning: {warning}**"]
    if settings := summary.get("run_settings"):
        lines += ["", "## Run settings and where each came from", ""]
        lines += ["| setting | value | from |", "|---|---|---|"]
        lines += [f"| {k} | {row['value']} | {row['source']} |" for k, row in settings.items()]
    lines += _personal_lines(summary)
    lines += ["", "## Hospitals (final round)", ""]
    lines.append(
        "| hospital | n_train | n_test | ε spent | δ | AUROC | accuracy | sensitivity | specificity "
        "| AUPRC | sens / spec at sens ≥ 0.8 | evaluation released as |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for h in summary["hospitals"]:
        cell = _cells(h["metrics"], h.get("intervals"))
        lines.append(
            f"| {h['name']} | {_fmt(h['n_train'])} | {_fmt(h['n_test'])} | {_fmt(h['epsilon'], 4)} | "
            f"{format(h['delta'], 'g') if h['delta'] is not None else 'n/a'} | {cell('auroc')} | "
            f"{cell('accuracy')} | {cell('sensitivity')} | {cell('specificity')} | "
            f"{cell('auprc')} | {cell('sensitivity@sens0.8')} / {cell('specificity@sens0.8')} | "
            f"{h.get('evaluation') or 'n/a'} |"
        )
    if any(h.get("intervals") for h in summary["hospitals"]):
        from shared_models.noisy_metrics import bootstrap_description

        lines += [
            "",
            "Figures from noisy counts carry a 95 % interval: "
            + bootstrap_description()
            + " A figure whose interval is too wide says *too noisy to read* instead of a number.",
        ]
    lines += _identity_lines(summary)
    undefined = [(h["name"], k, r) for h in summary["hospitals"] for k, r in h["undefined"].items()]
    if undefined:
        lines += ["", "Undefined metrics (reported as n/a, never imputed):", ""]
        lines += [f"- {name}: {metric}: {reason}" for name, metric, reason in undefined]
    ov = summary["overall"]
    cell = _cells(ov, ov.get("intervals"))
    lines += [
        "",
        "## Overall",
        "",
        f"- AUROC {cell('auroc')}, accuracy {cell('accuracy')} ({ov.get('method')})",
        f"- AUPRC {cell('auprc')}; sensitivity / specificity at 0.5: "
        f"{cell('sensitivity')} / {cell('specificity')}, at the threshold "
        f"reaching sensitivity 0.8: {cell('sensitivity@sens0.8')} / {cell('specificity@sens0.8')}",
        f"- mean client accuracy (unweighted, FLamby's metric): {_fmt(ov.get('mean_client_accuracy'))}",
    ]
    if (validation := summary.get("validation")) is not None:
        lines += validation_lines(validation)
    if (external := summary.get("external_validation")) is not None:
        lines += _external_validation_lines(external)
    if summary.get("baselines"):
        lines += ["", "## Baselines (same model, same test splits)", ""]
        lines += [
            "| baseline | AUROC | accuracy | mean client accuracy | AUPRC | sens / spec at sens ≥ 0.8 "
            "| privacy |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, b in summary["baselines"].items():
            lines.append(
                f"| {name} | {_fmt(b.get('auroc'))} | {_fmt(b.get('accuracy'))} | "
                f"{_fmt(b.get('mean_client_accuracy'))} | {_fmt(b.get('auprc'))} | "
                f"{_operating_point(b)} | {b.get('privacy', 'none')} |"
            )
        lines += [
            f"\n- {name}: the AUROC is {b['auroc_method']}."
            for name, b in summary["baselines"].items()
            if b.get("auroc_method")
        ]
    if (block := summary.get("test_split_auroc")) and block.get("skipped"):
        lines += [
            "",
            f"- FLamby's local baseline (every model on every test split): {block['skipped']}",
        ]
    elif block:
        lines += _test_split_lines(block)
    if summary.get("cross_site"):
        lines += _cross_site_lines(summary["cross_site"])
    if summary["failures"]:
        lines += ["", "## Refusals and drop-outs", ""]
        lines += ["Every hospital that missed a round's message, and why (refused, failed, "
                  "dropped, timed out, offline).", ""]  # fmt: skip
        lines += [f"- {_missed_line(f)}" for f in summary["failures"]]
    if len(summary.get("ray_nodes", {})) > 1:
        lines += ["", "## Ray nodes (simulation on a cluster)", ""]
        lines += [
            f"- {node}: {', '.join(hospitals)}" for node, hospitals in summary["ray_nodes"].items()
        ]
    if block := summary.get("explanations"):
        from server.explanations import IMPORTANCE_CHART, explanation_lines

        lines += ["", "## Explanations (released under DP)", ""]
        positive = summary.get("positive_class") or _positive_class_of(run)
        lines += explanation_lines(block, IMPORTANCE_CHART, positive)
    lines += [
        "",
        "## Per round",
        "",
        "See `metrics.csv` (one row per round x hospital) and `curves.png`.",
        "",
    ]
    if not frame.empty:
        per_round = frame.groupby("round").agg(
            auroc=("auroc", "mean"), accuracy=("accuracy", "mean"), epsilon=("epsilon", "max")
        )
        lines.append("| round | mean AUROC | mean accuracy | max ε |")
        lines.append("|---|---|---|---|")
        for rnd, row in per_round.iterrows():
            lines.append(
                f"| {rnd} | {_fmt(_nan_none(row['auroc']))} | {_fmt(_nan_none(row['accuracy']))} | "
                f"{_fmt(_nan_none(row['epsilon']))} |"
            )
    return "\n".join(lines) + "\n"


def _cells(metrics: dict[str, Any], intervals: dict[str, Any] | None):  # type: ignore[no-untyped-def]
    """``cell(name)``: the figure as text; from noisy counts with its 95 % interval, or *too
    noisy to read* (:func:`shared_models.noisy_metrics.readable_text`)."""
    from shared_models.noisy_metrics import readable_text

    def cell(name: str) -> str:
        if intervals and name in intervals:
            return readable_text(intervals[name])
        return _fmt(metrics.get(name))

    return cell


def _console_cells(metrics: dict[str, Any], intervals: dict[str, Any] | None):  # type: ignore[no-untyped-def]
    """As :func:`_cells` for the console's table: a noisy figure with its interval, or "too
    noisy" (never the bare point estimate the report withholds)."""
    full = _cells(metrics, intervals)

    def cell(name: str) -> str:
        if intervals and name in intervals and not intervals[name].get("readable"):
            return "too noisy"
        return full(name)

    return cell


def _personal_lines(summary: dict[str, Any]) -> list[str]:
    """The global model next to each hospital's personal model, on that hospital's test split."""
    pe = summary.get("personalization")
    if not pe:
        return []
    lines = [
        "", f"## Personal models (personal.method = {pe['method']})", "",
        "Each hospital's personal model stays at the hospital (its state folder); only its "
        "evaluation on the hospital's own test split leaves, as the global model's does.", "",
        "| hospital | AUROC global | AUROC personal | accuracy global | accuracy personal |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for h in summary["hospitals"]:
        m, p = h["metrics"], h.get("personal_metrics") or {}
        lines.append(
            f"| {h['name']} | {_fmt(m['auroc'])} | {_fmt(p.get('auroc'))} | "
            f"{_fmt(m['accuracy'])} | {_fmt(p.get('accuracy'))} |"
        )
    ov = summary["overall"]
    lines += [
        "",
        f"Mean client accuracy: global {_fmt(ov.get('mean_client_accuracy'))}, personal "
        f"{_fmt(ov.get('mean_client_accuracy_personal'))}.",
    ]
    return lines


def _ci(d: dict[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]`` of an interval dict (:class:`shared_models.validation.Interval`)."""
    if not d or d.get("value") is None:
        return "n/a" + (f" ({d['note']})" if d and d.get("note") else "")
    if d.get("ci_low") is None or d.get("ci_high") is None:
        return f"{d['value']:.{digits}f} [CI undefined]"
    return f"{d['value']:.{digits}f} [{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def calibration_rows(cal: dict[str, Any]) -> list[str]:
    """The calibration rows of a ``| measure | value | ideal |`` table (Brier score,
    calibration-in-the-large, slope and intercept of the logistic recalibration), a blank line,
    and the note on an undefined slope (``cal``: :func:`shared_models.validation.calibration`)."""
    rows = [
        f"| Brier score | {cal['brier']:.4f} | 0 |",
        f"| calibration-in-the-large (observed - mean predicted) | "
        f"{cal['calibration_in_the_large']:+.3f} | 0 |",
        f"| calibration slope | {_fmt(cal['slope'])} | 1 |",
        f"| calibration intercept | {_fmt(cal['intercept'])} | 0 |",
        "",
    ]
    if "slope_note" in cal:
        rows += [f"Calibration slope and intercept {cal['slope_note']}.", ""]
    return rows


def validation_lines(block: dict[str, Any], *, level: int = 2) -> list[str]:
    """``report.md``'s section on the final model's uncertainty and calibration (the
    ``validation`` block of ``fedcare simulate``, :mod:`simulations.uncertainty`), under a
    heading of ``level`` (the model card nests it one level deeper)."""
    title = ["", f"{'#' * level} Uncertainty and calibration (pooled test splits, final model)", ""]
    if "skipped" in block:
        return title + [f"Not computed: {block['skipped']}."]
    cal, op, boot = block["calibration"], block["threshold_0.5"], block["bootstrap"]
    lines = title + [
        f"{block['n']} test patients of all hospitals ({block['positives']} positive), scored "
        "exactly by the final federated model (`model.safetensors`).",
        "",
        "| measure | value [95 % CI] | ideal |",
        "|---|---|---|",
        f"| AUROC | {_ci(block['auroc'])} | 1 |",
        f"| AUPRC | {_ci(block['auprc'])} | 1 (chance: {block['positives'] / block['n']:.3f}) |",
        f"| sensitivity at 0.5 | {_ci(op['sensitivity'])} | 1 |",
        f"| specificity at 0.5 | {_ci(op['specificity'])} | 1 |",
        *calibration_rows(cal),
    ]
    per = block.get("per_hospital_auroc") or {}
    if "skipped" in per:
        lines += [f"Per-hospital AUROC intervals: {per['skipped']}.", ""]
    elif per:
        lines += ["| hospital | AUROC [95 % CI], own test split |", "|---|---|"]
        lines += [f"| {name} | {_ci(d)} |" for name, d in per.items()]
        lines.append("")
    if het := block.get("heterogeneity"):
        from shared_models.meta_analysis import heterogeneity_lines

        lines += ["Between hospitals (each hospital's own test split):", ""]
        lines += heterogeneity_lines(
            het, within="Within-hospital variances: DeLong's (DeLong et al. 1988)."
        )
    lines += [
        f"Methods: 95 % intervals for AUROC and AUPRC by the {boot['method']} bootstrap "
        f"(bias-corrected and accelerated; Efron & Tibshirani 1993), {boot['resamples']} "
        f"resamples of the patients with their label (seed {boot['seed']}, "
        "`scipy.stats.bootstrap`); sensitivity and specificity with Wilson score intervals "
        "(Wilson 1927); Brier score; calibration slope and intercept of the unpenalised logistic "
        "recalibration `logit P(y=1) = a + b logit(p)` (Cox 1958; slope below 1: over-confident); "
        f"reliability diagram in {cal['reliability']['bins']} equal-width bins. The pooled "
        "figures mix hospitals: they are not a between-hospital analysis.",
        "",
        f"![Reliability diagram]({block['figure']})",
    ]
    return lines


def _external_validation_lines(block: dict[str, Any]) -> list[str]:
    """``report.md``'s section on the hospital left out of the federation (``fedcare simulate
    --hold-out``; the ``external_validation`` block, :mod:`simulations.uncertainty`)."""
    title = ["", "## External validation on the held-out hospital", ""]
    if "skipped" in block:
        return title + [f"{block['hospital']}: not computed: {block['skipped']}."]
    cal, boot = block["calibration"], block["bootstrap"]
    lines = title + [
        f"Hospital {block['hospital']} took no part in the training (leave-one-hospital-out). "
        f"The final federated model (`model.safetensors`) scored all its {block['n']} records "
        f"(its train and test splits together), {block['positives']} positive "
        f"(prevalence {block['prevalence']:.3f}).",
        "",
        "| measure | value [95 % CI] | ideal |",
        "|---|---|---|",
        f"| AUROC | {_ci(block['auroc'])} | 1 |",
        f"| AUPRC | {_ci(block['auprc'])} | 1 (chance: {block['prevalence']:.3f}) |",
        *calibration_rows(cal),
    ]
    negatives = block["n"] - block["positives"]
    for name in ("auroc", "auprc"):
        if note := block[name].get("note"):
            lines += [
                f"{name.upper()}: {note} ({block['positives']} positive, {negatives} negative "
                "records).",
                "",
            ]
    return lines + [
        f"Methods as above: {boot['method']} bootstrap, {boot['resamples']} resamples (seed "
        f"{boot['seed']}); calibration by logistic recalibration (Cox 1958).",
    ]


def external_validation_line(block: dict[str, Any]) -> str:
    """The console's one line on the held-out hospital (``fedcare simulate --hold-out``)."""
    if "skipped" in block:
        return f"held-out hospital {block['hospital']}: not validated ({block['skipped']})"
    cal = block["calibration"]
    return (
        f"held-out hospital {block['hospital']} (n {block['n']}, prevalence "
        f"{block['prevalence']:.2f}): AUROC {_ci(block['auroc'])}, AUPRC {_ci(block['auprc'])}, "
        f"Brier {cal['brier']:.3f}, calibration slope {_fmt(cal['slope'], 2)}, intercept "
        f"{_fmt(cal['intercept'], 2)}"
    )


def _test_split_lines(block: dict[str, Any]) -> list[str]:
    """``report.md``'s section on FLamby's local baseline: every model on every test split."""
    names = block["test_splits"]
    n = block["n_splits"]
    lines = [
        "",
        "## Local baselines as in FLamby: every model on every hospital's test split",
        "",
        f"AUROC of each model on each hospital's test split, and its mean over the {n} test "
        f"split(s) with both classes ({block['method']}).",
        "",
        f"| model | trained on | {' | '.join(names)} | own test split | mean over {n} split(s) |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]

    def row(label: str, trained_on: str, entry: dict[str, Any], own: Any) -> str:
        cells = [
            "undefined" if name in block["undefined"] else _fmt(entry["per_test_split"][name])
            for name in names
        ]
        return (
            f"| {label} | {trained_on} | {' | '.join(cells)} | {own} | {_fmt(entry['average'])} |"
        )

    if block.get("federated"):
        lines.append(row("federated (final model)", "all, federated", block["federated"], "-"))
    lines.append(row("pooled (centralised, non-private)", "all, pooled", block["pooled"], "-"))
    for e in block["local"]:
        own = "undefined" if e["trained_on"] in block["undefined"] else _fmt(e["own"])
        lines.append(row(e["model"], e["trained_on"], e, own))
    lines += ["", f"- {_test_split_summary(block)}"]
    lines += [f"- {line}" for line in _undefined_split_lines(block)]
    return lines


def _cross_site_lines(block: dict[str, Any]) -> list[str]:
    """``report.md``'s cross-site matrix (``fedcare simulate --cross-site``)."""
    lines = ["", "## Cross-site matrix (--cross-site)", ""]
    if block.get("skipped"):
        return [*lines, f"Cross-site matrix {block['skipped']}."]
    splits = block["test_splits"]
    names = [s["hospital"] for s in splits]
    lines += [
        "AUROC [95 % CI, DeLong] and accuracy at threshold 0.5 of each model (rows) on each "
        "hospital's test split (columns). The diagonal of the local models is each hospital's "
        "own model on its own patients; off the diagonal a model meets another hospital's"
        + (
            "; the held-out hospital's column (all its records) is one no model trained on."
            if any(s.get("held_out") for s in splits)
            else "."
        ),
        "",
        "| model | "
        + " | ".join(
            f"{s['hospital']} (n {s['n']}, {s['positives']} pos."
            + ("; held out, all records" if s.get("held_out") else "")
            + ")"
            for s in splits
        )
        + " |",
        "|---|" + "---|" * len(names),
    ]

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "n/a"
        a = c["auroc"]
        if a["value"] is None:
            return "undefined (one class)"
        ci = (
            f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
            if a["ci_low"] is not None
            else f" ({a.get('note', 'no interval')})"
        )
        return f"{a['value']:.3f}{ci}; acc {_fmt(c['accuracy'])}"

    for row in block["rows"]:
        label = f"**{row['model']}**" if row["trained_on"] == "all" else row["model"]
        lines.append(f"| {label} | " + " | ".join(cell(row["cells"].get(n)) for n in names) + " |")
    lines += ["", f"Method: {block['method']}."]
    return lines


def _test_split_summary(block: dict[str, Any]) -> str:
    """``local models (FLamby, mean over 2 test splits): mean 0.950, best 0.990 (Local h-1);
    federated 0.970; pooled 0.980``."""
    best = block.get("local_best") or {}
    fed = block.get("federated") or {}
    return (
        f"local models (FLamby, AUROC averaged over {block['n_splits']} test split(s)): mean "
        f"{_fmt(block.get('local_mean'))}, best {_fmt(best.get('average'))} "
        f"({best.get('model', 'none')}); federated model {_fmt(fed.get('average'))}; pooled "
        f"model {_fmt(block['pooled']['average'])}"
    )


def _undefined_split_lines(block: dict[str, Any]) -> list[str]:
    """One line per hospital whose test split has no AUROC, with the reason."""
    n = block["n_splits"]
    return [
        f"{name}'s test split has no AUROC: {reason}; the averages are over the other {n} "
        f"test split(s)"
        for name, reason in block["undefined"].items()
    ]


def quality_warnings(run: RunConfig, summary: dict[str, Any]) -> list[str]:
    """One line per reason the final federated model is not useful, each saying which figure
    triggered it and what to try; empty when there is none.

    Two checks:

    - the model predicts one class for every test patient: the ``overall`` block (the figures
      the report shows for the federated model; in simulation the exact pooled test evaluation,
      when deployed the hospitals' possibly noisy score histograms) has sensitivity 0 and
      specificity 1, or the reverse, at the accuracy's threshold 0.5;
    - its AUROC averaged over the hospitals' test splits is below the mean of the local models'
      (both as in FLamby, ``test_split_auroc``, written by ``fedcare simulate``) by more than
      :data:`LOCAL_MARGIN` (:data:`LOCAL_MARGIN_DP` with DP): the average hospital would do
      better training alone, without DP.

    Parameters
    ----------
    run : RunConfig
        The run's settings (for what to try: rounds, ε, learning rate, epochs, the task).
    summary : dict
        The ``summary.json`` document (:func:`build_summary`, plus ``test_split_auroc``).
    """
    warnings = []
    ov = summary.get("overall") or {}
    sens, spec = ov.get("sensitivity"), ov.get("specificity")
    one_class = "negative" if (sens, spec) == (0.0, 1.0) else None
    one_class = "positive" if (sens, spec) == (1.0, 0.0) else one_class
    if one_class is not None:
        warnings.append(
            f"the federated model predicts {one_class} for every test patient at threshold 0.5 "
            f"(overall sensitivity {_fmt(sens)}, specificity {_fmt(spec)}; its accuracy "
            f"{_fmt(ov.get('accuracy'))} is the share of {one_class} patients). "
            f"{_what_to_try(run)}"
        )
    block = summary.get("test_split_auroc") or {}
    fed = (block.get("federated") or {}).get("average")
    local = block.get("local_mean")
    margin = LOCAL_MARGIN_DP if run.dp.enabled else LOCAL_MARGIN
    if fed is not None and local is not None and fed < local - margin:
        cost = " (DP costs some AUROC: the margin allowed is 0.02)" if run.dp.enabled else ""
        warnings.append(
            f"the federated model's AUROC averaged over the {block['n_splits']} hospitals' test "
            f"splits, {fed:.3f}, is below the mean local non-private model's, {local:.3f} "
            f"(FLamby's comparison){cost}: a hospital would do better alone. {_what_to_try(run)}"
        )
    return warnings


# How far the federated model's averaged AUROC may fall below the mean local model's before the
# report warns: without DP about the AUROC's own spread between equally good models on a few
# hundred test records; with DP the local models (non-private) are trained without noise, and
# the warning is for a federation that loses more than the noise explains.
LOCAL_MARGIN = 0.005
LOCAL_MARGIN_DP = 0.02


def _what_to_try(run: RunConfig) -> str:
    """``Try more rounds (--rounds N; this run 5), ...``: the options of ``fedcare simulate`` (and
    the run-config keys a coordinator sets) that most often turn a useless model into a useful
    one, with this run's values."""
    from shared_models.protocol import APP_DIR

    t = run.train
    parts = [f"more rounds (--rounds; this run {t.rounds})"]
    if run.dp.enabled:
        parts.append(f"a larger ε (--epsilon; this run {run.dp.target_epsilon:g})")
    parts.append(
        f'another learning rate or more local epochs (--run-config "train.lr=... '
        f'train.local-epochs=..."; this run {t.lr:g} and {t.local_epochs:g})'
    )
    preset = Path("presets") / f"{run.task.name}{'' if run.dp.enabled else '-no-dp'}.toml"
    # the task's recipe applies by itself (shared_models.recipes): worth naming only where the
    # user's own settings replaced some of it (or a run that recorded no sources)
    sources = set(Sources.from_json(run.settings_from).by_key.values())
    overridden = sorted(sources & {RUN_CONFIG, "--rounds"})
    if (APP_DIR / preset).exists() and (overridden or not run.settings_from):
        without = f"leave out {' and '.join(overridden)}, or " if overridden else ""
        parts.append(f"the task's recipe ({without}--run-config {preset})")
    return "Try " + ", ".join(parts[:-1]) + f" or {parts[-1]}."


def _missed_line(failure: dict[str, Any]) -> str:
    """``round 2 train: c (timed out): no reply within 40 s ...`` (summaries without a cause:
    written before causes were recorded)."""
    cause = f" ({failure['cause']})" if failure.get("cause") else ""
    return (
        f"round {failure['round']} {failure['kind']}: {failure['hospital']}{cause}: "
        f"{failure['reason']}"
    )


def _identity_lines(summary: dict[str, Any]) -> list[str]:
    """How hospitals are named, and every hospital whose self-reported hospital name differs."""
    by_key = [h["name"] for h in summary["hospitals"] if h.get("named_by") == "registered key"]
    if not by_key:
        return ["", "Hospitals are named by the hospital name they report (no registered keys)."]
    lines = ["", "Hospitals are named by the key they authenticate with (registered by the "
             "coordinator with `fedcare server add-hospital`)."]  # fmt: skip
    lines += [
        f"- {h['name']}: no registered key; named by its own report"
        for h in summary["hospitals"]
        if h.get("named_by") != "registered key"
    ]
    lines += [
        f"- **name mismatch**: the hospital registered as {m['hospital']} reports its name as "
        f"{m['self_reported_name']!r}"
        for m in summary.get("name_mismatches", [])
    ]
    return lines


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def plot_curves(
    path: Path,
    frame: pd.DataFrame,
    history: RunHistory,
    *,
    dp: bool,
    dp_target: float | None = None,
    baselines: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``curves.png`` (:func:`curves_figure`) to ``path``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(frame, history, dp=dp, dp_target=dp_target, baselines=baselines)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(
    frame: pd.DataFrame,
    history: RunHistory,
    *,
    dp: bool,
    dp_target: float | None = None,
    baselines: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """The matplotlib figure of ``curves.png``: AUROC by round (per hospital, pooled and, where present, each baseline as a horizontal
    line) and cumulative ε by round (per hospital). The AUROC axis runs from at most 0.5 (chance)
    to 1; hospitals differ by marker and line style, drawn largest first, so that hospitals on
    the same ε curve stay visible; rounds are integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def style(i: int, count: int) -> dict[str, Any]:
        return {
            "marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)],
            "markersize": 4 + 2 * (count - 1 - i), "markerfacecolor": "none" if i else None,
        }  # fmt: skip

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    hospitals = list(frame.groupby("hospital")) if not frame.empty else []
    lowest = [0.5]
    for i, (hospital, grp) in enumerate(hospitals):
        grp = grp.dropna(subset=["auroc"]) if "auroc" in grp else grp
        axes[0].plot(grp["round"], grp["auroc"], label=str(hospital), **style(i, len(hospitals)))
        if "auroc" in grp and len(grp):
            lowest.append(float(grp["auroc"].min()))
    central = sorted((r, m.get("auroc")) for r, m in history.centralized.items() if r > 0)
    if central:
        axes[0].plot([r for r, _ in central], [a for _, a in central], "k--", lw=2, label="pooled")
        lowest += [float(a) for _, a in central if a is not None]
    for j, (name, b) in enumerate((baselines or {}).items()):
        if b.get("auroc") is not None:
            axes[0].axhline(float(b["auroc"]), color=f"C{(len(hospitals) + j) % 10}", ls=":", lw=1.5,
                            label=f"baseline: {name}")  # fmt: skip
            lowest.append(float(b["auroc"]))
    axes[0].set_ylim(max(0.0, min(lowest) - 0.05), 1.01)
    axes[0].set(title="Test AUROC by round", xlabel="round", ylabel="AUROC")
    axes[0].legend(fontsize=7)
    if dp:
        for i, (hospital, grp) in enumerate(hospitals):
            grp = grp.dropna(subset=["epsilon"])
            axes[1].plot(
                grp["round"], grp["epsilon"], label=str(hospital), **style(i, len(hospitals))
            )
        if dp_target is not None and frame["epsilon"].notna().any():
            axes[1].axhline(dp_target, color="k", ls="--", lw=1, label=f"target ε = {dp_target:g}")
        axes[1].set(title="Cumulative ε by round (per hospital)", xlabel="round", ylabel="ε")
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "no DP (non-private run)", ha="center", va="center")
        axes[1].set_axis_off()
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _nan_none(v: Any) -> float | None:
    return None if v is None or v != v else float(v)


def nobody_trained(summary: dict[str, Any]) -> str | None:
    """Why a finished run trained nothing (no hospital returned an update in any round, e.g. all
    refused it), with the first reasons; ``None`` when at least one hospital trained."""
    if any(h["rounds_trained"] for h in summary["hospitals"]):
        return None
    reasons = "; ".join(f["reason"] for f in summary["failures"][:3]) or "no hospital answered"
    return f"no hospital trained: {reasons}"


def print_summary(console: Any, summary: dict[str, Any], out: Path, seconds: float) -> None:
    """The end-of-run table: per-hospital ε, δ, AUROC, accuracy; overall; baselines; failures."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{summary['task']} · {summary['strategy']} · {summary['rounds']} rounds")
    for col in ("hospital", "n_train", "n_test", "ε", "δ", "AUROC", "accuracy"):
        table.add_column(col, justify="right" if col != "hospital" else "left")
    for h in summary["hospitals"]:
        cell = _console_cells(h["metrics"], h.get("intervals"))
        table.add_row(
            h["name"], _fmt(h["n_train"]), _fmt(h["n_test"]), _fmt(h["epsilon"]),
            "n/a" if h["delta"] is None else f"{h['delta']:g}", cell("auroc"), cell("accuracy"),
        )  # fmt: skip
    console.print(table)
    dp = summary["dp"]
    if dp.get("level") == "client":
        console.print(
            f"privacy: client-level ε = {_fmt(dp['epsilon'])} at δ = {dp['delta']:g} for the "
            "released model (per hospital, not per patient; noise added by the coordinator)"
        )
    elif not dp["enabled"]:
        console.print("privacy: none (trained without differential privacy)")
    if summary.get("secure_aggregation", {}).get("enabled"):
        console.print(
            "secure aggregation: SecAgg+ (the coordinator received only the sum of the updates)"
        )
    ov = summary["overall"]
    validation = summary.get("validation") or {}
    pooled = _console_cells(ov, ov.get("intervals"))
    auroc = _ci(validation["auroc"]) if "auroc" in validation else pooled("auroc")
    auprc = _ci(validation["auprc"]) if "auprc" in validation else pooled("auprc")
    noisy = bool(ov.get("intervals")) or any(h.get("intervals") for h in summary["hospitals"])
    mean = "n/a (noisy releases)" if noisy else _fmt(ov.get("mean_client_accuracy"))
    console.print(
        escape(
            f"overall AUROC {auroc}, AUPRC {auprc}, accuracy {pooled('accuracy')}, mean "
            f"client accuracy {mean}"
        ),
        highlight=False,
    )
    if noisy:
        console.print(
            "  figures from noisy counts show their 95 % interval (noise and patients); "
            "'too noisy' where it spans more than half of [0, 1] (report.md says why)"
        )
    if (external := summary.get("external_validation")) is not None:
        console.print(escape(external_validation_line(external)), highlight=False)
    for name, b in summary.get("baselines", {}).items():
        pooled = " (scores of the hospitals' own models pooled)" if b.get("auroc_method") else ""
        console.print(
            f"  baseline {name}: AUROC {_fmt(b['auroc'])}{pooled}, AUPRC "
            f"{_fmt(b.get('auprc'))}, accuracy {_fmt(b['accuracy'])}"
        )
    if (block := summary.get("test_split_auroc")) and not block.get("skipped"):
        console.print(f"  {escape(_test_split_summary(block))}", highlight=False)
        for line in _undefined_split_lines(block):
            console.print(f"  [yellow]{escape(line)}[/]", highlight=False)
    if (matrix := summary.get("cross_site")) and not matrix.get("skipped"):
        console.print(
            f"  cross-site matrix: {len(matrix['rows'])} models x {len(matrix['test_splits'])} "
            "test splits (AUROC [95 % CI, DeLong]) in report.md",
            highlight=False,
        )
    for warning in summary.get("quality_warnings", []):
        console.print(f"[bold yellow]warning: {escape(warning)}[/]", highlight=False)
    for f in summary.get("failures", []):
        console.print(f"  [yellow]{escape(_missed_line(f))}[/]", highlight=False)
    if len(summary.get("ray_nodes", {})) > 1:
        for node, hospitals in summary["ray_nodes"].items():
            console.print(f"  Ray node {node[:12]}: trained {', '.join(hospitals)}")
    for m in summary.get("name_mismatches", []):
        console.print(
            f"  [yellow]name mismatch: the hospital registered as {m['hospital']} reports its "
            f"name as {m['self_reported_name']!r}[/]"
        )
    console.print(f"run folder: [bold]{out}[/] ({seconds:.1f} s)")
