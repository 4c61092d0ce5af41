"""The model card ``model.md``: a page a hospital's reviewer can read and sign off.

Written next to every final model (``model.safetensors`` and its JSON card ``model.json``) at the
end of ``fedcare simulate`` and ``fedcare server run``. Its sections follow Mitchell et al.,
"Model Cards for Model Reporting" (FAT* 2019; model details, intended use, factors, metrics,
training data, caveats) and the TRIPOD+AI items that apply to a federated model (Collins et al.,
BMJ 2024;385:e078378: source of data and participants per centre, sample size, predictors and
preprocessing, model building, performance measures and their method, limitations,
reproducibility).

Only what the run folder already holds is used: ``model.json``, ``summary.json``,
``history.json`` (what the hospitals' replies released) and the run config recorded in the last
checkpoint's sidecar; nothing a hospital did not release. The hospitals' names and train/test
sizes are public in fedcare (README, "What leaves a hospital").
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.run_config import UsageError

MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class SavedModel:
    """A final model and its card: ``weights`` (safetensors path), ``card`` (``model.json``)."""

    weights: Path
    card: dict[str, Any]

    @property
    def task(self) -> str:
        return str(self.card["task"])


def locate_model(model: Path) -> SavedModel:
    """The weights and model card of a run folder (``model.safetensors`` + ``model.json``) or of
    a model file (``X.safetensors`` + ``X.json``).

    Raises
    ------
    UsageError
        The weights or the card are missing, unreadable, or the card lacks ``task``, ``model``
        (with its ``name``) or ``preprocessing``.
    """
    weights = model / MODEL_FILE if model.is_dir() else model
    if not weights.is_file():
        raise UsageError(
            f"--model {model}: no model file there; pass the run folder of `fedcare simulate` or "
            f"`fedcare server run`, or its {MODEL_FILE}"
        )
    card_path = weights.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{card_path}: the model card next to {weights.name} is missing or unreadable ({exc})"
        ) from None
    missing = [k for k in ("task", "model", "preprocessing") if k not in card]
    if missing or not isinstance(card.get("model"), dict) or "name" not in card["model"]:
        raise UsageError(
            f"{card_path}: the model card lacks {', '.join(missing) or 'model.name'}; it was not "
            "written by fedcare"
        )
    return SavedModel(weights, card)


MODEL_CARD = "model.md"
SECTIONS = (
    "Model details",
    "Intended use",
    "Out-of-scope uses",
    "Hospitals (training data)",
    "Training",
    "Privacy",
    "Performance",
    "Known limitations",
    "How to reproduce",
)
_REFERENCES = (
    "Mitchell et al., *Model Cards for Model Reporting*, FAT* 2019; "
    "Collins et al., *TRIPOD+AI*, BMJ 2024;385:e078378"
)
_METRICS = ("auroc", "auprc", "accuracy")


def write_model_card(run_dir: Path) -> Path | None:
    """Write ``run_dir/model.md`` from the run folder's ``model.json`` and ``summary.json``.

    Sections as in Mitchell et al. (2019) and the applicable TRIPOD+AI items (Collins et al.,
    2024); see :func:`render_model_card`.

    Parameters
    ----------
    run_dir : Path
        A run folder holding ``model.json`` and ``summary.json`` (``history.json`` and
        ``checkpoints/round-NNN.json`` are read when present).

    Returns
    -------
    Path or None
        The path written; None when the folder has no final model or no summary yet.
    """
    card_path, summary_path = run_dir / "model.json", run_dir / "summary.json"
    if not card_path.exists() or not summary_path.exists():
        return None
    card = json.loads(card_path.read_text())
    summary = json.loads(summary_path.read_text())
    history_path = run_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    text = render_model_card(
        card,
        summary,
        history=history,
        run_config=_recorded_run_config(run_dir),
        parameters=_parameter_count(run_dir / "model.safetensors"),
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out = run_dir / MODEL_CARD
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def render_model_card(
    card: dict[str, Any],
    summary: dict[str, Any],
    *,
    history: dict[str, Any] | None = None,
    run_config: dict[str, Any] | None = None,
    parameters: int | None = None,
    date: str = "",
) -> str:
    """The Markdown of ``model.md``.

    Sections (:data:`SECTIONS`): model details; intended use and out-of-scope uses (Mitchell et
    al. 2019, sections 4.1-4.2; TRIPOD+AI items 3, 27); the hospitals (TRIPOD+AI items 5-8:
    source and size per centre); training (item 12); privacy; performance with its method (items
    12, 23); known limitations (item 26); how to reproduce (item 18).

    Parameters
    ----------
    card : dict
        ``model.json`` (the ServerApp's JSON model card).
    summary : dict
        ``summary.json`` (:func:`server.report.build_summary`, plus what ``fedcare simulate``
        adds: ``positive_class``, ``quality_warnings``, ``test_split_auroc``).
    history : dict, optional
        ``history.json``: the hospitals' replies (for the noise multiplier they released and the
        rounds each missed).
    run_config : dict, optional
        The Flower run config the coordinator recorded (kebab-case keys).
    parameters : int, optional
        Number of parameters (elements of ``model.safetensors``).
    date : str
        When the card was written.
    """
    history = history or {}
    lines = [
        f"# Model card: {card.get('task') or summary.get('task')} "
        f"({(card.get('model') or {}).get('name') or summary.get('model')})",
        "",
        f"Sections after {_REFERENCES}. Every figure below comes from this run folder "
        "(`model.json`, `summary.json`, `history.json`): what the hospitals released, nothing "
        "else.",
        "",
    ]
    for title, body in (
        ("Model details", _details(card, summary, parameters, date)),
        ("Intended use", _intended_use(card, summary)),
        ("Out-of-scope uses", _out_of_scope()),
        ("Hospitals (training data)", [*_hospitals(summary), *_training_data(card)]),
        ("Training", _training(card, summary)),
        ("Privacy", _privacy(summary, history)),
        ("Performance", _performance(summary)),
        *(
            [("Explanations (released under DP)", _explanations(card, summary))]
            if summary.get("explanations")
            else []
        ),
        ("Known limitations", _limitations(summary)),
        ("How to reproduce", _reproduce(summary, run_config)),
    ):
        lines += [f"## {title}", "", *body, ""]
    return "\n".join(lines)


def _details(card: dict, summary: dict, parameters: int | None, date: str) -> list[str]:
    model = card.get("model") or {}
    versions = card.get("versions") or {}
    shape = model.get("input_shape")
    rows = [
        f"- **Task**: `{card.get('task') or summary.get('task')}`"
        + (f": {d}" if (d := _task_description(card.get("task") or "")) else ""),
        "- **Label 1 means**: " + _positive_class(card, summary),
        f"- **Model**: `{model.get('name') or summary.get('model')}`"
        + (f" (hidden {model['hidden']})" if model.get("hidden") else ""),
        f"- **Input shape**: `{list(shape)}` per example" if shape else "- **Input shape**: n/a",
        f"- **Parameters**: {parameters:,}" if parameters is not None else "- **Parameters**: n/a",
        f"- **Preprocessing**: `{_preprocessing(card)}`",
        f"- **Run id**: `{summary.get('run_id', 'n/a')}`",
        f"- **Card written**: {date or 'n/a'}",
    ]
    if versions:
        rows.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return rows


def _intended_use(card: dict, summary: dict) -> list[str]:
    task = card.get("task") or summary.get("task")
    description = _task_description(task or "")
    what = f"{description[0].lower()}{description[1:]}" if description else f"the task `{task}`"
    return [
        f"Decision-support **research** on {what}, by the consortium of hospitals listed below, "
        "and as the starting point of an external validation (`fedcare evaluate`) at a hospital "
        "that wants to use it.",
        "",
        f"The JSON card says: *{card.get('intended_use', 'n/a')}*.",
    ]


def _out_of_scope() -> list[str]:
    return [
        "- Clinical decisions about individual patients: the model is **not validated for "
        "clinical use** unless it has been externally validated on the intended population "
        "(e.g. with `fedcare evaluate` on that hospital's own records) and approved there.",
        "- Populations, settings or data formats other than the task's (other hospitals, "
        "other feature definitions or units, another preprocessing).",
        "- Any use where a miscalibrated or wrong prediction is not caught by a clinician.",
    ]


def _hospitals(summary: dict) -> list[str]:
    failures = summary.get("failures") or []
    rounds = summary.get("rounds")
    rows = [
        "Names and the number of training/test patients are public in fedcare (README, "
        '"What leaves a hospital").',
        "",
        "| hospital | n_train | n_test | rounds trained | rounds missed |",
        "|---|---|---|---|---|",
    ]
    for h in summary.get("hospitals") or []:
        missed = sorted(
            {
                int(f["round"])
                for f in failures
                if f["hospital"] == h["name"] and f["kind"] == "train"
            }
        )
        trained = f"{h.get('rounds_trained', 'n/a')}" + (f" of {rounds}" if rounds else "")
        rows.append(
            f"| {h['name']} | {_v(h.get('n_train'))} | {_v(h.get('n_test'))} | {trained} | "
            f"{', '.join(map(str, missed)) if missed else 'none'} |"
        )
    return rows


def _training_data(card: dict) -> list[str]:
    """The outcome prevalence the card records (``training_data``), marked exact (simulation)
    or released (deployment), for ``fedcare evaluate``'s shift warnings."""
    data = card.get("training_data")
    if not data:
        return []
    per = data.get("hospitals") or {}
    parts = ", ".join(f"{name} {h['prevalence']:.1%}" for name, h in per.items())
    pooled = data.get("prevalence")
    features = len(data.get("features") or {})
    return [
        "",
        f"Outcome prevalence in the training splits: {'n/a' if pooled is None else format(pooled, '.1%')}"
        + (f" ({parts})" if parts else "")
        + f". Source: {data['provenance']}."
        + (
            f" Distributions of {features} model inputs (mean, sd, range) are in `model.json`."
            if features
            else ""
        ),
    ]


