"""The report of an evaluation-only run (`fedcare server evaluate`): federated external validation.

Every hospital asked released per-class score histograms of the model's predictions on its test
split, with Gaussian noise of σ patients on each count, charged to its ledger
(:mod:`client.evaluation`); or refused, with the reason. From those releases alone (no other
value leaves a hospital) the coordinator writes ``evaluation.json`` and ``report.md``:

- per hospital: n from the noisy counts (with the noise's standard deviation), prevalence,
  AUROC, sensitivity and specificity at 0.5, each with a 95 % interval that includes the noise
  and the sampling of patients (:func:`shared_models.noisy_metrics.histogram_intervals`); a
  figure too noisy to read says so instead of showing a number; ε and δ of the release;
- pooled: the summed histograms of every hospital that answered (summed noise, σ √k), the same
  figures and the calibration from the pooled histograms
  (:func:`shared_models.noisy_metrics.histogram_calibration`);
- heterogeneity between hospitals: the DerSimonian-Laird random-effects pooled AUROC with its
  95 % confidence interval, the 95 % prediction interval for a new hospital and I²
  (:func:`shared_models.meta_analysis.pooled_auroc`), as TRIPOD-Cluster asks (Debray et al., BMJ
  2023;380:e071018);
- who refused or did not answer, with the reason each hospital gave.

Pure post-processing of what the hospitals released: it spends no privacy.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.history import RunHistory, failure_cause
from shared_models.config import RunConfig
from shared_models.files import write_json_atomic
from shared_models.meta_analysis import heterogeneity_lines, hospital_heterogeneity
from shared_models.noisy_metrics import (
    READABLE_WIDTH,
    bootstrap_description,
    histogram_calibration,
    histogram_intervals,
    pooled_histograms,
    readable_text,
)

REPORT_DIR = "federated-evaluation"
SHOWN = ("auroc", "sensitivity", "specificity")


def _hospital_entry(event: Any) -> dict[str, Any]:
    """One hospital's figures from its release (a :class:`~server.history.HospitalEvent`)."""
    neg, pos = event.histograms["hist-neg"], event.histograms["hist-pos"]
    sigma = float(event.metrics.get("eval-noise-multiplier") or 0.0)
    n_neg, n_pos = float(sum(neg)), float(sum(pos))
    return {
        "hospital": event.hospital,
        "n": n_neg + n_pos,
        "n_positive": n_pos,
        # the hospital's reply also carries its test-split size (public, README "What leaves a
        # hospital"): shown beside the noisy total
        "n_reported": event.metrics.get("num-examples"),
        # each class total sums len(bins) noisy counts: its noise sd is σ sqrt(bins)
        "n_noise_sd": sigma * math.sqrt(len(neg) + len(pos)),
        "prevalence": n_pos / (n_neg + n_pos) if n_neg + n_pos >= 1 and n_pos >= 0 else None,
        "noise_multiplier": sigma,
        "epsilon": event.metrics.get("epsilon"),
        "delta": event.metrics.get("delta"),
        "histograms": {"negatives": list(neg), "positives": list(pos)},
        "metrics": histogram_intervals(neg, pos, noise_multiplier=sigma),
    }


def _heterogeneity(hospitals: list[dict[str, Any]]) -> dict[str, Any]:
    """Random-effects pooled AUROC over the hospitals whose AUROC and its SE are defined."""
    return hospital_heterogeneity(
        [(h["hospital"], h["metrics"]["auroc"]["value"], h["metrics"]["auroc"]["se"])
         for h in hospitals],
        within="bootstrap SE of each hospital's AUROC (noise and sampling)",
    )  # fmt: skip


