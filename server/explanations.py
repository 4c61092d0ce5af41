"""The coordinator's side of the DP explanation release: pooling, the chart and the words.

Each hospital ``h`` sends the noisy sums ``S_h`` (signed) and ``A_h`` (absolute) of its
patients' clipped per-feature attributions, each coordinate with Gaussian noise of standard
deviation ``sigma_h C_h`` (:mod:`client.explanations`), and its number of test patients
``n_h`` (public: every evaluation reply sends it). The global importance of feature ``j`` is

    mean |attribution|_j = sum_h A_hj / sum_h n_h      signed mean_j = sum_h S_hj / sum_h n_h

and the noise's standard error of either is ``sqrt(sum_h (sigma_h C_h)^2) / sum_h n_h`` -- the
spread the DP noise alone adds, not the sampling uncertainty of the patients. The sums travel
in the clear (per hospital, not through SecAgg+): each is a DP release on its own, charged to
its hospital's ledger, so the coordinator learns nothing the hospital's ε does not cover.

Pure functions of the replies; the ServerApp sends the requests (:mod:`server.server_app`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

IMPORTANCE_CHART = "importance.png"  # in the run folder, next to report.md and model.md
TOP_FEATURES = 3  # named in words in the report and the model card
CHART_FEATURES = 15  # bars in the chart at most (the most important first)


def aggregate_explanations(
    releases: list[dict[str, Any]], refused: list[dict[str, str]], features: list[str]
) -> dict[str, Any]:
    """Pool the hospitals' released sums into the global importance per feature.

    Parameters
    ----------
    releases : list of dict
        Per hospital that released: ``hospital``, ``n`` (test patients), ``signed`` and
        ``absolute`` (``[F]`` noisy sums), ``noise_multiplier``, ``clip``, ``epsilon_release``
        (ε of this release alone, at the run's δ) and ``epsilon`` (the run's ε there after it,
        None without sample-level DP).
    refused : list of dict
        ``{"hospital", "reason"}`` of every hospital that refused.
    features : list of str
        ``[F]`` feature names (:meth:`shared_models.tasks.Task.explained_features`).

    Returns
    -------
    dict
        ``features``, ``mean_abs``, ``mean_signed``, ``standard_error`` (``[F]`` each, logit
        units), ``n``, ``hospitals`` (the releases without their sums), ``refused`` and
        ``ranking`` (feature indices by decreasing mean |attribution|); ``mean_abs`` etc. are
        None when no hospital released.

    Raises
    ------
    ValueError
        A release whose length is not ``len(features)``.
    """
    width = len(features)
    for r in releases:
        if len(r["signed"]) != width or len(r["absolute"]) != width:
            raise ValueError(
                f"hospital {r['hospital']} released {len(r['signed'])} attributions; the task has "
                f"{width} features"
            )
    hospitals = [{k: v for k, v in r.items() if k not in ("signed", "absolute")} for r in releases]
    out: dict[str, Any] = {
        "features": list(features), "hospitals": hospitals, "refused": refused,
        "mean_abs": None, "mean_signed": None, "standard_error": None, "n": 0, "ranking": [],
    }  # fmt: skip
    n = sum(int(r["n"]) for r in releases)
    if not releases or n == 0:
        return out
    signed = np.sum([r["signed"] for r in releases], axis=0) / n
    absolute = np.sum([r["absolute"] for r in releases], axis=0) / n
    se = math.sqrt(sum((r["noise_multiplier"] * r["clip"]) ** 2 for r in releases)) / n
    out.update(
        mean_abs=absolute.tolist(), mean_signed=signed.tolist(), standard_error=[se] * width, n=n,
        ranking=[int(i) for i in np.argsort(-absolute, kind="stable")],
    )  # fmt: skip
    return out


SALIENCY_CHART = "saliency.png"  # chest X-rays: class-conditional mean image and saliency


def aggregate_saliency(
    releases: list[dict[str, Any]], refused: list[dict[str, str]]
) -> dict[str, Any]:
    """Pool the hospitals' class-conditional sums (:func:`client.explanations.release_saliency`)
    into each class's mean image and mean saliency map, with the noise's standard errors.

    Parameters
    ----------
    releases : list of dict
        Per hospital: ``hospital``, ``n``, ``saliency-c``, ``image-c`` (``[G*G]``), ``count-c``
        (``[1]``) for c in {0, 1}, ``noise_multiplier``, ``clip``, ``image_clip``,
        ``epsilon_release``, ``epsilon``.
    refused : list of dict
        ``{"hospital", "reason"}`` of every hospital that refused.

    Returns
    -------
    dict
        ``kind`` = ``"saliency"``, ``grid``, ``classes`` (per class: ``label``, ``count`` (the
        pooled noisy count), ``mean_saliency`` and ``mean_image`` (``[G*G]``), their noise
        standard errors ``saliency_se`` and ``image_se``), ``hospitals``, ``refused``; no
        ``classes`` when nobody released.
    """
    keys = [f"{k}-{c}" for c in (0, 1) for k in ("saliency", "image", "count")]
    hospitals = [{k: v for k, v in r.items() if k not in keys} for r in releases]
    out: dict[str, Any] = {"kind": "saliency", "hospitals": hospitals, "refused": refused,
                           "classes": [], "grid": 0}  # fmt: skip
    if not releases:
        return out
    cells = len(releases[0]["saliency-0"])
    out["grid"] = int(round(math.sqrt(cells)))
    noise = math.sqrt(3.0)  # the release's sensitivity on its unit scale
    for c in (0, 1):
        count = sum(float(r[f"count-{c}"][0]) for r in releases)
        n = max(count, 1.0)  # a noisy count may come out below 1
        sal = np.sum([r[f"saliency-{c}"] for r in releases], axis=0) / n
        img = np.sum([r[f"image-{c}"] for r in releases], axis=0) / n
        sal_se = math.sqrt(sum((noise * r["noise_multiplier"] * r["clip"]) ** 2 for r in releases)) / n  # fmt: skip
        img_se = math.sqrt(sum((noise * r["noise_multiplier"] * r["image_clip"]) ** 2 for r in releases)) / n  # fmt: skip
        out["classes"].append({
            "label": c, "count": count, "mean_saliency": sal.tolist(), "mean_image": img.tolist(),
            "saliency_se": sal_se, "image_se": img_se,
        })  # fmt: skip
    return out


def plot_saliency(path: Path, block: dict[str, Any], class_names: tuple[str, str]) -> bool:
    """Per class, the DP mean image next to the DP mean saliency map (red: evidence for the
    positive class). False (nothing written) without a release."""
    if not block.get("classes"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = block["grid"]
    fig, axes = plt.subplots(2, 2, figsize=(6, 6))
    limit = max(max(abs(v) for v in c["mean_saliency"]) for c in block["classes"]) or 1.0
    for row, c in zip(axes, block["classes"], strict=True):
        name = class_names[c["label"]]
        row[0].imshow(np.reshape(c["mean_image"], (g, g)), cmap="gray", vmin=-1, vmax=1)
        row[0].set_title(f"{name}: mean image (± {1.96 * c['image_se']:.2f})", fontsize=8)
        im = row[1].imshow(np.reshape(c["mean_saliency"], (g, g)), cmap="RdBu_r", vmin=-limit, vmax=limit)  # fmt: skip
        row[1].set_title(f"{name}: mean saliency (± {1.96 * c['saliency_se']:.3f})", fontsize=8)
        fig.colorbar(im, ax=row[1], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Released under DP (± 1.96 noise SE per cell)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _saliency_lines(block: dict[str, Any], positive_class: str) -> list[str]:
    lines = [
        "Integrated Gradients of the final model on each hospital's test images (reference: a "
        f"blank image), summed over {block['grid']} x {block['grid']} cells, clipped per image, "
        "summed per class with the class's images and counts, and released under DP by each "
        "hospital (charged to its ledger); pooled here. Nothing finer than these class means "
        "leaves a hospital.",
        "",
    ]
    if not block["classes"]:
        return [*lines, "No hospital released explanations."]
    lines += [f"![Class-conditional mean saliency]({SALIENCY_CHART})", ""]
    for c in block["classes"]:
        name = positive_class if c["label"] == 1 else f"not {positive_class}"
        lines.append(
            f"- {name}: {c['count']:.0f} images (noisy count); noise standard error per cell "
            f"{c['image_se']:.3f} on the mean image (channel 0: pixels in [-1, 1], or the "
            "scattering transform's low-pass), "
            f"{c['saliency_se']:.4f} logit on the mean saliency."
        )
    return lines


def top_features_text(block: dict[str, Any], positive_class: str = "the outcome") -> list[str]:
    """The top features in words, one sentence each (empty without a release)."""
    if block.get("mean_abs") is None:
        return []
    names, absolute, signed = block["features"], block["mean_abs"], block["mean_signed"]
    se = block["standard_error"][0]
    lines = []
    for rank, j in enumerate(block["ranking"][:TOP_FEATURES], start=1):
        direction = "raises" if signed[j] > 0 else "lowers"
        lines.append(
            f"{rank}. **{names[j]}**: moves the predicted risk of {positive_class} by "
            f"{absolute[j]:.3f} ± {1.96 * se:.3f} on average (mean |attribution|, logit units, "
            f"95% noise interval); on average it {direction} the risk relative to the reference "
            f"patient (signed mean {signed[j]:+.3f})."
        )
    return lines


def explanation_lines(block: dict[str, Any], chart: str | None, positive_class: str) -> list[str]:
    """The Markdown of the explanations section of ``report.md`` and ``model.md``."""
    if block.get("kind") == "saliency":
        return [*_saliency_lines(block, positive_class), *_hospital_lines(block)]
    lines = [
        "Feature attributions of the final model on each hospital's test patients (exact "
        "w_j·x_j for logistic regression, Integrated Gradients otherwise; reference patient: "
        "every input at the task's fixed centre), clipped per patient, summed and released "
        "under DP by each hospital and charged to its ledger; pooled here.",
        "",
    ]
    if block.get("mean_abs") is None:
        lines.append("No hospital released explanations.")
    else:
        if chart:
            lines += [f"![Feature importance]({chart})", ""]
        se = block["standard_error"][0]
        lines += [
            f"Error bars: ± 1.96 × the noise's standard error ({se:.4f} logit), the 95% interval "
            "of the DP noise alone (not of the patients' sampling). "
            f"{block['n']} test patients.",
            "",
            *top_features_text(block, positive_class),
        ]
    return [*lines, *_hospital_lines(block)]


def _hospital_lines(block: dict[str, Any]) -> list[str]:
    """ε per hospital of the release, and every hospital that refused."""
    lines: list[str] = []
    if block["hospitals"]:
        lines += ["", "| hospital | test patients | noise multiplier | clip C | ε of the release | ε of the run after it |", "|---|---|---|---|---|---|"]  # fmt: skip
        for h in block["hospitals"]:
            run_eps = "∞ / n/a" if h.get("epsilon") is None else f"{h['epsilon']:.3f}"
            lines.append(
                f"| {h['hospital']} | {h['n']} | {h['noise_multiplier']:g} | {h['clip']:g} | "
                f"{h['epsilon_release']:.3f} | {run_eps} |"
            )
    for r in block["refused"]:
        lines.append(f"- **{r['hospital']} refused**: {r['reason']}")
    return lines


def plot_importance(path: Path, block: dict[str, Any], *, title: str = "") -> bool:
    """Horizontal bar chart of the mean |attribution| (the most important features first, at
    most :data:`CHART_FEATURES`) with ± 1.96 standard-error bars. False (nothing written)
    without a release."""
    if block.get("mean_abs") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = block["ranking"][:CHART_FEATURES][::-1]
    names = [block["features"][j] for j in order]
    values = [block["mean_abs"][j] for j in order]
    colours = ["#c0392b" if block["mean_signed"][j] > 0 else "#2471a3" for j in order]
    err = 1.96 * block["standard_error"][0]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(order) + 1.2))
    ax.barh(names, values, xerr=err, color=colours, capsize=3)
    ax.set_xlabel(
        "mean |attribution| (logit), bars ± 1.96 noise SE\nred: raises the risk on average, blue: lowers it"
    )
    ax.set_title(title or "Feature importance, released under DP")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_explanations(run_dir: Path, block: dict[str, Any], positive_class: str) -> None:
    """The run folder's chart of ``block``: :data:`IMPORTANCE_CHART` or :data:`SALIENCY_CHART`."""
    if block.get("kind") == "saliency":
        plot_saliency(run_dir / SALIENCY_CHART, block, (f"not {positive_class}", positive_class))
    else:
        plot_importance(run_dir / IMPORTANCE_CHART, block)


__all__ = [
    "CHART_FEATURES",
    "IMPORTANCE_CHART",
    "SALIENCY_CHART",
    "aggregate_saliency",
    "plot_explanations",
    "plot_saliency",
    "TOP_FEATURES",
    "aggregate_explanations",
    "explanation_lines",
    "plot_importance",
    "top_features_text",
]