def _training(card: dict, summary: dict) -> list[str]:
    rows = [
        f"- **Strategy**: `{summary.get('strategy') or (card.get('training') or {}).get('strategy')}`",
        f"- **Rounds**: {summary.get('rounds')}",
    ]
    settings = summary.get("run_settings") or {}
    if settings:
        rows += ["", "| setting | value | from |", "|---|---|---|"]
        rows += [
            f"| `{key}` | {_v(row.get('value'))} | {row.get('source', 'n/a')} |"
            for key, row in settings.items()
        ]
    sa = summary.get("secure_aggregation") or {}
    if sa.get("enabled"):
        rows += ["", f"- **Secure aggregation**: {sa.get('protocol')}"]
    if pe := summary.get("personalization"):
        rows += [
            "",
            f"- **Personalisation**: `{pe['method']}` ({pe['epochs']:g} local epoch(s), lr "
            f"{pe['lr']:g}" + (f", λ {pe['lam']:g}" if pe["method"] == "ditto" else "") + "). "
            "This card's model is the global one; each hospital's personal model stayed at the "
            "hospital (see report.md, 'Personal models').",
        ]
    return rows


def _privacy(summary: dict, history: dict) -> list[str]:
    dp = summary.get("dp") or {}
    if not dp.get("enabled"):
        return [
            "**none: trained without DP** (no differential privacy for any hospital's patients)."
        ]
    rows = [f"- **Level**: {dp.get('level')}-level DP", f"- **Guarantee**: {dp.get('guarantee')}"]
    rows.append(f"- **Target**: ε = {_v(dp.get('target_epsilon'))}, δ = {_v(dp.get('delta'))}")
    if dp.get("level") == "sample":
        sigmas = _released_noise_multipliers(history)
        rows += [
            f"- **Accountant**: {dp.get('accountant')}",
            f"- **max_grad_norm** (per-sample clipping): {_v(dp.get('max_grad_norm'))}",
            f"- **Evaluation noise multiplier**: {_v(dp.get('eval_noise_multiplier'))}",
            "",
            "| hospital | ε (spent, cumulative) | δ | noise multiplier |",
            "|---|---|---|---|",
        ]
        rows += [
            f"| {h['name']} | {_v(h.get('epsilon'))} | {_v(h.get('delta'))} | "
            f"{_v(sigmas.get(h['name']))} |"
            for h in summary.get("hospitals") or []
        ]
    else:
        rows += [
            "- **Accountant**: RDP (Flower client-level DP)",
            f"- **Clipping norm**: {_v(dp.get('clipping_norm'))}",
            "- **Noise multiplier**: "
            + (
                _v(sigma)
                if (sigma := dp.get("noise_multiplier_set"))
                else "calibrated to the target ε"
            ),
            f"- **ε spent** (released models): {_v(dp.get('epsilon'))} over "
            f"{dp.get('releases', 0)} release(s)",
        ]
    return rows


