"""The hospital's task launcher: Flower's SuperExec loop, launching only approved app bundles.

``fedcare client start`` runs ``flower-supernode --isolation process``, so the SuperNode itself
starts nothing; this process takes its place as the SuperExec. It mirrors
``flwr.supercore.superexec.run_superexec.run_superexec`` (acquire a task from the SuperNode's
Runtime API, launch ``flwr-clientapp`` for it with Flower's ``SubprocessExecutor``), with one
difference, made in :class:`ApprovedBundlePlugin` (a Flower ``ExecPlugin``):

* the task's ``fab_hash`` (the SHA-256 of the run's FAB; the SuperNode stores a FAB only under
  the SHA-256 of its content, ``CoreState.store_fab``) is in the ledger's ``approved.json``:
  ``flwr-clientapp`` is started as Flower would start it;
* otherwise the bundle is neither installed nor imported: the message is answered here, with
  an error reply ``"hospital NAME refused: app bundle <sha256> is not approved here ..."`` (code
  4001, which the coordinator shows in the run's refusals), so the coordinator does not wait
  for its round timeout.

Every decision is a line in the ledger's ``audit.jsonl``. The approved list is read for every
task, so a new approval takes effect without restarting the daemon.

Run as ``python -m client.launcher --runtime-api-address 127.0.0.1:PORT --ledger DIR --hospital
NAME --superexec-auth-secret-file FILE [--parent-pid PID]``.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from flwr.app import Error, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import Executor, LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.approval import ApprovalError, ApprovedBundles
from client.audit import AuditLog
from shared_models.protocol import HOSPITAL_REFUSED, poll_wait, refusal_reason

DEFAULT_POLL_INTERVAL = 0.05  # seconds between AcquireTask calls (Flower's SuperExec: 1 s)
IDLE_POLL_CAP = 1.0  # seconds between AcquireTask calls once idle (poll_wait)
_ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"  # the SuperExec-authenticated RPC
_log = logging.getLogger("fedcare.launcher")


def bundle_refusal(hospital: str, fab_hash: str, why: str = "") -> str:
    """The error reason of a refused bundle (:func:`shared_models.protocol.refusal_reason`; no
    local path: the coordinator reads it)."""
    detail = why or "is not approved here"
    return refusal_reason(
        hospital,
        f"app bundle {fab_hash or '(no hash)'} {detail} (the hospital approves a bundle after "
        "review with `fedcare client approve`)",
    )


class ApprovedBundlePlugin(BaseExecPlugin):
    """A Flower SuperExec plugin that launches ClientApp tasks of approved bundles only.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API, ``127.0.0.1:PORT``.
    ledger : Path
        The hospital's ledger folder (``approved.json``, ``audit.jsonl``).
    hospital : str
        This hospital's name, as shown in the coordinator's reports.
    executor : Executor
        Starts approved tasks (default Flower's ``SubprocessExecutor``: ``flwr-clientapp``).

    Source: ``flwr.supercore.superexec.plugin.AutoExecPlugin`` (same base class and spec);
    the check before ``executor.launch`` is fedcare's.
    """

    supported_task_types = frozenset({TaskType.CLIENT_APP})
    suppress_output = False

    def __init__(
        self,
        runtime_api_address: str,
        *,
        ledger: Path,
        hospital: str,
        executor: Executor | None = None,
    ) -> None:
        super().__init__(
            runtime_api_address=runtime_api_address,
            insecure=True,  # loopback Runtime API, as Flower's own SuperExec in subprocess mode
            root_certificates_path=None,
            runtime_dependency_install=False,
            executor=executor or SubprocessExecutor(),
        )
        self.ledger = Path(ledger)
        self.hospital = hospital
        self.approved = ApprovedBundles(self.ledger)
        self.audit = AuditLog(self.ledger)

    def launch_task(self, token: str, task: Task) -> LaunchResult:
        """Launch ``flwr-clientapp`` for an approved bundle; answer any other with a refusal."""
        fab_hash = str(task.fab_hash)
        entry = {"event": "bundle", "hospital": self.hospital, "flower_run_id": task.run_id,
                 "task_id": task.task_id, "fab_hash": fab_hash}  # fmt: skip
        try:
            approved, why = self.approved.is_approved(fab_hash), ""
        except ApprovalError as exc:  # fail closed: an unreadable list approves nothing; the
            approved, why = False, "cannot be checked (the approved-bundles list is unreadable)"
            self.audit.write({**entry, "direction": "local", "detail": str(exc)})  # path stays here
        if approved:
            self.audit.write({**entry, "decision": "approved"})
            return super().launch_task(token, task)
        reason = bundle_refusal(self.hospital, fab_hash, why)
        self.audit.write({**entry, "decision": "refused", "reason": reason})
        _log.warning("task %d of run %d: %s", task.task_id, task.run_id, reason)
        try:
            refuse_task(self.runtime_api_address, token, reason)
        except Exception as exc:  # the SuperNode's task expiry then applies
            return LaunchResult.failed(f"could not send the refusal: {exc}")
        return LaunchResult.accepted()


def refuse_task(runtime_api_address: str, token: str, reason: str) -> None:
    """Answer a task's message with ``Error(4001, reason)`` without installing its bundle.

    Connects to the SuperNode's Runtime API with the task token, exactly as ``flwr-clientapp``
    does, pulls the task input, pushes the error reply and closes the task as failed.

    Source: ``flwr.supernode.runtime.run_clientapp.run_clientapp`` (its error path; the FAB is
    never passed to ``install_from_fab``).

    Raises
    ------
    Exception
        Runtime API errors (``httpx.HTTPError``, ``RuntimeError`` when no message is pending).
    """
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    try:
        message, context, _run, _fab = pull_task_input(client)  # the FAB is never installed
        reply = Message(Error(code=HOSPITAL_REFUSED, reason=reason), reply_to=message)
        push_message(client, reply, context)
        push_task_output(client, context, SubStatus.FAILED, reason)
    finally:
        client.close()


def run_launcher(
    *,
    runtime_api_address: str,
    ledger: Path,
    hospital: str,
    auth_secret: bytes | None = None,
    parent_pid: int | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    executor: str = "warm",
) -> None:
    """Acquire ClientApp tasks from the SuperNode and launch them (approved bundles only).

    Runs until SIGTERM / SIGINT (or the death of ``parent_pid``).

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API (``flower-supernode --port``), ``127.0.0.1:PORT``.
    ledger : Path
        The hospital's ledger folder.
    hospital : str
        This hospital's name.
    auth_secret : bytes, optional
        The SuperExec auth secret the SuperNode was started with
        (``--superexec-auth-secret-file``): only a holder may acquire tasks.
    parent_pid : int, optional
        Exit when this process is gone.
    poll_interval : float
        Seconds between task polls while tasks come; idle, the wait grows to at most
        ``IDLE_POLL_CAP`` (:func:`shared_models.protocol.poll_wait`).
    executor : {"warm", "subprocess"}
        ``warm``: fork a process that has imported torch & co. once
        (:class:`client.warm_executor.ForkExecutor`); ``subprocess``: Flower's
        ``SubprocessExecutor`` (a fresh ``flwr-clientapp`` per message).

    Source: ``flwr.supercore.superexec.run_superexec.run_superexec`` (the same loop).
    """
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=auth_secret, protected_methods={_ACQUIRE_TASK}
            )
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )
    if executor == "warm":
        from client.warm_executor import ForkExecutor

        chosen: Executor = ForkExecutor()
    else:
        chosen = SubprocessExecutor()
    plugin = ApprovedBundlePlugin(
        runtime_api_address, ledger=ledger, hospital=hospital, executor=chosen
    )

    def _stop(signum: int, frame: FrameType | None) -> None:
        # raised wherever the main thread is, also inside Flower's retry loop, which retries a
        # gone SuperNode forever (a flag checked between tasks would never be seen)
        raise _Stopped

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    _log.info("launcher for hospital %s: approved bundles from %s", hospital, plugin.approved.path)
    last_task = time.monotonic()
    try:
        while True:
            try:
                res = client.AcquireTask(
                    AcquireTaskRequest(
                        supported_task_types=sorted(plugin.supported_task_types),
                        agentapp_fab_hashes=[],
                    )
                )
                plugin.executor.reconcile()
                if res.HasField("task") and res.token:
                    last_task = time.monotonic()
                    result = plugin.launch_task(token=res.token, task=res.task)
                    if result.message:
                        _log.warning("task %d: %s", res.task.task_id, result.message)
            except Exception as exc:  # the SuperNode is starting or restarting
                _log.debug("Runtime API not ready: %s", exc)
                time.sleep(1.0)
            time.sleep(poll_wait(time.monotonic() - last_task, poll_interval, IDLE_POLL_CAP))
    except _Stopped:
        _log.info("launcher for hospital %s: stopped", hospital)
    finally:
        client.close()
        plugin.executor.close()


class _Stopped(BaseException):
    """SIGTERM / SIGINT (or the parent's death, which Flower's monitor turns into SIGINT)."""


def main(argv: list[str] | None = None) -> None:
    """Command line of the launcher (started by ``fedcare client start``)."""
    parser = argparse.ArgumentParser(prog="python -m client.launcher", description=__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--hospital", required=True)
    parser.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    parser.add_argument("--executor", choices=("warm", "subprocess"), default="warm")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format="%(asctime)s fedcare-launcher %(message)s"
    )
    secret = (
        args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    )
    run_launcher(
        runtime_api_address=args.runtime_api_address, ledger=args.ledger, hospital=args.hospital,
        auth_secret=secret, parent_pid=args.parent_pid, poll_interval=args.poll_interval,
        executor=args.executor,
    )  # fmt: skip


if __name__ == "__main__":
    main()
