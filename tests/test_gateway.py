"""The coordinator's public gateway in front of Flower's real SuperLink app (in process, in-memory
state): only the Fleet API passes, with the SuperNode's authentication headers unchanged; a
stranger's Control / Runtime calls never reach Flower. Over real processes and TLS:
tests/test_e2e_deployment.py."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import time
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

from server.gateway import FLEET_ROUTES, Gateway, GatewayLimits, RegisteredKeys, TokenBuckets
from shared_models.node_keys import fingerprint, openssh_public_line

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


# --- a network stranger: registered keys, bytes in flight, rates per key, timeouts, logs ------


def _registry(root, hospitals) -> RegisteredKeys:  # type: ignore[no-untyped-def]
    """A PKI folder as `fedcare server add-hospital` leaves it: NAME.pub and a node id each."""
    (root / "hospitals").mkdir(parents=True, exist_ok=True)
    entries = {}
    for node_id, (name, public) in enumerate(hospitals.items(), start=1):
        pub = root / "hospitals" / f"{name}.pub"
        pub.write_bytes(openssh_public_line(public, name))
        entries[name] = {"node_id": node_id, "fingerprint": fingerprint(public)}
    (root / "registered.json").write_text(json.dumps({"hospitals": entries, "revoked": []}))
    return RegisteredKeys(root)


class Body:
    """A request body the test can watch: how many chunks the gateway pulled, and when."""

    def __init__(self, chunks: int, size: int = 1000, hold: asyncio.Event | None = None) -> None:
        self.chunks, self.size, self.hold, self.pulled = chunks, size, hold, 0

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        for _ in range(self.chunks):
            self.pulled += 1
            if self.hold is not None:
                await self.hold.wait()
            yield b"x" * self.size


async def _send(app, method, path, content, headers, peer="203.0.113.7") -> httpx.Response:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="https://coordinator") as c:
        return await c.request(method, path, content=content, headers=headers)


def test_an_unregistered_key_is_refused_before_its_body_is_read(superlink, tmp_path):
    """A self-made key with a valid signature (what made the gateway buffer 24 x 16 MiB, 1.6 GB)
    gets 401 -- on activate-node Flower's own 412 / code 2004, which the hospital's daemon
    explains -- without a byte of its body read, and the connection is closed; a registered
    hospital's call passes."""
    hospital, stranger = generate_key_pairs(), generate_key_pairs()
    gateway = Gateway("http://superlink", transport=httpx.ASGITransport(app=superlink),
                      registered=_registry(tmp_path, {"a": hospital[1]}))  # fmt: skip
    big = {"content-length": str(16 * 2**20)}
    bodies = [Body(16 * 2**10, 2**10) for _ in range(3)]

    async def go() -> list[httpx.Response]:
        return [
            await _send(gateway, "POST", "/v1/fleet/push-object", bodies[0],
                        {**_signed(*stranger), **big}),
            await _send(gateway, "POST", "/v1/fleet/activate-node", bodies[1],
                        {**_signed(*stranger), **big}),
            await _send(gateway, "POST", "/v1/fleet/get-run", b"", _signed(*hospital)),
        ]  # fmt: skip

    refused, activation, hospital_call = asyncio.run(go())
    assert refused.status_code == 401 and "public key not registered" in refused.text
    assert activation.status_code == 412 and activation.json() == {
        "code": 2004, "detail": "Failed to activate SuperNode."
    }  # fmt: skip
    assert [b.pulled for b in bodies[:2]] == [0, 0]
    assert refused.headers["connection"] == activation.headers["connection"] == "close"
    assert gateway.in_flight.held == 0
    assert hospital_call.status_code != 401 or "Invalid SuperNode" in hospital_call.text
    assert superlink.paths == ["/v1/fleet/get-run"]  # only the registered hospital's call