def _performance(summary: dict) -> list[str]:
    ov = summary.get("overall") or {}
    rows = [
        "| AUROC | AUPRC | accuracy |",
        "|---|---|---|",
        "| " + " | ".join(_v(ov.get(m)) for m in _METRICS) + " |",
        "",
        f"Method: {ov.get('method', 'n/a')}.",
        "",
    ]
    validation = summary.get("validation")
    if validation and "skipped" not in validation:
        from server.report import validation_lines

        rows += validation_lines(validation, level=3)
        rows += ["", "Validate on your own patients with `fedcare evaluate` before any use."]
    else:
        rows.append(
            "No confidence intervals or calibration were computed for this run (a deployment's "
            "figures come from the hospitals' releases): validate externally with "
            "`fedcare evaluate` before any use."
        )
    hospitals = summary.get("hospitals") or []
    if any(h.get("metrics") for h in hospitals):
        rows += [
            "",
            "| hospital | evaluation | AUROC | AUPRC | accuracy |",
            "|---|---|---|---|---|",
        ]
        rows += [
            f"| {h['name']} | {h.get('evaluation') or 'n/a'} | "
            + " | ".join(_v((h.get("metrics") or {}).get(m)) for m in _METRICS)
            + " |"
            for h in hospitals
        ]
        rows += [
            "",
            "Per-hospital figures of a deployment may come from DP-noised score histograms "
            "(column *evaluation*): on small test splits they can be far from the exact values.",
        ]
    return rows


