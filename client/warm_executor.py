"""A warm SuperExec executor: each approved ClientApp task runs in a fork of a process that has
already imported torch, Opacus, pandas, scikit-learn and Flower.

Flower 1.41's ``SubprocessExecutor`` starts a fresh ``flwr-clientapp`` interpreter for every
message, which imports torch and the rest again (4-6 s on a loaded 2-core machine), and a round
has two messages per hospital (six with SecAgg+: four protocol stages, train inside the third,
then evaluate). :class:`ForkExecutor` pays those imports once, when ``fedcare client start``
starts, and forks per task; the child runs exactly what ``flwr-clientapp`` runs
(``flwr.supernode.runtime.run_clientapp.run_clientapp``: pull the message, install the FAB,
load its ClientApp, reply) and exits.

What is preloaded is third-party libraries only: every module of the fedcare packages is
dropped from the child's ``sys.modules`` before the ClientApp is loaded, so the code that runs is
the approved bundle's (installed by Flower from the FAB), never the launcher's own copy. CUDA is
never initialised in the parent (importing torch does not), so a child may use the GPU.

Source: the ``Executor`` protocol of ``flwr.supercore.superexec.executor`` (``launch``,
``reconcile``, ``close``, capacity hooks), as implemented by Flower's ``SubprocessExecutor``.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult

# imported once in the launcher; everything the fedcare ClientApp needs that is slow to import
PRELOAD = (
    "torch", "numpy", "pandas", "sklearn.metrics", "opacus", "safetensors.torch",
    "flwr_datasets", "flwr.clientapp", "flwr.client.mod", "flwr.supernode.runtime.run_clientapp",
)  # fmt: skip
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
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: never returns
            _run_clientapp_task(spec)
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
        """Children exit on their own (or with the launcher, which they watch)."""
        self.reconcile()


def _run_clientapp_task(spec: ExecutionSpec) -> None:
    """In the forked child: what ``flwr-clientapp --runtime-api-address A --token T`` runs."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for name in list(sys.modules):
            if name.partition(".")[0] in APP_PACKAGES:
                del sys.modules[name]  # the bundle's own code is imported from the FAB
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
        code = 0
    except SystemExit as exc:  # flwr_exit ends every task this way, after its exit handlers
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