def test_a_removed_key_is_told_it_was_removed(superlink, tmp_path):
    """After `remove-hospital` (the registry's own code), the removed key's activation, signed
    by its private key, gets Flower's refusal (412, code 2004) with the removal's time, which
    the hospital's daemon reads (shared_models.protocol.removed_key_time); the same public key
    signed by another key, and a never-registered key, get the plain refusal. Nothing reaches
    Flower."""
    from server.hospitals import HospitalRegistry
    from server.pki import PKI
    from shared_models.protocol import KEY_REMOVED, removed_key_time

    removed, other, never = generate_key_pairs(), generate_key_pairs(), generate_key_pairs()
    keys = _registry(tmp_path, {"gone": removed[1]})
    HospitalRegistry(PKI(tmp_path)).remove("gone")
    removed_at = json.loads((tmp_path / "registered.json").read_text())["removed_keys"][0]
    gateway = Gateway("http://superlink", transport=httpx.ASGITransport(app=superlink),
                      registered=keys)  # fmt: skip
    forged = {**_signed(other[0], other[1]),
              "flwr-public-key": _signed(*removed)["flwr-public-key"]}  # fmt: skip
    answers = _call(gateway, [
        ("POST", "/v1/fleet/activate-node", b"", _signed(*removed)),
        ("POST", "/v1/fleet/activate-node", b"", forged),
        ("POST", "/v1/fleet/activate-node", b"", _signed(*never)),
        ("POST", "/v1/fleet/pull-messages", b"", _signed(*removed)),
    ])  # fmt: skip
    told = answers[0].json()
    assert answers[0].status_code == 412 and told["code"] == 2004
    assert f"{KEY_REMOVED} {removed_at['removed_at']}" in told["detail"]
    assert removed_key_time(f"[code: 2004] {told['detail']}") == removed_at["removed_at"]
    plain = {"code": 2004, "detail": "Failed to activate SuperNode."}
    assert [a.status_code for a in answers[1:]] == [412, 412, 401]
    assert answers[1].json() == answers[2].json() == plain
    assert superlink.paths == []


def test_registered_keys_follow_the_pki_folder(tmp_path):
    """A key is known at its hospital's first request after `add-hospital` (an unexpected 401
    stops Flower's SuperNode), and forgotten within a second of `remove-hospital`."""
    a, b = generate_key_pairs()[1], generate_key_pairs()[1]
    t = [0.0]
    keys = _registry(tmp_path, {"a": a})
    keys.clock = lambda: t[0]
    assert public_key_to_bytes(a) in keys and public_key_to_bytes(b) not in keys
    _registry(tmp_path, {"a": a, "b": b})  # added: known at once, no wait
    assert public_key_to_bytes(b) in keys
    (tmp_path / "hospitals" / "a.pub").unlink()
    (tmp_path / "registered.json").write_text(json.dumps({"hospitals": {"b": {"node_id": 2}}}))
    t[0] = 0.5
    assert public_key_to_bytes(a) in keys  # checked at most once a second for known keys
    t[0] = 1.5
    assert public_key_to_bytes(a) not in keys and public_key_to_bytes(b) in keys
    (tmp_path / "registered.json").write_text(json.dumps({"hospitals": {"b": {"node_id": None}}}))
    t[0] = 2.5
    assert public_key_to_bytes(b) not in keys  # added but not registered with the SuperLink yet
    _registry(tmp_path, {"b": b})
    assert public_key_to_bytes(b) in keys
    (tmp_path / "registered.json").write_text("{broken")
    t[0] = 3.5
    assert public_key_to_bytes(b) not in keys  # unreadable: nobody (logged), never a crash