def build_evaluation(
    run: RunConfig, history: RunHistory, *, run_id: str, flower_run_id: int
) -> dict[str, Any]:
    """The content of ``evaluation.json`` from the run's recorded replies.

    Parameters
    ----------
    run : RunConfig
        The evaluation-only run (``eval.model`` set).
    history : RunHistory
        The replies the coordinator recorded (:class:`~server.history.RecordingGrid`).
    run_id : str
        fedcare run id (the hospitals' ledgers key on it).
    flower_run_id : int
        The coordinator's Flower run id.
    """
    released = [ev for ev in history.events if ev.kind == "evaluate" and ev.error is None]
    bins = run.eval_histogram_bins

    def fits(ev: Any) -> bool:  # a reply with other histograms cannot be summed with the rest
        h = ev.histograms
        return len(h.get("hist-neg", [])) == len(h.get("hist-pos", [])) == bins

    hospitals = sorted(
        (_hospital_entry(ev) for ev in released if fits(ev)), key=lambda h: h["hospital"]
    )
    missing = [
        {"hospital": ev.hospital, "cause": failure_cause(ev), "reason": ev.error}
        for ev in history.events
        if ev.kind == "evaluate" and ev.error is not None
    ] + [
        {"hospital": ev.hospital, "cause": "failed",
         "reason": f"its reply had no score histograms of the run's {bins} bins"}
        for ev in released if not fits(ev)
    ]  # fmt: skip
    pooled: dict[str, Any] = {"hospitals": [h["hospital"] for h in hospitals]}
    if hospitals:
        neg, pos, sigma = pooled_histograms(
            [
                (h["histograms"]["negatives"], h["histograms"]["positives"], h["noise_multiplier"])
                for h in hospitals
            ]  # fmt: skip
        )
        pooled.update(
            n=float(neg.sum() + pos.sum()), noise_multiplier=sigma,
            metrics=histogram_intervals(neg, pos, noise_multiplier=sigma),
            calibration=histogram_calibration(neg, pos),
        )  # fmt: skip
    return {
        "run_id": run_id,
        "flower_run_id": flower_run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": run.eval_model,
        "task": run.task.name,
        "preprocessing": run.task.preprocessing,
        "release": f"per-class score histograms, {run.eval_histogram_bins} bins over [0, 1], "
        f"Gaussian noise of σ = {run.dp.eval_noise_multiplier:g} patients on every count "
        "(sensitivity 1), charged to each hospital's ledger",
        "intervals": bootstrap_description(run.dp.eval_noise_multiplier),
        "hospitals": hospitals,
        "not_evaluated": missing,
        "pooled": pooled,
        "heterogeneity": _heterogeneity(hospitals),
    }


def _n_text(h: dict[str, Any]) -> str:
    text = f"{h['n']:.0f} ± {h['n_noise_sd']:.0f}" if h["n_noise_sd"] else f"{h['n']:.0f}"
    if h.get("n_reported") is not None:
        text += f" (reported n_test {h['n_reported']:.0f})"
    return text


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(pair: Any, digits: int = 3) -> str:
    return "n/a" if pair is None else f"{pair[0]:.{digits}f}-{pair[1]:.{digits}f}"


