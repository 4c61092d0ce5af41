"""MkDocs hook: pages generated at build time, so that they cannot go stale.

- ``run-settings.md``: every key of ``[tool.flwr.app.config]`` in ``pyproject.toml`` (the run-config
  schema Flower reads), with its default and the comment beside it as its help.
- ``benchmark-results/``: the benchmark reports ``benchmarks/RESULTS*.md`` and the figures they
  show (``benchmarks/results/*.png``), copied unchanged.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = "benchmark-results"
_KEY_LINE = re.compile(r'^"(?P<key>[^"]+)"\s*=\s*(?P<value>[^#]+?)\s*(?:#\s*(?P<help>.*))?$')


def run_settings(pyproject: Path = REPO / "pyproject.toml") -> list[tuple[str, str, str]]:
    """The run-config keys of ``pyproject.toml``, in file order.

    Parameters
    ----------
    pyproject : Path
        The app's ``pyproject.toml``.

    Returns
    -------
    list of (str, str, str)
        ``(key, default as written in TOML, the line's comment or "")``.

    Raises
    ------
    ValueError
        If a key of the table is not on a line of its own (``"key" = value  # help``), so that
        the page would miss it.
    """
    text = pyproject.read_text()
    declared = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    section = text.split("[tool.flwr.app.config]", 1)[1].split("\n[", 1)[0]
    rows = []
    for line in section.splitlines():
        match = _KEY_LINE.match(line.strip())
        if match:
            rows.append((match["key"], match["value"], (match["help"] or "").strip()))
    if [key for key, _, _ in rows] != list(declared):
        raise ValueError(
            "pyproject.toml [tool.flwr.app.config]: write each key on one line as "
            '"key" = value  # help, so that docs/run-settings can list it'
        )
    return rows


def render_run_settings(pyproject: Path = REPO / "pyproject.toml") -> str:
    """The Markdown of the run-settings reference page, grouped by the key's prefix."""
    lines = [
        "# Run settings reference",
        "",
        "Generated at build time from `[tool.flwr.app.config]` in `pyproject.toml`, the run-config",
        "schema: each key, its default and the comment beside it. Set a key with",
        "`--run-config \"train.lr=0.2 model.name='logreg'\"` or a `.toml` file; string values need",
        "quotes. How the training settings are chosen when not set: "
        "[Where the training settings come from](simulation.md#where-the-training-settings-come-from).",
    ]
    group = None
    for key, value, help_text in run_settings(pyproject):
        prefix = key.split(".", 1)[0]
        if prefix != group:
            group = prefix
            lines += ["", f"## `{prefix}.*`", "", "| key | default | help |", "|---|---|---|"]
        help_cell = help_text.replace("|", "\\|")
        lines.append(f"| `{key}` | `{value}` | {help_cell} |")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """Add the generated pages and the copied benchmark reports to the site."""
    files.append(File.generated(config, "run-settings.md", content=render_run_settings()))
    bench = REPO / "benchmarks"
    for report in sorted(bench.glob("RESULTS*.md")):
        files.append(
            File.generated(config, f"{RESULTS_DIR}/{report.name}", abs_src_path=str(report))
        )
    for figure in sorted((bench / "results").glob("*.png")):
        uri = f"{RESULTS_DIR}/results/{figure.name}"
        files.append(File.generated(config, uri, abs_src_path=str(figure)))
    return files
