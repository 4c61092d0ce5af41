"""The coordinator's public address: an HTTPS reverse proxy that lets hospitals reach the Fleet
API and nothing else.

Flower 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr ls``, ``flwr supernode register`` ...) and the Runtime API (the ServerApp's tasks) on one
HTTPS port, and open-source Flower does not authenticate the Control API. ``fedcare server
start`` therefore runs the SuperLink on 127.0.0.1 and this gateway on the public address, with
the consortium's TLS certificate. For every request the gateway decides, in this order, before
anything reaches Flower:

1. the client address must be within its request rate (a token bucket per address) -- else 503
   with ``Retry-After`` (Flower's SuperNode retries 502/503/504 and gives up on other codes);
2. the path must be one of :data:`FLEET_ROUTES` (the calls an authenticated SuperNode makes,
   read from ``flwr/supernode/fleet_http_connection.py``; ``tests/test_gateway.py`` fails if
   Flower's own list changes) -- else 404 (403 for Flower's Control and Runtime APIs);
3. the method must be POST -- else 405;
4. the body must be at most ``max_body_bytes`` (Flower sends arrays in chunks of 5 MiB) -- else
   413;
5. the request must carry Flower's SuperNode authentication headers (``flwr-public-key``,
   ``flwr-timestamp``, ``flwr-signature``) with a valid signature over a fresh timestamp, checked
   as Flower's ``NodeAuthMiddleware`` checks them -- else 401. Whether the key is registered is
   then Flower's decision (its refusal reaches the hospital unchanged).

Allowed requests are forwarded unchanged (headers included, so Flower verifies the node's
signature itself) to the loopback SuperLink over TLS, and the answer is streamed back
(``httpx`` streaming, ``starlette`` responses, served by ``uvicorn``). Refusals are logged with
the client address (at most 100 lines per address and minute).

Run as ``python -m server.gateway --host H --port P --upstream https://127.0.0.1:Q --ca-cert
CA --certfile CERT --keyfile KEY`` (``fedcare server start`` does).
"""

from __future__ import annotations

import argparse
import binascii
import datetime
import json
import logging
import math
import ssl
import time
from base64 import b64decode
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger("fedcare.gateway")
LOG_PER_MINUTE = 100  # refusal lines per client address and minute

# what Flower 1.41's SuperNode calls when it authenticates with its own key (RegisterNode and
# UnregisterNode are only used by self-registering nodes; the SuperLink refuses them under
# --enable-supernode-auth anyway)
FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages",
        "push-messages", "get-run", "get-fab", "push-object", "pull-object",
        "confirm-message-received",
    )
)  # fmt: skip
PRIVATE_PREFIXES = ("/v1/control/", "/v1/runtime/")  # served on the loopback side only
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
RESPONSE_HOP_BY_HOP = HOP_BY_HOP - {"content-length"}  # the body is passed on byte for byte


@dataclass(frozen=True)
class GatewayLimits:
    """Limits per request and per client address.

    Attributes
    ----------
    max_body_bytes : int
        Largest request body (bytes). Flower splits arrays into 5 MiB chunks
        (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), so 16 MiB leaves room for protobuf framing.
    rate : float
        Sustained requests per second per client address. A hospital in fedcare's Fleet loop
        makes about 5 per second while idle (one pull every 0.2 s) and a burst of object
        transfers per round; several hospitals may share one address behind a NAT.
    burst : int
        Requests a client address may make at once (token bucket capacity).
    upstream_timeout : float
        Seconds to wait for the SuperLink (Flower's SuperNode waits 30 s).
    """

    max_body_bytes: int = 16 * 2**20
    rate: float = 100.0
    burst: int = 500
    upstream_timeout: float = 60.0


