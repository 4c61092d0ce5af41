"""Running a federation through Flower's Simulation Engine in this process.

This is what ``flwr run`` does inside its ``flower-simulation`` process: the ServerApp runs in a
thread over an in-memory Grid and each simulated hospital's ClientApp runs in a Ray actor, or,
with :class:`InProcessBackend`, in this process (Flower 1.41 builds ``RayBackend`` with no
registry of backends; :func:`_flower_builds` swaps the class for the run). We call
Flower's runtime directly (``flwr.simulation.run_simulation._run_simulation``) instead of the
deprecated ``run_simulation`` wrapper because the wrapper cannot pass a run config; going through
``flwr run`` would leave a detached local SuperLink running after the command returns.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

# Imported with this module, not inside start_ray: the harness imports this module before its
# checks thread starts, so that the thread never imports Flower's mutually importing modules at
# the same time as the main thread (Python refuses with a _DeadlockError; seen).
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.server.superlink.fleet.vce.backend.backend import Backend
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

from server.run_config import APP_DIR


def backend_config(
    *,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Flower's Ray backend config: each ClientApp actor's resources and ``ray.init``'s arguments.

    ``ray_address``: an existing Ray cluster; None starts Ray on this machine alone, its
    processes talking over the loopback address only.
    """
    init_args: dict[str, Any] = {
        "logging_level": logging.DEBUG if verbose else logging.ERROR,
        "log_to_driver": verbose,
        "include_dashboard": False,
        "configure_logging": not verbose,
    }
    if ray_address:
        init_args["address"] = ray_address
    else:
        init_args["_node_ip_address"] = "127.0.0.1"
    return {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": init_args,
    }


def start_ray(
    *,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
) -> None:
    """Start Ray (or connect to ``ray_address``) now, exactly as Flower's Ray backend would.

    Flower's ``RayBackend`` initialises Ray when it is built, unless Ray is already
    initialised; building one here, with the same backend config as :func:`run_federation`, lets
    the caller overlap Ray's start-up (a few seconds, mostly waiting for its processes) with
    other work. The federation then reuses this Ray instance and shuts it down at its end; a
    caller that does not run the federation calls :func:`stop_ray`. Must run in the main thread
    (``ray.init`` installs signal handlers).
    """
    RayBackend(
        backend_config(
            num_cpus_per_client=num_cpus_per_client, num_gpus_per_client=num_gpus_per_client,
            ray_address=ray_address, verbose=verbose,
        )  # type: ignore[arg-type]
    )  # fmt: skip


def stop_ray() -> None:
    """Shut down the Ray instance :func:`start_ray` started (no-op when there is none)."""
    import ray

    ray.shutdown()


class InProcessBackend(Backend):
    """Flower Simulation Engine backend that runs the ClientApp in this process, one message at a
    time.

    What Flower's ``RayBackend`` does for one message (``ClientAppActor.run``: load the app, call
    it, wrap its exception in ``ClientAppException``), without Ray: no Ray processes to start, no
    actor that imports torch again. The message and context are deep-copied on the way in and
    the reply and updated context on the way out, as Ray's serialisation would, so a ClientApp
    and the ServerApp's state never share an object.

    The swap of :func:`_flower_builds` is process-wide: one process runs one federation at a
    time with this backend (``fedcare simulate`` runs one).
    """

    def __init__(self, backend_config: dict[str, Any]) -> None:
        super().__init__(backend_config)  # type: ignore[arg-type]
        self._app_fn: Callable[[], Any] | None = None

    def build(self, app_fn: Callable[[], Any]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

        if self._app_fn is None:
            raise ValueError("build() the backend before processing messages")
        message, context = copy.deepcopy((message, context))
        try:
            app = self._app_fn()
            return copy.deepcopy((app(message=message, context=context), context))
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        except SystemExit as ex:  # would end Flower's only worker thread; Ray's actor would die
            raise ClientAppException(f"the ClientApp exited (code {ex.code})") from ex

    def terminate(self) -> None:
        pass


@contextlib.contextmanager
def _flower_builds(backend: type[Backend]) -> Iterator[None]:
    """Make Flower's Simulation Engine build ``backend`` instead of ``RayBackend``.

    ``start_vce`` imports ``RayBackend`` from its module each time it builds the backend (it has
    no backend registry); the name is swapped for the run and restored after.
    """
    saved = raybackend.RayBackend
    raybackend.RayBackend = backend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = saved  # type: ignore[misc]


def run_federation(
    *,
    run_config: dict[str, Any],
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
    in_process: bool = False,
) -> None:
    """Run ``server.server_app:app`` with ``num_supernodes`` simulated ClientApps.

    Parameters
    ----------
    run_config : dict
        Complete flat run config (defaults fused with overrides).
    num_supernodes : int
        Number of simulated hospitals (each gets ``partition-id`` 0..N-1).
    num_cpus_per_client, num_gpus_per_client : float
        Ray resources per ClientApp actor (GPU fractions allowed). Flower's actor pool holds as
        many actors as fit on every node of the cluster.
    ray_address : str, optional
        An existing Ray cluster (``ray start --head`` prints it) whose nodes host the simulated
        hospitals; it is passed to ``ray.init`` through Flower's backend ``init_args``. Every
        node needs fedcare installed at the same path as here. None: a Ray instance of this
        machine alone, on the loopback address.
    in_process : bool
        Run the ClientApps in this process (:class:`InProcessBackend`), one message at a time,
        instead of Ray actors; the resource and address arguments are then unused.

    Raises
    ------
    RuntimeError
        The ServerApp failed (Flower re-raises its exception).
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from client.client_app import app as client_app
    from server.server_app import app as server_app

    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    server_context = Context(
        run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    config = backend_config(
        num_cpus_per_client=num_cpus_per_client, num_gpus_per_client=num_gpus_per_client,
        ray_address=ray_address, verbose=verbose,
    )  # fmt: skip
    with _flower_builds(InProcessBackend) if in_process else contextlib.nullcontext():
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=config,  # type: ignore[arg-type]
            server_app_context=server_context,
            app_dir=str(APP_DIR),
            is_app=True,  # hospitals' contexts get the run config fused from APP_DIR + overrides
            run=run,
            verbose_logging=verbose,
        )