def test_bytes_in_flight_are_bounded_across_requests(superlink):
    """Without a PKI folder any validly signed key reaches the body, so the bodies held at once
    are bounded, whatever the keys: a request that does not fit gets 503 + Retry-After (which
    Flower's SuperNode retries) before its body is read; once the others are done it fits."""
    gateway = _gateway(superlink, max_body_bytes=1000, max_bytes_in_flight=1500)
    hold = asyncio.Event()
    slow = [Body(1, 600, hold) for _ in range(2)]
    third = Body(1, 600)

    async def go() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        pending = [
            asyncio.create_task(_send(gateway, "POST", "/v1/fleet/push-object", body,
                                      {**_signed(*generate_key_pairs()), "content-length": "600"}))
            for body in slow
        ]  # fmt: skip
        await asyncio.sleep(0.1)
        assert gateway.in_flight.held == 1200
        over = await _send(gateway, "POST", "/v1/fleet/push-object", third,
                           {**_signed(*generate_key_pairs()), "content-length": "600"})  # fmt: skip
        undeclared = await _send(gateway, "POST", "/v1/fleet/push-object", Body(1, 10),
                                 _signed(*generate_key_pairs()))  # fmt: skip
        hold.set()
        return await asyncio.gather(*pending), over, undeclared

    done, over, undeclared = asyncio.run(go())
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert "holds as many request bodies" in over.text and third.pulled == 0
    assert undeclared.status_code == 503  # no length declared: max_body_bytes is reserved
    assert [r.status_code for r in done] != [503, 503] and gateway.in_flight.held == 0
    assert superlink.paths == ["/v1/fleet/push-object"] * 2
    again = _call(gateway, [("POST", "/v1/fleet/push-object", b"x" * 600,
                             _signed(*generate_key_pairs()))])  # fmt: skip
    assert again[0].status_code != 503 and gateway.in_flight.held == 0


def test_requests_in_progress_are_bounded(superlink):
    gateway = _gateway(superlink, max_requests=2)
    hold = asyncio.Event()

    async def go() -> tuple[httpx.Response, list[httpx.Response]]:
        pending = [
            asyncio.create_task(_send(gateway, "POST", "/v1/fleet/push-object", Body(1, 10, hold),
                                      {**_signed(*generate_key_pairs()), "content-length": "10"}))
            for _ in range(2)
        ]  # fmt: skip
        await asyncio.sleep(0.1)
        busy = await _send(gateway, "POST", "/v1/fleet/get-run", b"", PROTOBUF)
        hold.set()
        return busy, await asyncio.gather(*pending)

    busy, done = asyncio.run(go())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert all(r.status_code != 503 for r in done) and gateway.active == 0


def test_request_rate_is_bounded_per_hospital_key_across_addresses(superlink, tmp_path):
    """One hospital key from ever new addresses (127.0.0.2, .3, .4 each had a fresh burst) is
    still bounded; another hospital is not affected; a stranger sending the hospital's public
    key without its private key, or flooding from the hospital's own address (a shared NAT),
    spends the address's tokens, not the hospital's."""
    a, b = generate_key_pairs(), generate_key_pairs()
    gateway = Gateway(
        "http://superlink", transport=httpx.ASGITransport(app=superlink),
        limits=GatewayLimits(rate=0.01, burst=3, key_rate=0.01, key_burst=2),
        registered=_registry(tmp_path, {"a": a[1], "b": b[1]}),
    )  # fmt: skip
    forged = _signed(*generate_key_pairs())
    forged["flwr-public-key"] = _signed(*a)["flwr-public-key"]
    nat = "198.51.100.9"

    async def go() -> list[httpx.Response]:
        answers = [await _send(gateway, "POST", "/v1/fleet/get-run", b"", forged, peer=nat)
                   for _ in range(5)]  # fmt: skip
        for i in range(3):
            answers.append(await _send(gateway, "POST", "/v1/fleet/get-run", b"", _signed(*a),
                                       peer=f"127.0.0.{i + 2}"))  # fmt: skip
        answers.append(await _send(gateway, "POST", "/v1/fleet/get-run", b"", _signed(*b),
                                   peer=nat))  # fmt: skip
        return answers

    answers = asyncio.run(go())
    assert [r.status_code for r in answers[:5]] == [401, 401, 401, 503, 503]
    assert "request rate limit exceeded" in answers[3].text
    assert [r.status_code == 503 for r in answers[5:]] == [False, False, True, False]
    assert "rate limit of this hospital key" in answers[7].text
    assert int(answers[7].headers["retry-after"]) >= 1
    assert superlink.paths == ["/v1/fleet/get-run"] * 3