def render_markdown(evaluation: dict[str, Any]) -> str:
    """``report.md`` of an evaluation-only run (see the module docstring)."""
    lines = [
        "# Federated external validation",
        "",
        f"Model `{evaluation['model']}` (task {evaluation['task']}, preprocessing "
        f"{evaluation['preprocessing']}); run {evaluation['run_id']} (Flower run "
        f"{evaluation['flower_run_id']}), {evaluation['created']}.",
        "",
        "No model was trained and no model update left a hospital. Each hospital released "
        f"{evaluation['release']}. Intervals: {evaluation['intervals']} A figure whose interval "
        "is too wide to say anything is marked *too noisy to read* instead of shown.",
        "",
        "## Per hospital",
        "",
        "| hospital | n (± noise sd) | prevalence | AUROC (95 % CI) | sensitivity @0.5 | "
        "specificity @0.5 | ε (δ) of the release |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in evaluation["hospitals"]:
        m = h["metrics"]
        prevalence = "n/a" if h["prevalence"] is None else f"{h['prevalence']:.2f}"
        eps = "n/a" if h["epsilon"] is None else f"{h['epsilon']:.3f} ({h['delta']:g})"
        lines.append(
            f"| {h['hospital']} | {_n_text(h)} | {prevalence} | "
            + " | ".join(readable_text(m[name]) for name in SHOWN)
            + f" | {eps} |"
        )
    if not evaluation["hospitals"]:
        lines.append("| (no hospital released an evaluation) | | | | | | |")
    lines.append("")
    if evaluation["not_evaluated"]:
        lines += ["Not evaluated:", ""]
        lines += [
            f"- **{m['hospital']}** ({m['cause']}): {m['reason']}"
            for m in evaluation["not_evaluated"]
        ]
        lines.append("")
    pooled = evaluation["pooled"]
    if "metrics" in pooled:
        m = pooled["metrics"]
        lines += [
            "## Pooled (the hospitals' histograms summed)",
            "",
            f"{len(pooled['hospitals'])} hospital(s), n ≈ {pooled['n']:.0f}; summed noise σ = "
            f"{pooled['noise_multiplier']:.2f} per count.",
            "",
            "| measure | value (95 % CI) |",
            "|---|---|",
            *(
                f"| {name} | {readable_text(m[name])} |"
                for name in ("auroc", "accuracy", *SHOWN[1:])
            ),
            "",
            "### Calibration (pooled histograms)",
            "",
        ]
        cal = pooled["calibration"]
        citl = cal["calibration_in_the_large"]
        ece = cal["expected_calibration_error"]
        lines += [
            f"Calibration-in-the-large (observed rate - mean predicted risk): "
            f"{'n/a' if citl is None else f'{citl:+.3f}'} (ideal 0); expected calibration error "
            f"{'n/a' if ece is None else f'{ece:.3f}'}. Predicted risk is each bin's midpoint; "
            "noisy counts below 0 are read as 0.",
            "",
            "| predicted risk (bin midpoint) | observed rate | n (noisy) |",
            "|---|---|---|",
            *(
                f"| {b['predicted']:.2f} | {_fmt(b['observed'])} | {b['n']:.0f} |"
                for b in cal["bins"]
            ),
            "",
        ]
    het = evaluation["heterogeneity"]
    lines += [f"![AUROC by hospital and pooled calibration]({FIGURE})", ""]
    lines += ["## Heterogeneity between hospitals", ""]
    lines += heterogeneity_lines(
        het,
        within="Within-hospital variances are the bootstrap variances above, so the noise of "
        "each release widens them.",
        readable_width=READABLE_WIDTH,
    )
    return "\n".join(lines)


FIGURE = "federated-evaluation.png"


def plot_evaluation(path: Path, evaluation: dict[str, Any]) -> None:
    """``federated-evaluation.png``: a forest plot (each hospital's AUROC with its 95 % interval,
    a hollow marker where too noisy to read; the random-effects AUROC with its CI and, dashed,
    its prediction interval) and the reliability diagram of the pooled histograms (marker area
    proportional to the bin's noisy n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (forest, reliability) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [h for h in evaluation["hospitals"] if h["metrics"]["auroc"]["ci"] is not None]
    for y, h in enumerate(reversed(rows), start=1):
        a = h["metrics"]["auroc"]
        forest.plot(a["ci"], [y, y], color="C0")
        forest.plot([a["value"]], [y], "s", color="C0",
                    markerfacecolor="C0" if a["readable"] else "none")  # fmt: skip
    labels = [h["hospital"] for h in reversed(rows)]
    het = evaluation["heterogeneity"]
    if "auroc" in het:
        if het["prediction"] is not None:
            forest.plot(het["prediction"], [0, 0], "k--", lw=1)
        forest.plot(het["ci"], [0, 0], "k-", lw=3)
        forest.plot([het["auroc"]], [0], "kD")
        labels = ["random effects", *labels]
        ticks = list(range(len(labels)))
    else:
        ticks = list(range(1, len(labels) + 1))
    forest.set_yticks(ticks, labels)
    forest.axvline(0.5, color="grey", lw=0.8, ls=":")
    forest.set(xlim=(0, 1), xlabel="AUROC (95 % interval)", title="AUROC by hospital")
    cal = evaluation["pooled"].get("calibration")
    reliability.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    if cal:
        shown = [b for b in cal["bins"] if b["observed"] is not None]
        reliability.scatter([b["predicted"] for b in shown], [b["observed"] for b in shown],
                            s=[10 + 2 * b["n"] for b in shown], color="C1")  # fmt: skip
    reliability.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted risk (bin midpoint)",
                    ylabel="observed rate", title="Calibration (pooled histograms)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_evaluation(
    out: Path, run: RunConfig, history: RunHistory, *, run_id: str, flower_run_id: int
) -> dict[str, Any]:
    """Write ``evaluation.json``, ``report.md``, :data:`FIGURE` and ``history.json`` into
    ``out``; returns the evaluation."""
    evaluation = build_evaluation(run, history, run_id=run_id, flower_run_id=flower_run_id)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "evaluation.json", evaluation)
    write_json_atomic(out / "history.json", history.to_dict())
    tmp = out / ".report.md.tmp"
    tmp.write_text(render_markdown(evaluation))
    tmp.replace(out / "report.md")
    plot_evaluation(out / FIGURE, evaluation)
    return evaluation
