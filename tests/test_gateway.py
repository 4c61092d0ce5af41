"""The coordinator's public gateway in front of Flower's real SuperLink app (in process, in-memory
state): only the Fleet API passes, with the SuperNode's authentication headers unchanged; a
stranger's Control / Runtime calls never reach Flower. Over real processes and TLS:
tests/test_e2e_deployment.py."""

from __future__ import annotations

import asyncio
import inspect
import re
from base64 import b64encode

import httpx
import pytest
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListNodesResponse,
    ListRunsRequest,
    ListRunsResponse,
    RegisterNodeRequest,
    RegisterNodeResponse,
)
from flwr.proto.fleet_pb2 import ActivateNodeRequest, ActivateNodeResponse
from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest, SendNodeHeartbeatResponse
from flwr.proto.node_pb2 import Node
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import (
    generate_key_pairs,
    public_key_to_bytes,
    sign_message,
)
from flwr.superlink.main import create_app

from server.gateway import FLEET_ROUTES, Gateway, GatewayLimits, TokenBuckets

PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


class Counting:
    """Flower's app, counting the requests that reach it (an observer, not a replacement)."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.app, self.paths = app, []

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture
def superlink():
    return Counting(create_app())  # Flower 1.41's SuperLink (Fleet, Control, Runtime APIs)


def _signed(private_key, public_key) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The headers Flower's NodeAuthHttpInterceptor adds to every Fleet call of a SuperNode."""
    stamp = now().isoformat()
    return {
        **PROTOBUF,
        "flwr-public-key": b64encode(public_key_to_bytes(public_key)).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(sign_message(private_key, stamp.encode())).decode(),
    }


def _call(app, requests, *, peer="203.0.113.7"):  # type: ignore[no-untyped-def]
    """Send ``requests`` (method, path, body, headers) to ``app``; return the responses."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="https://coordinator") as c:
            return [
                await c.request(m, p, content=b, headers=h or PROTOBUF) for m, p, b, h in requests
            ]

    return asyncio.run(go())


def _gateway(superlink, **limits) -> Gateway:  # type: ignore[no-untyped-def]
    return Gateway(
        "http://superlink", limits=GatewayLimits(**limits),
        transport=httpx.ASGITransport(app=superlink),
    )  # fmt: skip


def test_allow_list_is_what_an_authenticated_supernode_calls():
    """Every Fleet call of Flower's SuperNode client except self-registration (refused under
    --enable-supernode-auth), and each one a route of Flower's Fleet router."""
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode.fleet_http_client import FleetHttpClient

    client_paths = set(
        re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(FleetHttpClient))
    )
    assert client_paths - FLEET_ROUTES == {"/v1/fleet/register-node", "/v1/fleet/unregister-node"}
    assert {route.path for route in router.routes} >= FLEET_ROUTES


def test_a_stranger_reaches_nothing_but_refusals(superlink):
    """Control API (start/list/stop runs, register nodes, logs), Runtime API (acquire-task) and
    anything else: refused by the gateway, never passed to Flower; Flower's state is unchanged."""
    gateway = _gateway(superlink)
    _, stranger_key = generate_key_pairs()
    register = RegisterNodeRequest(public_key=public_key_to_bytes(stranger_key)).SerializeToString()
    refused = {
        "/v1/control/start-run": 403, "/v1/control/register-node": 403,
        "/v1/control/list-runs": 403, "/v1/control/stop-run": 403,
        "/v1/control/stream-logs": 403, "/v1/control/list-nodes": 403,
        "/v1/runtime/acquire-task": 403, "/v1/fleet/register-node": 404,
        "/v1/fleet/unregister-node": 404, "/docs": 404, "/health": 404, "/": 404,
    }  # fmt: skip
    answers = _call(gateway, [("POST", path, register, None) for path in refused])
    assert [r.status_code for r in answers] == list(refused.values())
    assert _call(gateway, [("GET", "/v1/fleet/pull-messages", b"", None)])[0].status_code == 405
    # anonymous and forged Fleet calls stop at the gateway too
    forged = _signed(*generate_key_pairs())
    forged["flwr-public-key"] = b64encode(public_key_to_bytes(stranger_key)).decode()
    answers = _call(gateway, [("POST", "/v1/fleet/get-run", b"", None),
                              ("POST", "/v1/fleet/activate-node", b"", forged)])  # fmt: skip
    assert [r.status_code for r in answers] == [401, 401]
    assert "SuperNode authentication headers missing" in answers[0].text
    assert "invalid SuperNode signature" in answers[1].text
    assert superlink.paths == []  # nothing reached Flower
    direct = _call(superlink, [
        ("POST", "/v1/control/list-runs", ListRunsRequest().SerializeToString(), None),
        ("POST", "/v1/control/list-nodes", ListNodesRequest().SerializeToString(), None),
    ])  # fmt: skip
    assert not ListRunsResponse.FromString(direct[0].content).run_dict
    assert not ListNodesResponse.FromString(direct[1].content).nodes_info


