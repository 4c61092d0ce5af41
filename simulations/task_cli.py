"""``fedcare task``: draft a task file from a local CSV, and check a task file.

A task file (:mod:`shared_models.tasks.taskfile`) is what a consortium writes once for its own
tabular task. ``fedcare simulate`` and ``fedcare client check`` take it from wherever it lives;
for a deployment it goes into the app's ``tasks/`` folder, so it travels in the bundle every
hospital approves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.run_config import UsageError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)


@app.command()
def draft(
    data: Annotated[Path, typer.Option(help="One hospital's CSV export (with a header row).")],
    label: Annotated[str, typer.Option(help="The label column.")],
    out: Annotated[Path, typer.Option(help="The task file to write (never overwritten).")],
    name: Annotated[
        str | None, typer.Option(help="Task name (default: from the --out file name).")
    ] = None,
    fill_ranges: Annotated[
        bool,
        typer.Option(
            "--fill-ranges",
            help="Fill each numeric range with this file's smallest and largest values "
            "(they reveal this hospital's extremes; replace them with the data dictionary's).",
        ),
    ] = False,
) -> None:
    """Draft a task file from a local CSV: columns, inferred types, levels, label values.

    The valid ranges are left for the consortium to fill from its data dictionary (the draft
    fails `fedcare task check` until they are), unless --fill-ranges takes them from the file.
    """
    from shared_models.tasks.draft import draft_task_file, task_name_from
    from shared_models.tasks.table import read_csv_table
    from shared_models.tasks.taskfile import TaskFileError, parse_task_text

    if out.exists():
        raise UsageError(f"{out} exists; choose another --out (a task file is never overwritten)")
    frame = read_csv_table(data)  # DataError: one message naming the file
    task_name = name or task_name_from(out.stem)
    try:
        text = draft_task_file(
            frame, label=label, name=task_name, source=data.name, fill_ranges=fill_ranges
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    console.print(f"wrote {out}: task {task_name}, {len(frame.columns)} columns of {data.name}")
    if fill_ranges:
        console.print(
            f"[yellow]warning:[/] the ranges in {out} are this hospital's smallest and largest "
            "values: they reveal its extreme patients. Replace them with the ranges of the "
            "consortium's data dictionary before the file leaves this hospital.",
            highlight=False,
        )
    try:
        parse_task_text(text, source=str(out))
        console.print(f"next: review it, then `fedcare task check {out}`")
    except TaskFileError as exc:
        console.print(f"to do before `fedcare task check` passes: {exc}", highlight=False)


@app.command()
def check(
    task_file: Annotated[Path, typer.Argument(help="The task file (TOML) to validate.")],
) -> None:
    """Validate a task file strictly and summarise it (exit code 2 with the problem, else 0)."""
    from shared_models.tasks import TASKS_DIR
    from shared_models.tasks.taskfile import parse_task_file

    spec = parse_task_file(task_file)  # TaskFileError (a DataError): one message, exit 2
    console.print(f"{task_file}: valid task file for task {spec.name}", highlight=False)
    console.print(f"  {spec.description}", highlight=False)
    lab = spec.label
    console.print(
        f"  label '{lab.column}': positive {', '.join(map(str, lab.positive))}; "
        f"negative {', '.join(map(str, lab.negative))}",
        highlight=False,
    )
    for f in spec.features:
        if f.type == "numeric":
            what = f"numeric [{f.min:g}, {f.max:g}]{' ' + f.unit if f.unit else ''}"
        else:
            what = f"{f.type}: {', '.join(map(str, f.levels))}"
        console.print(f"  {f.name}: {what}; if missing: {f.if_missing}", highlight=False)
    if spec.ignore:
        console.print(f"  not used: {', '.join(spec.ignore)}", highlight=False)
    for p in spec.preprocessings:
        console.print(
            f"  preprocessing '{p}': {len(spec.output_columns(p))} model inputs", highlight=False
        )
    installed = TASKS_DIR / f"{spec.name}.toml"
    if task_file.resolve() != installed.resolve():
        console.print(
            f"to simulate: `fedcare simulate --task {task_file} --data-dir DIR`; to deploy: copy "
            f"it to {installed} (the app bundle the hospitals approve), then `fedcare server run --pki DIR "
            f"--task {spec.name}`",
            highlight=False,
        )