def _explanations(card: dict, summary: dict) -> list[str]:
    """The DP feature importance (chart, top features in words, ε per hospital)."""
    from server.explanations import IMPORTANCE_CHART, explanation_lines

    return explanation_lines(
        summary["explanations"], IMPORTANCE_CHART, _positive_class(card, summary)
    )


def _limitations(summary: dict) -> list[str]:
    rows = []
    if (summary.get("dp") or {}).get("enabled"):
        rows.append("- DP noise lowers accuracy and makes the released metrics noisier.")
    small = [h for h in summary.get("hospitals") or [] if (h.get("n_test") or 0) < 100]
    if small:
        rows.append(
            "- Small test splits (fewer than 100 patients: "
            + ", ".join(f"{h['name']} {_v(h.get('n_test'))}" for h in small)
            + "): their figures are uncertain."
        )
    if summary.get("failures"):
        rows.append(f"- {len(summary['failures'])} message(s) missed by hospitals (table above).")
    rows += [f"- Quality warning: {w}" for w in summary.get("quality_warnings") or []]
    rows.append(
        "- The test splits come from the training hospitals: no external validation is part of "
        "this run."
    )
    return rows


def _reproduce(summary: dict, run_config: dict | None) -> list[str]:
    command = summary.get("command")
    if command:
        return ["```", command, "```"]
    rows = [
        "No command line was recorded; the run config the coordinator recorded "
        "(`checkpoints/round-NNN.json`; the training settings' sources are in *Training*):"
    ]
    if not run_config:
        return [*rows[:-1], "No command line or run config was recorded in this run folder."]
    body = [
        f"{key} = {json.dumps(value)}"
        for key, value in sorted(run_config.items())
        if isinstance(value, (bool, int, float, str)) and key != "run.settings-from"
    ]
    return [*rows, "", "```toml", *body, "```"]


def _released_noise_multipliers(history: dict) -> dict[str, float]:
    """Each hospital's latest released DP-SGD noise multiplier (train reply ``noise-multiplier``)."""
    from server.history import RunHistory  # reads run folders of older fedcare as well

    out: dict[str, float] = {}
    for ev in RunHistory.from_dict(history).events:
        sigma = ev.metrics.get("noise-multiplier")
        if ev.kind == "train" and not ev.error and sigma is not None:
            out[ev.hospital] = sigma
    return out


def _recorded_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run config of the run's last checkpoint sidecar (``checkpoints/round-NNN.json``)."""
    sidecars = sorted((run_dir / "checkpoints").glob("round-[0-9]*[0-9].json"))
    for path in reversed(sidecars):
        try:
            return json.loads(path.read_text()).get("run_config")
        except (OSError, ValueError):
            continue
    return None


def _parameter_count(weights: Path) -> int | None:
    """Elements of every tensor in a safetensors file (None when it is missing)."""
    if not weights.exists():
        return None
    import math

    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        names = f.keys()
        return sum(math.prod(f.get_slice(k).get_shape()) for k in names)


def _positive_class(card: dict, summary: dict) -> str:
    """What label 1 means: the run's (``fedcare simulate`` records it) or the task's declaration."""
    if summary.get("positive_class"):
        return str(summary["positive_class"])
    try:
        from shared_models.tasks import get_task

        return f"{get_task(card.get('task') or '').positive_class} (as the task declares it)"
    except (ImportError, ValueError):
        return "not recorded in this run folder"


def _preprocessing(card: dict) -> str:
    """The card's preprocessing, with the name ``default`` resolves to for its task."""
    name = card.get("preprocessing") or "default"
    try:
        from shared_models.tasks import get_task

        resolved = get_task(card.get("task") or "").resolve_preprocessing(name)
    except (ImportError, ValueError):
        return name
    return name if resolved == name else f"{name} (= {resolved})"


def _task_description(name: str) -> str:
    """The ``[task] description`` of a task file (the app's ``tasks/`` folder or one registered
    for this simulation); empty when the task has none."""
    if not name:
        return ""
    try:
        from shared_models.tasks import _SIMULATION_TASK_TEXTS as texts
        from shared_models.tasks import TASKS_DIR

        path = Path(TASKS_DIR) / f"{name}.toml"
        text = texts.get(name) or (path.read_text() if path.exists() else "")
        return str(tomllib.loads(text).get("task", {}).get("description", "")) if text else ""
    except (ImportError, OSError, tomllib.TOMLDecodeError):
        return ""


def _v(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