@dataclass
class TokenBuckets:
    """One token bucket per key (client address): ``rate`` tokens per second, ``burst`` at
    most. Idle buckets (full again) are dropped, so memory stays bounded by active clients."""

    rate: float
    burst: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _last_sweep: float = 0.0

    def take(self, key: str) -> float:
        """Take one token for ``key``; return 0.0, or the seconds until one is available."""
        t = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - last) * self.rate)
        if t - self._last_sweep > 60.0:
            self._sweep(t)
        if tokens < 1.0:
            self._buckets[key] = (tokens, t)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, t)
        return 0.0

    def _sweep(self, t: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if t - v[1] < full_after}
        self._last_sweep = t


def signature_problem(headers: Mapping[str, str]) -> str | None:
    """Why a request's SuperNode authentication headers are not acceptable, or None.

    The same checks as Flower 1.41's ``flwr.superlink.routers.fleet.node_auth
    .authenticate_node`` before it looks the key up: base64 public key (PEM) and signature,
    an ISO timestamp within ``TIMESTAMP_TOLERANCE`` (+ ``SYSTEM_TIME_TOLERANCE``) seconds, and a
    valid ECDSA signature of the timestamp by that key (``verify_signature``).
    """
    get = headers.get
    raw_key, raw_sig, stamp = (
        get(FLEET_HTTP_PUBLIC_KEY_HEADER), get(FLEET_HTTP_SIGNATURE_HEADER), get(TIMESTAMP_HEADER),
    )  # fmt: skip
    if not (raw_key and raw_sig and stamp):
        return "SuperNode authentication headers missing"
    try:
        public_key = bytes_to_public_key(b64decode(raw_key, validate=True))
        signature = b64decode(raw_sig, validate=True)
        age = (now() - datetime.datetime.fromisoformat(stamp)).total_seconds()
        if not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return "SuperNode authentication timestamp outside the allowed window"
        if not verify_signature(public_key, stamp.encode("ascii"), signature):
            return "invalid SuperNode signature"
    except (ValueError, TypeError, AttributeError, UnicodeError, binascii.Error,
            UnsupportedAlgorithm):  # fmt: skip
        return "malformed SuperNode authentication headers"
    return None


