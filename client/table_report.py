"""The per-column report of a hospital's table against a task file (``fedcare client check``).

Counts only: rows, label balance, and per column the missing rate, values of the wrong type and
values outside the task's valid range -- never a value, so the report can be pasted into a
ticket or shown to the consortium.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared_models.tasks import Task, get_task
from shared_models.tasks.table import TableReport


def task_for_check(task: str) -> Task:
    """The task named ``task``, or the task file at that path (``*.toml``).

    Raises
    ------
    ValueError
        Unknown task name (the message lists the known ones).
    shared_models.tasks.TaskFileError
        The task file is missing or invalid.
    """
    if task.endswith(".toml"):
        from shared_models.tasks.tabular import task_from_file

        return task_from_file(Path(task))
    return get_task(task)


def print_table_report(console: Console, report: TableReport) -> None:
    """Print ``report``: a summary line, the label balance, one table row per column, and the
    problems (each naming the file, the column and the row count)."""
    if report.format_error:
        console.print(f"[red]{report.format_error}[/]", highlight=False)
        return
    verdict = "[green]valid[/]" if report.ok else "[red]does not match[/]"
    console.print(
        f"{report.source}: {report.rows} rows, {verdict} task {report.task}"
        + (
            f"; {report.dropped_rows} row(s) with a missing value are dropped, "
            f"{report.usable_rows} used"
            if report.dropped_rows
            else ""
        ),
        highlight=False,
    )
    labelled = report.positives + report.negatives
    if labelled:
        console.print(
            f"label: {report.positives} positive ({report.positives / labelled:.0%}), "
            f"{report.negatives} negative",
            highlight=False,
        )
    table = Table(title="per column (counts; no values are shown)")
    for name, justify in (
        ("column", "left"), ("type", "left"), ("missing", "right"),
        ("wrong type", "right"), ("out of range", "right"), ("declared", "left"),
    ):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    n = max(report.rows, 1)
    for c in report.columns:
        table.add_row(
            c.column,
            c.kind,
            f"{c.missing} ({c.missing / n:.0%})" if c.missing else "0",
            str(c.wrong_type) if c.wrong_type else "",
            str(c.out_of_range) if c.out_of_range else "",
            c.detail,
        )
    for name in report.missing_columns:
        table.add_row(name, "[red]missing from the file[/]", "", "", "", "")
    for name in report.extra_columns:
        table.add_row(name, "[red]not in the task[/]", "", "", "", "")
    console.print(table)
    for problem in report.problems():
        console.print(f"[red]problem:[/] {problem}", highlight=False)
