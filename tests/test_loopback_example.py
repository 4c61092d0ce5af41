"""examples/loopback-federation.sh: the deployment flow of docs/deployment.md as one script. Its commands are
that page's (same commands, same options, same order), and it runs end to end: a coordinator
and three hospital daemons on loopback, one DP run, every process stopped at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil
import pytest
import typer

from shared_models.protocol import APP_DIR

SCRIPT = APP_DIR / "examples" / "loopback-federation.sh"
SHELL_OPERATORS = ("&", "&&", "|", ";", "||")


def fedcare_commands(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """``(command, options)`` of each `fedcare ...` command line in shell text, in order of first
    appearance: the subcommand (``server add-hospital``) and the option names it is given
    (values, redirections and comments left out)."""
    from simulations.cli import app

    root = typer.main.get_command(app)
    found: list[tuple[str, tuple[str, ...]]] = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # a line of an embedded program (python3 -c '...')
            continue
        if "fedcare" not in words:
            continue
        words = words[words.index("fedcare") + 1 :]
        end = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS or w[:1] == ">" or w[:2] == "2>"),
                   len(words))  # fmt: skip
        words = words[:end]
        group, path = root, []
        while isinstance(group, click.Group) and words and words[0] in group.commands:
            group = group.commands[words[0]]
            path.append(words.pop(0))
        if not path:  # `command -v fedcare`
            continue
        options = tuple(sorted({w.split("=")[0] for w in words if w.startswith("--")}))
        if (" ".join(path), options) not in found:
            found.append((" ".join(path), options))
    return found


def test_the_readme_flow_and_the_script_run_the_same_commands():
    readme = (APP_DIR / "docs" / "deployment.md").read_text()  # the README links this page
    assert "`examples/loopback-federation.sh`" in readme
    flow = readme.split("## A real federation")[1].split("```bash")[1].split("```")[0]
    commands = fedcare_commands(flow)
    assert [c for c, _ in commands] == [
        "server init", "server start", "client keygen", "server add-hospital", "simulate",
        "client approve", "client start", "server run", "server status",
    ]  # fmt: skip
    assert commands == fedcare_commands(SCRIPT.read_text())


def _leftovers(state: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if str(state) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
    return found


@pytest.mark.slow
def test_the_loopback_example_runs_end_to_end(tmp_path):
    """The script with one round (ROUNDS=1; its default is 2): PKI, coordinator, three
    hospitals' keys, approvals and daemons, a DP run that every hospital trains, keys 0600 in
    folders 0700, and no process left once it exits."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["ROUNDS"] = "1"
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT), str(state)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its daemons
        output, _ = proc.communicate(timeout=90)
    finally:
        for left in _leftovers(state):
            left.kill()
    took = time.monotonic() - started
    assert proc.returncode == 0, output[-6000:]
    assert "hospitals: 3 of 3 online (a, b, c)" in output and "round   1/1" in output, output
    summary = json.loads((state / "runs" / "first" / "summary.json").read_text())
    assert {h["name"]: h["rounds_trained"] for h in summary["hospitals"]} == dict.fromkeys("abc", 1)
    assert all(0 < h["epsilon"] <= 2.0 for h in summary["hospitals"]) and not summary["failures"]
    for key in ("pki-ca/ca.key", "pki/server.key", "hospital-a/keys/a.key"):
        assert (state / key).stat().st_mode & 0o777 == 0o600, key
        assert (state / key).parent.stat().st_mode & 0o777 == 0o700, key
    assert _leftovers(state) == [], "the script left processes running"
    print(f"loopback example: {took:.1f} s")
