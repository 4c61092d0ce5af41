"""Running a federation through Flower's Simulation Engine (Ray backend) in this process.

This is what ``flwr run`` does inside its ``flower-simulation`` process: the ServerApp runs in a
thread over an in-memory Grid and each simulated hospital's ClientApp runs in a Ray actor. We call
Flower's runtime directly (``flwr.simulation.run_simulation._run_simulation``) instead of the
deprecated ``run_simulation`` wrapper because the wrapper cannot pass a run config; going through
``flwr run`` would leave a detached local SuperLink running after the command returns.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

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


def preload_hospital_stack() -> None:
    """Ray ``worker_process_setup_hook``: import what a simulated hospital's ClientApp needs
    (torch, Opacus, Flower's actor, the partitioners) when a worker process starts.

    Ray starts its idle worker processes as soon as ``ray.init`` returns; Flower's ClientApp
    actors are then placed in them with these imports already done (see :func:`start_ray`).
    """
    import flwr.simulation.ray_transport.ray_actor  # noqa: F401
    import flwr_datasets.partitioner  # noqa: F401

    import client.client_app  # noqa: F401


def start_ray(config: dict[str, Any]) -> None:
    """``ray.init`` with the arguments of :func:`backend_config` and what Flower's
    ``RayBackend.init_ray`` adds (the workers get this process's ``sys.path``), plus a
    ``worker_process_setup_hook`` (:func:`preload_hospital_stack`). Flower's backend then finds
    Ray up and skips its own ``ray.init``.

    Call it from the main thread: Ray ties its processes' lives to the thread that starts them
    (``PR_SET_PDEATHSIG`` on Linux), so a ``ray.init`` in a worker thread loses its GCS when
    that thread ends.

    Raises
    ------
    Exception
        Whatever ``ray.init`` raises (e.g. no Ray cluster at the given address).
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {
        "env_vars": {"PYTHONPATH": pythonpath},
        "worker_process_setup_hook": f"{__name__}.preload_hospital_stack",
    }
    ray.init(runtime_env=runtime_env, **config["init_args"])


def run_federation(
    *,
    run_config: dict[str, Any],
    num_supernodes: int,
    num_cpus_per_client: float = 1.0,
    num_gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    verbose: bool = False,
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