class Gateway:
    """The ASGI app: allow-list, limits, signature check, then a streaming forward.

    Parameters
    ----------
    upstream : str
        Base URL of the loopback SuperLink, e.g. ``https://127.0.0.1:9092``.
    verify : ssl.SSLContext | bool
        TLS verification of the SuperLink (the consortium CA).
    limits : GatewayLimits
        Body, rate and timeout limits.
    transport : httpx.AsyncBaseTransport, optional
        Transport to the SuperLink (tests pass ``httpx.ASGITransport`` over Flower's app).
    """

    def __init__(
        self,
        upstream: str,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: GatewayLimits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.limits = limits or GatewayLimits()
        self.buckets = TokenBuckets(self.limits.rate, self.limits.burst)
        self._verify, self._transport = verify, transport
        self._client: httpx.AsyncClient | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # address -> (minute start, refusals)
        self.forwarded: Counter[str] = Counter()  # route -> requests forwarded since the start
        self.refused = 0

    def client(self) -> httpx.AsyncClient:
        """The pooled HTTPS client to the SuperLink (keep-alive; created on first use)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._verify, transport=self._transport,
                timeout=self.limits.upstream_timeout, follow_redirects=False,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            )  # fmt: skip
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: nothing of Flower's
            return
        response = await self.handle(Request(scope, receive))
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                log.info(
                    "stopping: %d requests forwarded, %d refused; forwarded per route: %s",
                    sum(self.forwarded.values()), self.refused, json.dumps(dict(self.forwarded)),
                )  # fmt: skip
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refuse(self, request: Request, status: int, reason: str, **headers: str) -> Response:
        """Answer with ``status`` and log it: at most :data:`LOG_PER_MINUTE` lines per client
        address and minute, so that a flood does not fill the disk."""
        peer = request.client.host if request.client else "?"
        self.refused += 1
        t = time.monotonic()
        start, count = self._logged.get(peer, (t, 0))
        if t - start > 60:
            start, count = t, 0
        if count < LOG_PER_MINUTE:
            log.info("refused %s %s from %s: %d %s", request.method, request.url.path, peer,
                     status, reason)  # fmt: skip
        elif count == LOG_PER_MINUTE:
            log.info("further refusals from %s this minute are not logged", peer)
        self._logged[peer] = (start, count + 1)
        if len(self._logged) > 10_000:  # many addresses: forget those quiet for a minute
            self._logged = {k: v for k, v in self._logged.items() if t - v[0] <= 60}
        return JSONResponse({"error": reason}, status_code=status, headers=headers or None)

    async def handle(self, request: Request) -> Response:
        """Decide on one request (see the module docstring) and forward it if allowed."""
        path = request.url.path
        peer = request.client.host if request.client else "?"
        wait = self.buckets.take(peer)
        if wait > 0:
            return self._refuse(
                request, 503, "request rate limit exceeded", **{"retry-after": str(math.ceil(wait))}
            )
        if path not in FLEET_ROUTES:
            if path.startswith(PRIVATE_PREFIXES):
                return self._refuse(
                    request, 403, "not served on the coordinator's public address (Fleet API only)"
                )
            return self._refuse(request, 404, "not found")
        if request.method != "POST":
            return self._refuse(request, 405, "POST only", allow="POST")
        declared = request.headers.get("content-length")
        if declared is not None and (
            not declared.isdigit() or int(declared) > self.limits.max_body_bytes
        ):
            return self._refuse(
                request, 413, f"body larger than {self.limits.max_body_bytes} bytes"
            )
        problem = signature_problem(request.headers)
        if problem is not None:
            return self._refuse(request, 401, problem)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                return self._refuse(
                    request, 413, f"body larger than {self.limits.max_body_bytes} bytes"
                )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        client = self.client()
        try:
            upstream = await client.send(
                client.build_request("POST", self.upstream + path, headers=headers, content=bytes(body)),
                stream=True,
            )  # fmt: skip
        except httpx.TimeoutException:
            return self._refuse(request, 504, "the coordinator's SuperLink did not answer in time")
        except httpx.HTTPError:
            return self._refuse(request, 502, "the coordinator's SuperLink is not reachable")
        self.forwarded[path.rsplit("/", 1)[1]] += 1
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_HOP_BY_HOP
            },
            background=BackgroundTask(upstream.aclose),
        )


def upstream_tls(ca_cert: str) -> ssl.SSLContext:
    """TLS context that trusts only the consortium CA (the SuperLink's certificate must be valid
    for 127.0.0.1, as ``fedcare server init`` issues it)."""
    return ssl.create_default_context(cafile=ca_cert)


def main(argv: list[str] | None = None) -> None:
    """Serve the gateway with uvicorn over TLS until SIGTERM / SIGINT."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", required=True, help="public interface to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="https://127.0.0.1:PORT (the SuperLink)")
    parser.add_argument("--ca-cert", required=True, help="consortium CA certificate (PEM)")
    parser.add_argument("--certfile", required=True, help="coordinator TLS certificate (PEM)")
    parser.add_argument("--keyfile", required=True, help="its private key (PEM)")
    defaults = GatewayLimits()
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests/s per address")
    parser.add_argument("--burst", type=int, default=defaults.burst)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per forwarded request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    limits = GatewayLimits(max_body_bytes=int(args.max_body_mb * 2**20), rate=args.rate,
                           burst=args.burst)  # fmt: skip
    app = Gateway(args.upstream, verify=upstream_tls(args.ca_cert), limits=limits)
    log.info(
        "fedcare gateway on https://%s:%d -> %s: Fleet API only (%d routes), body <= %d bytes, "
        "%g requests/s per address (burst %d)", args.host, args.port, args.upstream,
        len(FLEET_ROUTES), limits.max_body_bytes, limits.rate, limits.burst,
    )  # fmt: skip
    uvicorn.run(
        app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
        log_level="warning", access_log=False, server_header=False, limit_concurrency=256,
        timeout_graceful_shutdown=5,
    )  # fmt: skip


if __name__ == "__main__":
    main()
