"""The Flower 1.41 private code fedcare copies from or calls, pinned by the SHA-256 of its source.

Where Flower 1.41 has no public hook, one fedcare module per concern copies or calls its private
code (docs/flower-internals.md; the project pins ``flwr==1.41.0``). Each entry below is a function or class
that module copied a loop from or calls directly. When a Flower upgrade changes one of them, this
test fails and names the fedcare module to re-check against the new source; after re-checking,
update the hash here.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import linecache
import sys

import pytest

PINNED: dict[str, dict[str, str]] = {
    "client/supernode.py (the hospital's prompt Fleet loop)": {
        "flwr.supernode.start_client_internal:start_client_internal": "9e89a6eb68fbec68",
        "flwr.supernode.start_client_internal:_pull_and_store_message": "eaf5d0e36dc34e4c",
        "flwr.supernode.start_client_internal:_push_messages": "00bb86faffdec114",
        "flwr.supernode.start_client_internal:_init_connection": "800f9aba73646ea2",
        "flwr.supernode.cli.flower_supernode:flower_supernode": "e263e10452076b00",
        "flwr.supernode.cli.flower_supernode:_parse_supernode_lifespan_config": "4094956c95246dbe",
        "flwr.supernode.cli.flower_supernode:_start_supernode_http_api": "b2832210a0cad93a",
        "flwr.supercore.inflatable.inflatable_utils:pull_objects": "31bb2de46b450e6a",
    },
    "client/join.py and server/gateway.py (a refused key: retried, or told it was removed)": {
        # a refused activation ends the SuperNode through flwr_exit (not catchable: a force-exit
        # timer), printing "[code: N] <detail>" from the refusal's JSON (FlowerError.from_json)
        "flwr.supernode.fleet_http_connection:http_request_response": "b80ca36779c2657f",
        "flwr.supercore.exit.exit:flwr_exit": "1445f36e9999abb4",
        "flwr.supercore.error.base:FlowerError.from_json": "b50b62374038193d",
    },
    "client/launcher.py (the SuperExec that launches approved bundles only)": {
        "flwr.supercore.superexec.run_superexec:run_superexec": "d11f4e7fbc8f0b12",
        "flwr.supernode.runtime.run_clientapp:pull_task_input": "5607a23e1673ee87",
        "flwr.supernode.runtime.run_clientapp:push_message": "07cb512c93e065a9",
        "flwr.supernode.runtime.run_clientapp:push_task_output": "9206407456e79e17",
        "flwr.supercore.superexec.plugin.base_exec_plugin:BaseExecPlugin": "687ebe55961326e8",
    },
    "client/warm_executor.py (ClientApps in forks of a warm process)": {
        "flwr.supercore.superexec.executor.subprocess_executor:SubprocessExecutor": (
            "9c58435eb28cd789"
        ),
        "flwr.supernode.runtime.run_clientapp:run_clientapp": "6ce09559f3a2f5dc",
        # the bundle process imports the ClientApp from the folder get_project_dir names, and
        # the task's load_app (through get_load_client_app_fn) reuses the module it imported
        "flwr.common.config:get_project_dir": "155c70517e73e598",
        "flwr.supercore.object_ref:load_app": "ef4c226d0c4f2c4a",
        "flwr.clientapp.utils:get_load_client_app_fn": "f7790dd641bafaff",
    },
    "shared_models/fab.py (FABs built without walking .venv)": {
        # app_files = collect_files per top-level folder, minus the folders the exclude patterns
        # drop whatever their content; build_fab = build_fab_from_disk on those files
        "flwr.cli.utils:collect_files": "702850cf487d31b8",
        "flwr.cli.utils:filter_paths_for_publish": "fbc4948b2ba91fb1",
        "flwr.cli.build:build_fab_from_disk": "d4912729f7fa5092",
    },
    "server/grid_pull.py (the coordinator's prompt exchange)": {
        "flwr.superlink.grid.http_grid:HttpGrid.pull_messages": "67a5266a5a2ed515",
        "flwr.superlink.grid.http_grid:HttpGrid.send_and_receive": "699c9f048f3cff74",
    },
    "client/secure_aggregation.py (the hospital's SecAgg+ checks, on Flower's client state)": {
        # check_unmask reads SecAggPlusState as secaggplus_mod saves it (only after a stage
        # succeeded), relies on check_stage / check_configs refusing out-of-order and malformed
        # messages, on _share_keys / _collect_masked_vectors filling public_keys_dict and the
        # share dicts, and documents what _unmask checks itself
        "flwr.client.mod.secure_aggregation.secaggplus_mod:SecAggPlusState": "16bb077a917408a0",
        "flwr.client.mod.secure_aggregation.secaggplus_mod:secaggplus_mod": "cc0e7d467b4de166",
        "flwr.client.mod.secure_aggregation.secaggplus_mod:check_stage": "100790f27e793e59",
        "flwr.client.mod.secure_aggregation.secaggplus_mod:check_configs": "d329ae3f62633817",
        "flwr.client.mod.secure_aggregation.secaggplus_mod:_share_keys": "0873eca66c3df037",
        "flwr.client.mod.secure_aggregation.secaggplus_mod:_collect_masked_vectors": (
            "d638fe6563407bc1"
        ),
        "flwr.client.mod.secure_aggregation.secaggplus_mod:_unmask": "076374c55e664774",
    },
    "server/secure_aggregation.py (SecAgg+ stages driven from the strategies)": {
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow:SecAggPlusWorkflow": (
            "3ce26fbb0e619d7a"
        ),
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow:WorkflowState": (
            "91415782137e66cd"
        ),
    },
    "simulations/engine.py (the Simulation Engine in this process)": {
        "flwr.simulation.run_simulation:_run_simulation": "da43f120d1afc492",
        # start_ray builds a RayBackend ahead of the run: its __init__ starts Ray, init_ray
        # skips ray.init when Ray is already up, terminate shuts Ray down after the run
        "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.__init__": "7ba3f97cc09875cb",
        "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.init_ray": "617470e8182cea2e",
        "flwr.server.superlink.fleet.vce.backend.raybackend:RayBackend.terminate": "572052de11fe046c",
        # InProcessBackend: start_vce builds the backend by importing the name RayBackend from
        # its module at call time (swapped by _flower_builds); run_api drives the Backend
        # interface from worker threads (worker: error codes, context stored on success); the
        # backend does for one message what the Ray actor's run does
        "flwr.server.superlink.fleet.vce.vce_api:start_vce": "2d5e267f893950a7",
        "flwr.server.superlink.fleet.vce.vce_api:run_api": "f85c0cd6e902752f",
        "flwr.server.superlink.fleet.vce.vce_api:worker": "60f308688ba34fb5",
        "flwr.server.superlink.fleet.vce.backend.backend:Backend": "b12e9f514dd36767",
        "flwr.simulation.ray_transport.ray_actor:VirtualClientEngineActor.run": "a87502a00b99224d",
    },
}


def source_hash(qualified: str) -> str:
    """First 16 hex digits of the SHA-256 of ``module:attr[.attr]``'s source."""
    module, _, attrs = qualified.partition(":")
    obj = importlib.import_module(module)
    for attr in attrs.split("."):
        obj = getattr(obj, attr)
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize("concern", sorted(PINNED))
def test_the_flower_code_each_module_relies_on_is_unchanged(concern):
    changed = [name for name, pin in PINNED[concern].items() if source_hash(name) != pin]
    assert not changed, (
        f"Flower's {', '.join(changed)} changed since fedcare's {concern} was written against "
        "flwr 1.41.0: re-check that module against the new source, then update the hash here"
    )


def test_the_guard_pins_each_function_not_its_module(tmp_path, monkeypatch):
    """source_hash reads the installed source of the one attribute named: an edit to it on disk
    changes its hash, an edit elsewhere in the module does not (a pin per function is what lets
    a Flower upgrade that leaves our functions alone pass), and a nested ``Class.method`` name
    resolves to the method."""
    module = tmp_path / "fake_flwr_module.py"
    source = (
        "def pinned():\n    return 1\n\n\nclass Other:\n    def method(self):\n        return 2\n"
    )
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))

    def hashes() -> tuple[str, str]:
        importlib.invalidate_caches()
        linecache.clearcache()
        sys.modules.pop("fake_flwr_module", None)
        return source_hash("fake_flwr_module:pinned"), source_hash("fake_flwr_module:Other.method")

    before = hashes()
    assert before[0] == hashlib.sha256(b"def pinned():\n    return 1\n").hexdigest()[:16]
    module.write_text(source.replace("return 2", "return 23"))
    other_changed = hashes()
    assert other_changed[0] == before[0] and other_changed[1] != before[1]
    module.write_text(source.replace("return 1", "return 145"))
    assert hashes()[0] != before[0]
