"""A warm SuperExec executor: each approved ClientApp task runs in a fork of a process that has
already imported torch, Opacus, pandas, scikit-learn and Flower.

Flower 1.41's ``SubprocessExecutor`` starts a fresh ``flwr-clientapp`` interpreter for every
message, which imports torch and the rest again (4-6 s on a loaded 2-core machine), and a round
has two messages per hospital (six with SecAgg+: four protocol stages, train inside the third,
then evaluate). :class:`ForkExecutor` pays those imports once, when ``fedcare client start``
starts, and forks per task; the child runs exactly what ``flwr-clientapp`` runs
(``flwr.supernode.runtime.run_clientapp.run_clientapp``: pull the message, install the FAB,
load its ClientApp, reply) and exits.

What the launcher preloads is third-party libraries only: every module of the fedcare packages
is dropped from a fork's ``sys.modules`` before the ClientApp is loaded, so the code that runs is
the approved bundle's (installed by Flower from the FAB), never the launcher's own copy. CUDA is
never initialised in the parent (importing torch does not), so a child may use the GPU.

The approved bundle's code is loaded once per bundle, not once per message: the first task of a
bundle runs in a direct fork (Flower installs the FAB there); from the next task on, a *bundle
process* (:class:`BundleProcess`, a fork of the launcher that dropped the fedcare modules and
imported the bundle's ClientApp from Flower's install folder of that FAB, with Flower's
``load_app``) forks the task instead. Only tasks whose ``fab_hash`` is the bundle's go to it, and
the launcher passes a task on only after the approval check, so reusing the loaded code changes
nothing the approval covers (a bundle is approved by its hash, and the hash fixes the code).
Measured on the 2-core VM (``benchmarks/deployment_latency.py``, logistic regression): importing
the bundle's modules took 0.3 s of a 0.95 s train task, and torch's first optimiser 0.4 s more
(``torch._dynamo``, now preloaded). What stays per message, with its cost there: the fork
(~0.01 s); Flower's ``pull_task_input`` and ``install_from_fab`` (the FAB's hash is checked
against the installed copy, 0.07 + 0.08 s); the ClientApp's own work (data arrays from the
hospital's data cache, :func:`client.hospital_data.load_hospital_data`; the durable ledger and replay-cache
writes, ~0.07 s of fsync, which must reach the disk before a release leaves); pushing the reply
(~0.15 s).

Source: the ``Executor`` protocol of ``flwr.supercore.superexec.executor`` (``launch``,
``reconcile``, ``close``, capacity hooks), as implemented by Flower's ``SubprocessExecutor``.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# imported once in the launcher; everything the fedcare ClientApp needs that is slow to import
PRELOAD = (
    "torch", "torch._dynamo", "numpy", "pandas", "sklearn.metrics", "opacus", "safetensors.torch",
    "flwr_datasets", "flwr.clientapp", "flwr.client.mod", "flwr.supernode.runtime.run_clientapp",
)  # fmt: skip
_log = logging.getLogger("fedcare.launcher")
# fedcare's own packages: never served from the launcher's copy to a ClientApp
APP_PACKAGES = frozenset({"client", "server", "shared_models", "simulations"})


class ForkExecutor:
    """Run each ClientApp task in a fork of this (pre-warmed) process.

    The modules in ``PRELOAD`` are imported once, when it is created (missing ones are skipped).

    Notes
    -----
    Children are reaped on every launch and by :meth:`reconcile`; each child also watches the
    launcher (``parent_pid`` of the execution spec) and exits with it, as ``flwr-clientapp`` does.
    """

    def __init__(self) -> None:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except ImportError:
                continue
        self._children: set[int] = set()
        self._bundle: BundleProcess | None = None  # the last bundle's process
        self._installed: set[str] = set()  # bundles whose first task has run (FAB installed)

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Every supported task type can launch at once (no capacity limit)."""
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, **_: object) -> None:
        """No capacity gate."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork; the child runs the ClientApp task described by ``spec`` and exits."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(
                f"ForkExecutor runs ClientApp tasks only, not {spec.task_type}"
            )
        self.reconcile()
        if spec.fab_hash in self._installed:
            if self._bundle is None or self._bundle.fab_hash != spec.fab_hash:
                if self._bundle is not None:
                    self._bundle.close()
                self._bundle = BundleProcess.start(spec.fab_hash)
                if self._bundle is not None:
                    _log.info(
                        "bundle %s: its ClientApp loaded once, in process %d, for its next tasks",
                        spec.fab_hash, self._bundle.pid,
                    )  # fmt: skip
            if self._bundle is not None and self._bundle.launch(spec):
                return LaunchResult.accepted()
            self._bundle = None  # it failed (e.g. no install folder): fork directly
        self._installed.add(spec.fab_hash)
        pid = _fork()
        if pid == 0:  # child: never returns
            _run_clientapp_task(spec, drop_app_modules=True)
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def close(self) -> None:
        """Children exit on their own (or with the launcher, which they watch); the bundle
        process exits when its connection closes."""
        if self._bundle is not None:
            self._bundle.close()
        self.reconcile()


def _fork() -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    return os.fork()


def _drop_app_modules() -> None:
    """Forget the launcher's copy of the fedcare packages: the bundle's is imported from the FAB."""
    for name in list(sys.modules):
        if name.partition(".")[0] in APP_PACKAGES:
            del sys.modules[name]


def installed_app_dir(fab_hash: str) -> Path | None:
    """Flower's install folder of the FAB with SHA-256 ``fab_hash``:
    ``$FLWR_HOME/apps/<publisher>.<app>.<version>.<first 8 hex of the hash>``, as
    ``flwr.common.config.get_project_dir`` names it (Flower itself loads a FAB's ClientApp
    from the folder with that suffix). Only approved bundles are ever installed here (the
    launcher refuses the others before anything runs). None when there is not exactly one."""
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home

    apps = get_flwr_home() / APP_DIR
    suffix = fab_hash[:FAB_HASH_TRUNCATION]
    found = [p for p in apps.glob(f"*.{suffix}") if p.is_dir()] if fab_hash else []
    return found[0] if len(found) == 1 else None


class BundleProcess:
    """A fork of the launcher that has imported one approved bundle's ClientApp and forks a
    child for each of that bundle's tasks (see the module docstring).

    It reads task specs (pickled :class:`ExecutionSpec`, our own two processes over a socket
    pair) from the launcher, reaps its children, and exits when the launcher closes the socket
    or exits.
    """

    def __init__(self, fab_hash: str, sock: socket.socket, pid: int) -> None:
        self.fab_hash, self._sock, self.pid = fab_hash, sock, pid

    @classmethod
    def start(cls, fab_hash: str) -> BundleProcess | None:
        """Fork the bundle process; None when the bundle's install folder is not found."""
        app_dir = installed_app_dir(fab_hash)
        if app_dir is None:
            return None
        ours, theirs = socket.socketpair()
        pid = _fork()
        if pid == 0:  # never returns
            ours.close()
            _serve_bundle(app_dir, theirs)
        theirs.close()
        return cls(fab_hash, ours, pid)

    def launch(self, spec: ExecutionSpec) -> bool:
        """Hand ``spec`` to the bundle process; False when it is gone (the launcher then forks
        the task itself)."""
        data = pickle.dumps(spec)
        try:
            self._sock.sendall(len(data).to_bytes(4, "big") + data)
        except OSError:
            self.close()
            return False
        return True

    def close(self) -> None:
        """Close the connection (the bundle process exits) and reap it."""
        self._sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _in_fork(body: Callable[[], None]) -> NoReturn:
    """Run ``body`` in a forked process with default SIGTERM / SIGINT handling, then exit (0, or
    the code of a ``SystemExit``, or 1 after printing an exception) without running the parent's
    exit handlers."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        body()
        code = 0
    except SystemExit as exc:  # flwr_exit ends every task this way, after its exit handlers
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_bundle(app_dir: Path, sock: socket.socket) -> NoReturn:
    """In the bundle process: import the bundle's ClientApp with Flower's ``load_app`` from its
    install folder, then fork one child per task spec received; exit when the launcher closes
    the socket. A ClientApp that fails to import is not fatal here: each task's child loads it
    again and fails as in a direct fork, so the coordinator gets Flower's error reply."""

    def serve() -> None:
        _drop_app_modules()
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.config import get_project_config
        from flwr.supercore.object_ref import load_app

        try:
            ref = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]["clientapp"]
            load_app(ref, LoadClientAppError, app_dir)
        except Exception:  # noqa: BLE001 -- each task then loads it itself and reports the error
            traceback.print_exc()  # through Flower, as a task of a direct fork would
        children: set[int] = set()
        while True:
            readable, _, _ = select.select([sock], [], [], 1.0)
            for pid in list(children):  # reap
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    children.discard(pid)
            if not readable:
                continue
            header = sock.recv(4, socket.MSG_WAITALL)
            if len(header) < 4:
                return  # the launcher closed the connection or exited
            spec = pickle.loads(sock.recv(int.from_bytes(header, "big"), socket.MSG_WAITALL))
            pid = _fork()
            if pid == 0:  # never returns
                sock.close()
                _run_clientapp_task(spec, drop_app_modules=False)
            children.add(pid)

    _in_fork(serve)


def _run_clientapp_task(spec: ExecutionSpec, *, drop_app_modules: bool) -> NoReturn:
    """In the forked child: what ``flwr-clientapp --runtime-api-address A --token T`` runs."""

    def task() -> None:
        if drop_app_modules:
            _drop_app_modules()
        sys.argv = ["flwr-clientapp"]
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )

    _in_fork(task)
