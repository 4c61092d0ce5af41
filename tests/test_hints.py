"""Every `fedcare ...` command that a message or help text shows the user parses with the real
command line: the command exists, every option it names exists, and a command line (a command
with arguments or options) gives every required option and argument unless it ends in ``...``;
a bare command name (`fedcare client keygen`) refers to the command. The commands are found in
the source of fedcare's packages (string literals, f-strings with their fields as placeholders;
docstrings and comments excluded)."""

from __future__ import annotations

import ast
import re

import click
import pytest
import typer

from shared_models.protocol import APP_DIR
from simulations.cli import app

PACKAGES = ("server", "client", "shared_models", "simulations")
HINT = re.compile(r"(?<!`)`(fedcare(?: [^`]*)?)`(?!`)")
FIELD = "X"  # an f-string field's value in a hint


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else FIELD for v in node.values)
    return None


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and _text(body[0].value) is not None:
                found.add(id(body[0].value))
    return found


def hints() -> list[tuple[str, str]]:
    """(where, command) for every hinted command in the packages' source."""
    found = []
    for package in PACKAGES:
        for path in sorted((APP_DIR / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skip = _docstrings(tree)  # and an f-string's pieces: read with the f-string
            skip |= {
                id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values
            }
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant | ast.JoinedStr) and id(node) not in skip:
                    text = _text(node)
                    for command in HINT.findall(text or ""):
                        where = f"{path.relative_to(APP_DIR)}:{node.lineno}"
                        found.append((where, command))
    return found


def check_command(command: str) -> None:
    """Parse ``fedcare ARGS`` as the real CLI would (no type conversion: fields are
    placeholders); raise AssertionError naming what is wrong."""
    words = command.split()[1:]
    partial = bool(words) and words[-1] == "..."
    words = [w for w in words if w != "..."]
    cmd: click.Command = typer.main.get_command(app)
    path = ["fedcare"]
    while isinstance(cmd, click.Group) and words and words[0] in cmd.commands:
        cmd = cmd.commands[words[0]]
        path.append(words.pop(0))
    assert not isinstance(cmd, click.Group), f"{' '.join(path)} is not a command"
    ctx = click.Context(cmd, info_name=" ".join(path))
    parser = cmd.make_parser(ctx)
    try:
        opts, extra, _ = parser.parse_args(list(words))  # it consumes its list
    except click.UsageError as exc:  # an unknown option, an option without its value
        raise AssertionError(exc.format_message()) from None
    assert not extra, f"{' '.join(path)} takes no argument(s) {extra}"
    if words and not partial:  # a command line, not a reference to the command
        missing = [p.opts[0] if p.opts else p.name for p in cmd.params
                   if p.required and opts.get(p.name) in (None, ())]  # fmt: skip
        assert not missing, f"{' '.join(path)} also needs {', '.join(missing)}"


HINTS = hints()


def test_hints_are_found():
    commands = {command for _, command in HINTS}
    assert "fedcare server add-hospital NAME NAME.pub --pki X" in commands, sorted(commands)
    assert len(HINTS) > 20


@pytest.mark.parametrize(("where", "command"), HINTS, ids=[f"{w} {c}" for w, c in HINTS])
def test_every_hinted_command_parses(where, command):
    check_command(command)


def test_the_checker_catches_incomplete_and_unknown_commands():
    with pytest.raises(AssertionError, match="add-hospital also needs --pki"):
        check_command("fedcare server add-hospital YOUR_NAME a.pub")
    with pytest.raises(AssertionError, match="No such option '--nope'"):
        check_command("fedcare client keygen --out X --nope")
    with pytest.raises(AssertionError, match="takes no argument"):
        check_command("fedcare server status --pki X extra")
    with pytest.raises(AssertionError, match="fedcare server is not a command"):
        check_command("fedcare server")
    check_command("fedcare client start --key X ...")  # partial by its own words
    check_command("fedcare client keygen")  # the command's name, for reference