def test_a_slow_body_is_refused_with_408_and_its_connection_closed(superlink):
    gateway = _gateway(superlink, body_timeout=0.2)

    class Trickle(Body):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"x" * 100
            await asyncio.sleep(30)  # never finishes
            yield b"x"

    started = time.monotonic()
    answer = asyncio.run(_send(gateway, "POST", "/v1/fleet/push-object", Trickle(0),
                               {**_signed(*generate_key_pairs()), "content-length": "101"}))  # fmt: skip
    assert answer.status_code == 408 and answer.headers["connection"] == "close"
    assert time.monotonic() - started < 5
    assert gateway.in_flight.held == 0 and superlink.paths == []


def _status(gateway, path: str, method: str = "POST", peer: str = "203.0.113.7") -> int:  # type: ignore[no-untyped-def]
    """The status of one body-less request, as uvicorn passes it (its path already decoded)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": [], "client": (peer, 1)}  # fmt: skip
    asyncio.run(gateway(scope, receive, send))
    return sent[0]["status"]


def test_a_refusal_is_one_log_line_whatever_the_client_sends(superlink, caplog):
    """An encoded newline in the path (``/v1/fleet/x%0Aforged line``, which uvicorn decodes)
    once wrote a forged line into gateway.log: now whatever the client sent is escaped."""
    import logging

    gateway = _gateway(superlink)
    paths = ["/v1/fleet/x\n2026-12-07 10:00:00,000 fedcare.gateway forged line",
             "/v1/control/x\r\nforged\x1b[2J", "/v1/fleet/x\u2028forged\\n"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="fedcare.gateway"):
        codes = [_status(gateway, p) for p in paths] + [_status(gateway, "/x", "GET\nforged")]
        codes.append(_status(gateway, "/v1/fleet/get-run\r\n"))  # not get-run (url.path: it was)
    assert codes == [404, 403, 404, 404, 404]
    lines = [caplog.handler.format(r) for r in caplog.records]
    assert len(lines) == 5 and all(len(line.splitlines()) == 1 for line in lines)
    assert all(c.isprintable() and c.isascii() for line in lines for c in line)
    assert "refused POST /v1/fleet/x\\n2026-12-07 10:00:00,000 fedcare.gateway forged" in lines[0]
    assert "/v1/control/x\\r\\nforged\\x1b[2J from 203.0.113.7: 403" in lines[1]
    assert "/v1/fleet/x\\u2028forged\\\\n from" in lines[2]  # a backslash is escaped too
    assert "refused GET\\nforged /x from" in lines[3]


def test_refusal_lines_are_bounded_per_address_and_in_all(superlink, caplog):
    import logging

    gateway = _gateway(superlink)
    with caplog.at_level(logging.INFO, logger="fedcare.gateway"):
        for i in range(11):
            for _ in range(102):
                assert _status(gateway, "/docs", peer=f"198.51.100.{i}") == 404
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1001 and gateway.refused == 11 * 102
    assert lines[100] == "further refusals from 198.51.100.0 this minute are not logged"
    assert lines[-1] == "further refusals this minute are not logged (1000 lines)"


def test_the_server_closes_idle_and_slow_connections(tmp_path):
    """The real server (`serve`: uvicorn, TLS) with short timeouts: idle TLS connections and
    plain TCP connections that never finish a handshake do not make a request 503 (uvicorn's
    limit_concurrency counted them) and are closed; so is a connection that sends its headers
    a byte at a time, and one whose headers are too long. X-Forwarded-For is not believed."""
    import resource
    import socket
    import ssl
    import subprocess
    import sys

    from server.pki import init_pki

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    init_pki(tmp_path, addresses=["127.0.0.1"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import logging, sys; from server.gateway import Gateway, GatewayLimits, serve; "
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
        "limits = GatewayLimits(header_timeout=0.5, tls_handshake_timeout=0.5, keep_alive_timeout=1); "
        f"serve(Gateway('https://127.0.0.1:9', limits=limits), host='127.0.0.1', port={port}, "
        f"certfile='{tmp_path / 'server.pem'}', keyfile='{tmp_path / 'server.key'}')"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    context = ssl.create_default_context(cafile=tmp_path / "ca.pem")
    conns: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            time.sleep(0.2)
        plain = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        tls = [context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                   server_hostname="127.0.0.1") for _ in range(300)]  # fmt: skip
        conns, opened = plain + tls, time.monotonic()
        with httpx.Client(verify=context, timeout=10) as http:
            answer = http.post(f"https://127.0.0.1:{port}/v1/fleet/get-run",
                               headers={"x-forwarded-for": "192.0.2.99"})  # fmt: skip
        assert answer.status_code == 401, answer.text  # reached the gateway's own checks
        slow = context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                   server_hostname="127.0.0.1")  # fmt: skip
        conns.append(slow)
        slow.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\n")
        closed_at = None
        for _ in range(40):  # a header byte every 0.1 s: still closed within the deadline
            try:
                slow.sendall(b"x")
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.1)
        forged = context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                     server_hostname="127.0.0.1")  # fmt: skip
        conns.append(forged)
        forged.sendall(b"POST /v1/fleet/x%0Aforged%20line%0D%0A HTTP/1.1\r\nhost: x\r\n\r\n")
        assert forged.recv(100).startswith(b"HTTP/1.1 404")
        big = context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                  server_hostname="127.0.0.1")  # fmt: skip
        conns.append(big)
        big.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nx: " + b"y" * 40_000 + b"\r\n\r\n")
        assert big.recv(100).startswith(b"HTTP/1.1 400")
        time.sleep(max(0.0, opened + 3.0 - time.monotonic()))
        for i, conn in enumerate(plain + tls):  # every one closed by the server by now
            conn.settimeout(0.2)
            with contextlib.suppress(ConnectionError, ssl.SSLError):  # closed too (not a timeout)
                assert conn.recv(1) == b"", i
        assert closed_at is not None
    finally:
        for conn in conns:
            conn.close()
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "refused POST /v1/fleet/get-run from 127.0.0.1: 401" in out, out
    assert "192.0.2.99" not in out
    assert [line for line in out.splitlines() if "forged" in line] == [
        "INFO:fedcare.gateway:refused POST /v1/fleet/x\\nforged line\\r\\n from 127.0.0.1: 404 not found"
    ]


def test_a_registered_key_that_flower_cannot_activate_is_told_it_is_still_online(
    superlink, tmp_path
):
    """Flower refuses every failed activation alike (412, code 2004); a key the coordinator has
    registered is refused only while its node still counts as online (a daemon killed without
    signing off). The gateway then ends that connection for the hospital (Flower's
    deactivate-node with the hospital's own authentication, for the node the key is registered
    under) and activates again; when that fails too (here: Flower's app has no such node), the
    hospital is told why, not "not registered" (client.join reads STILL_ONLINE). Every request
    reaches Flower's real app; the successful take-over runs end to end in
    tests/test_e2e_deployment.py (the chaos test)."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest

    from shared_models.protocol import STILL_ONLINE

    pair = generate_key_pairs()
    keys = _registry(tmp_path, {"a": pair[1]})
    gateway = Gateway("http://superlink", transport=httpx.ASGITransport(app=superlink),
                      registered=keys)  # fmt: skip
    request = ActivateNodeRequest(
        public_key=public_key_to_bytes(pair[1]), heartbeat_interval=30
    ).SerializeToString()
    (answer,) = _call(gateway, [("POST", "/v1/fleet/activate-node", request, _signed(*pair))])
    assert superlink.paths == [  # Flower decided each
        "/v1/fleet/activate-node",
        "/v1/fleet/deactivate-node",
        "/v1/fleet/activate-node",
    ]
    assert answer.status_code == 412 and answer.json()["code"] == 2004
    assert STILL_ONLINE in answer.json()["detail"]