def test_a_registered_supernode_passes_with_its_authentication_unchanged(superlink):
    """Flower itself verifies the forwarded signature headers: activation and heartbeats of a
    node registered on the loopback side succeed through the gateway; an unregistered key with
    a valid signature gets Flower's own refusal (code 2004), which the hospital then shows."""
    gateway = _gateway(superlink)
    private, public = generate_key_pairs()
    pk = public_key_to_bytes(public)
    reg = _call(superlink, [("POST", "/v1/control/register-node",
                             RegisterNodeRequest(public_key=pk, name="a").SerializeToString(), None)])  # fmt: skip
    node_id = RegisterNodeResponse.FromString(reg[0].content).node_id
    activate = ActivateNodeRequest(public_key=pk, heartbeat_interval=30).SerializeToString()
    beat = SendNodeHeartbeatRequest(node=Node(node_id=node_id), heartbeat_interval=30)
    answers = _call(gateway, [
        ("POST", "/v1/fleet/activate-node", activate, _signed(private, public)),
        ("POST", "/v1/fleet/send-node-heartbeat", beat.SerializeToString(), _signed(private, public)),
    ])  # fmt: skip
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert ActivateNodeResponse.FromString(answers[0].content).node_id == node_id
    assert SendNodeHeartbeatResponse.FromString(answers[1].content).success
    assert superlink.paths[-2:] == ["/v1/fleet/activate-node", "/v1/fleet/send-node-heartbeat"]
    other_private, other_public = generate_key_pairs()
    other = ActivateNodeRequest(public_key=public_key_to_bytes(other_public), heartbeat_interval=30)
    answer = _call(gateway, [("POST", "/v1/fleet/activate-node", other.SerializeToString(),
                              _signed(other_private, other_public))])[0]  # fmt: skip
    assert answer.status_code >= 400 and '"code":2004' in answer.text.replace(" ", "")


def test_body_size_and_request_rate_are_bounded(superlink):
    private, public = generate_key_pairs()
    gateway = _gateway(superlink, max_body_bytes=1000, rate=1.0, burst=3)
    big = _call(gateway, [("POST", "/v1/fleet/push-object", b"x" * 1001, _signed(private, public))])
    assert big[0].status_code == 413

    async def chunked():  # no content-length: counted while it streams in
        for _ in range(3):
            yield b"x" * 600

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_gateway(superlink, max_body_bytes=1000))
        async with httpx.AsyncClient(transport=transport, base_url="https://c") as c:
            return await c.post("/v1/fleet/push-object", content=chunked(),
                                headers=_signed(private, public))  # fmt: skip

    assert asyncio.run(go()).status_code == 413
    # the burst (3, one already used above), whatever the path, then 503 + Retry-After (which
    # Flower's SuperNode retries)
    answers = _call(gateway, [("POST", "/v1/fleet/pull-messages", b"", None),
                              ("POST", "/v1/control/list-runs", b"", None),
                              ("POST", "/docs", b"", None)])  # fmt: skip
    assert [r.status_code for r in answers] == [401, 403, 503]
    assert answers[2].headers["retry-after"] == "1"
    assert (
        _call(gateway, [("POST", "/v1/fleet/pull-messages", b"", None)], peer="198.51.100.1")[
            0
        ].status_code
        == 401
    )  # another address has its own bucket
    assert superlink.paths == []


def test_token_bucket_refills_at_its_rate():
    t = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: t[0])
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    t[0] = 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("b") == 0.0


def test_superlink_down_is_a_retryable_502():
    private, public = generate_key_pairs()
    gateway = Gateway("https://127.0.0.1:9", limits=GatewayLimits(upstream_timeout=5))
    answer = _call(gateway, [("POST", "/v1/fleet/pull-messages", b"", _signed(private, public))])[0]
    assert answer.status_code == 502 and "not reachable" in answer.text


def test_counts_per_route_are_logged_at_shutdown(superlink, caplog):
    """One line when the gateway stops: what it forwarded per route (the benchmark reads it)."""
    import json
    import logging

    gateway = _gateway(superlink)
    private, public = generate_key_pairs()
    _call(gateway, [("POST", "/v1/fleet/get-run", b"", _signed(private, public)),
                    ("POST", "/v1/control/list-runs", b"", None)])  # fmt: skip

    async def lifespan() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[dict] = []

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        await gateway({"type": "lifespan"}, receive, send)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]

    with caplog.at_level(logging.INFO, logger="fedcare.gateway"):
        asyncio.run(lifespan())
    line = next(r.getMessage() for r in caplog.records if "forwarded per route" in r.getMessage())
    assert "1 requests forwarded, 1 refused" in line
    assert json.loads(line.split("forwarded per route: ")[1]) == {"get-run": 1}
