"""Building real Flower Message / Context objects to call ClientApp handlers without an engine."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict


def use_task_identity() -> None:
    """Flower stamps messages with the task identity its runtime normally sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def make_context(run_config: dict, node_config: dict, run_id: int = 1) -> Context:
    """A hospital's Context (node 7) in Flower run ``run_id``, with a fresh, empty ``state``."""
    return Context(
        run_id=run_id, node_id=7, node_config=node_config, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip


def make_request(kind: str, model, server_round: int = 1) -> Message:  # type: ignore[no-untyped-def]
    """A ``train`` / ``evaluate`` request carrying ``model``'s weights for ``server_round``."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord({"server-round": server_round}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type=kind)


def unpack_app(dst: Path) -> Path:
    """The files of the fedcare FAB (built from the checkout as Flower builds it) unpacked into
    ``dst``: a second copy of the app, with the same bundle hash."""
    from client.approval import fab_bytes
    from server.run_config import APP_DIR
    from shared_models.fab import unpack_fab

    return unpack_fab(fab_bytes(APP_DIR), dst)


def permissive_policy(folder: Path) -> str:
    """A hospital policy file for a deployed test hospital that allows what a simulated one does
    (no DP, exact metrics, no caps): the path, for node config ``policy-path``."""
    path = folder / "permissive-policy.toml"
    path.write_text(
        "allow-non-dp = true\nexact-metrics = true\nmin-cohort = 0\nmax-delta = 0.1\n"
        "max-epsilon-per-run = 1000.0\nlifetime-epsilon = 100000.0\nmin-noise-multiplier = 0.0\n"
        "min-eval-noise-multiplier = 0.0\nmax-grad-norm = [0.0, 1000000.0]\n"
    )
    return str(path)


def run_fedcare_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Run ``fedcare ARGS`` in this process (the console script's ``main``): (exit code, stdout
    and stderr together)."""
    import sys

    from simulations import cli

    monkeypatch.setattr(sys, "argv", ["fedcare", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err
