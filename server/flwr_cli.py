"""Calling Flower's own ``flwr`` CLI (register SuperNodes, submit and follow runs) with a
connection that fedcare writes into a private ``FLWR_HOME``.

Flower 1.41 keeps connections in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]`` with
``address`` and ``root-certificates``); a fedcare-owned FLWR_HOME keeps the user's ``~/.flwr``
untouched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from shared_models.runtime import child_env, flower_executable

CONNECTION = "fedcare"


class FlowerCLIError(RuntimeError):
    """The ``flwr`` CLI failed; the message carries its output."""


class FlowerCLI:
    """``flwr`` bound to one SuperLink connection.

    Parameters
    ----------
    home : Path
        FLWR_HOME to use (created; ``config.toml`` is rewritten).
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : Path
        CA certificate that signed the SuperLink's TLS certificate.
    """

    def __init__(self, home: Path, address: str, root_certificates: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{address}"\n'
            f'root-certificates = "{root_certificates.resolve()}"\n'
        )
        self.env = child_env(FLWR_HOME=str(home))

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` (the connection name is appended by the caller where needed)."""
        return subprocess.run(
            [flower_executable("flwr"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and parse its answer.

        Raises
        ------
        FlowerCLIError
            Non-JSON output or ``"success": false``.
        """
        proc = self.run(*args, "--format", "json", timeout=timeout)
        try:
            data = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            raise FlowerCLIError(_explain(proc.stdout + proc.stderr)) from None
        if not data.get("success", True):
            raise FlowerCLIError(_explain(str(data.get("error-message", data))))
        return data

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start ``flwr ARGS`` with its output on a pipe (e.g. ``flwr log RUN --stream``)."""
        return subprocess.Popen(
            [flower_executable("flwr"), *args],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip


def _explain(output: str) -> str:
    text = " ".join(output.split())
    if "unavailable" in text.lower():
        return (
            f"{text} -- the coordinator could not be reached, or its certificate did not verify "
            "with the given CA; check --superlink and the PKI folder"
        )
    return text
