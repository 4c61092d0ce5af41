"""Where ``fedcare simulate`` runs the hospitals: in this process or in Ray actors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.server.superlink.fleet.vce.backend import raybackend

from server.run_config import RunOptions
from simulations.engine import InProcessBackend, RayBackend, _flower_builds
from simulations.harness import SimulationRequest, UsageError, uses_ray
from tests.handlers import make_context, use_task_identity


def _backend_with(app: ClientApp) -> InProcessBackend:
    backend = InProcessBackend({})
    backend.build(lambda: app)
    return backend


def _request() -> Message:
    use_task_identity()
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type="train")


def test_the_client_app_gets_a_copy_and_its_errors_are_flowers_client_app_errors():
    """As across Ray's serialisation: a ClientApp that writes into what it received changes
    nothing the ServerApp's state holds, and its exception reaches Flower as a
    ``ClientAppException`` (Flower turns it into an error reply)."""
    app = ClientApp()
    kept: list[Message] = []

    @app.train()
    def train(msg: Message, context):  # type: ignore[no-untyped-def]
        msg.content["arrays"]["w"] = Array(np.ones(3, dtype=np.float32))
        msg.content["config"]["server-round"] = 99
        context.state["seen"] = ConfigRecord({"round": 1})
        kept.append(Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg))
        return kept[-1]

    request, context = _request(), make_context({}, {"partition-id": 0})
    reply, new_context = _backend_with(app).process_message(request, context)
    assert np.array_equal(reply.content["arrays"]["w"].numpy(), np.ones(3))
    kept[0].content["arrays"]["w"] = Array(np.full(3, 7, dtype=np.float32))  # the app's later write
    assert np.array_equal(reply.content["arrays"]["w"].numpy(), np.ones(3))  # not in the reply
    assert np.array_equal(request.content["arrays"]["w"].numpy(), np.zeros(3))
    assert request.content["config"]["server-round"] == 1
    assert "seen" in new_context.state and "seen" not in context.state  # the engine stores it

    failing = ClientApp()

    @failing.train()
    def boom(msg: Message, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("no data at this hospital")

    with pytest.raises(ClientAppException, match="no data at this hospital"):
        _backend_with(failing).process_message(_request(), make_context({}, {}))

    exiting = ClientApp()

    @exiting.train()
    def leave(msg: Message, context):  # type: ignore[no-untyped-def]
        raise SystemExit(3)  # must not end Flower's only worker thread

    with pytest.raises(ClientAppException, match="exited"):
        _backend_with(exiting).process_message(_request(), make_context({}, {}))


def test_the_backend_swap_lasts_for_the_run_only():
    assert raybackend.RayBackend is RayBackend
    with pytest.raises(RuntimeError, match="inside"), _flower_builds(InProcessBackend):
        assert raybackend.RayBackend is InProcessBackend
        raise RuntimeError("inside")
    assert raybackend.RayBackend is RayBackend


def _req(monkeypatch, backend: str = "auto", **kwargs) -> SimulationRequest:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return SimulationRequest(
        options=RunOptions(), hospitals=3, out=Path("run"), backend=backend, **kwargs
    )


@pytest.mark.parametrize(
    ("backend", "kwargs", "ray"),
    [
        ("auto", {}, False),
        ("auto", {"ray_address": "127.0.0.1:6379"}, True),
        ("auto", {"gpus_per_hospital": 0.25}, True),
        ("auto", {"cpus_per_hospital": 2.0}, True),
        ("ray", {}, True),
        ("in-process", {}, False),
    ],
)  # fmt: skip
def test_auto_picks_ray_only_for_what_only_ray_serves(monkeypatch, backend, kwargs, ray):
    assert uses_ray(_req(monkeypatch, backend, **kwargs)) is ray


def test_ray_address_from_the_environment_means_ray_unless_in_process_is_asked_for(monkeypatch):
    auto, in_process = _req(monkeypatch), _req(monkeypatch, "in-process")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert uses_ray(auto)
    assert not uses_ray(in_process)  # an explicit choice wins over an inherited variable


def test_in_process_refuses_ray_only_options(monkeypatch):
    with pytest.raises(UsageError, match="--gpus-per-hospital needs --backend ray"):
        uses_ray(_req(monkeypatch, "in-process", gpus_per_hospital=0.5))
