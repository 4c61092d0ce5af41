"""The coordinator's public address: an HTTPS reverse proxy that lets hospitals reach the Fleet
API and nothing else.

Flower 1.41's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr ls``, ``flwr supernode register`` ...) and the Runtime API (the ServerApp's tasks) on one
HTTPS port, and open-source Flower does not authenticate the Control API. ``fedcare server
start`` therefore runs the SuperLink on 127.0.0.1 and this gateway on the public address, with
the consortium's TLS certificate. For every request the gateway decides, in this order, before
anything reaches Flower:

1. fewer than ``max_requests`` requests may be in progress in the gateway -- else 503 with
   ``Retry-After`` (Flower's SuperNode retries 502/503/504 and gives up on other codes);
2. a request from a registered hospital (one that passes step 6) must be within its key's
   request rate (a token bucket per registered key, whatever address it comes from), any other
   request within its client address's rate (a token bucket per address; strangers behind a
   hospital's NAT do not use up the hospital's requests) -- else 503 with ``Retry-After``;
3. the path must be one of :data:`FLEET_ROUTES` (the calls an authenticated SuperNode makes,
   read from ``flwr/supernode/fleet_http_connection.py``; ``tests/test_gateway.py`` fails if
   Flower's own list changes) -- else 404 (403 for Flower's Control and Runtime APIs);
4. the method must be POST -- else 405;
5. the declared body must be at most ``max_body_bytes`` (Flower sends arrays in chunks of
   5 MiB) -- else 413;
6. the request must carry Flower's SuperNode authentication headers (``flwr-public-key``,
   ``flwr-timestamp``, ``flwr-signature``) with the public key of a hospital registered on the
   coordinator (:class:`RegisteredKeys`: the PKI folder that ``fedcare server add-hospital``
   keeps) -- else 401, or on ``activate-node`` Flower's own answer to an unregistered key (412,
   code 2004: fedcare's hospital daemon tells its operator and tries again later), with the
   removal's time for a key the coordinator removed (``remove-hospital``; only with a valid
   signature: that hospital's daemon stops) -- and a valid signature over a fresh timestamp,
   checked as Flower's ``NodeAuthMiddleware`` checks it -- else 401;
7. the body must fit in what the gateway holds for all requests together
   (``max_bytes_in_flight``: the declared length, or ``max_body_bytes`` when none is declared,
   is reserved before the body is read) -- else 503 with ``Retry-After``;
8. the body must arrive within ``body_timeout`` seconds -- else 408 -- and be at most
   ``max_body_bytes`` -- else 413.

A refusal before the body has been read closes the connection, so that the body is never
received. Without a PKI folder (``--pki``), step 6 accepts any key with a valid signature and
step 2 limits every request per address: steps 7 and 8 then bound what a self-made key can make
the gateway hold. Flower checks the key again (it is the SuperLink that knows which keys are
registered; the gateway's list follows the PKI folder), and its refusal reaches the hospital
unchanged.

Connections (:func:`serve`, uvicorn with h11 on asyncio): the TLS handshake must finish within
``tls_handshake_timeout`` seconds, and the request line and headers (at most
``max_header_bytes``) within ``header_timeout`` seconds of it, or of their first byte on a
kept-alive connection, which is closed after ``keep_alive_timeout`` idle seconds. uvicorn's
``limit_concurrency`` is not used: it counts idle connections, and a stranger holding that many
made every hospital's request 503; requests are bounded in the gateway instead (steps 1, 7, 8).

Allowed requests are forwarded unchanged (headers included, so Flower verifies the node's
signature itself) to the loopback SuperLink over TLS, and the answer is streamed back
(``httpx`` streaming, ``starlette`` responses, served by ``uvicorn``). Refusals are logged with
the client address (at most 100 lines per address and 1,000 in all per minute), whatever the
client sent escaped (:func:`printable`), so that one refusal is one line.

Run as ``python -m server.gateway --host H --port P --upstream https://127.0.0.1:Q --ca-cert
CA --certfile CERT --keyfile KEY --pki PKI`` (``fedcare server start`` does).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import datetime
import json
import logging
import math
import resource
import ssl
import time
from base64 import b64decode
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    public_key_to_bytes,
    verify_signature,
)
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.hospitals import REGISTERED, HospitalRegistry
from server.pki import PKI, PKIError
from shared_models.files import write_json_atomic
from shared_models.node_keys import KeyFileError, fingerprint, load_public_key
from shared_models.protocol import KEY_REMOVED, removed_key_detail, still_online_detail

log = logging.getLogger("fedcare.gateway")
LOG_PER_MINUTE = 100  # refusal lines per client address and minute
LOG_PER_MINUTE_ALL = 1000  # refusal lines per minute, all addresses together
LOGGED_CHARS = 200  # of a path or header value, once escaped
TLS_READ_BUFFER = 16 * 2**10  # asyncio's TLS read buffer per connection (default 256 KiB)

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
# Flower 1.41's answer to activate-node with a valid signature by an unregistered key
# (flwr.supercore.error: FLEET_NODE_ACTIVATION_FAILED); the hospital's daemon explains it
UNREGISTERED_ACTIVATION = {"code": 2004, "detail": "Failed to activate SuperNode."}  # with 412


@dataclass(frozen=True)
class GatewayLimits:
    """Limits per request, per client address, per hospital key, and for everything at once.

    Attributes
    ----------
    max_body_bytes : int
        Largest request body (bytes). Flower splits arrays into 5 MiB chunks
        (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), so 16 MiB leaves room for protobuf framing.
    max_bytes_in_flight : int
        Request bodies the gateway holds at once, all requests together (bytes). A SuperNode
        pushes at most 2 objects at a time (``FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES``), i.e.
        about 10 MiB; beyond this the request gets 503 and the SuperNode retries it.
    max_requests : int
        Requests in progress in the gateway at once (reading, forwarding or answering).
    rate : float
        Sustained requests per second per client address, for requests that are not from a
        registered hospital (all requests when the gateway has no PKI folder: then several
        hospitals may share one address behind a NAT).
    burst : int
        Requests a client address may make at once (token bucket capacity).
    key_rate : float
        Sustained requests per second per registered hospital key, from all addresses
        together. A hospital in fedcare's Fleet loop makes at most about 5 per second (one pull
        every 0.2 s while messages flow, fewer when idle) and a burst of object transfers per
        round.
    key_burst : int
        Requests a hospital key may make at once.
    body_timeout : float
        Seconds for a request body to arrive once its headers have (16 MiB in 30 s needs
        4.5 Mbit/s; Flower's 5 MiB chunks need 1.4 Mbit/s).
    header_timeout : float
        Seconds for the request line and headers to arrive, from the end of the TLS handshake
        (first request) or from their first byte (later requests on the connection).
    tls_handshake_timeout : float
        Seconds for a client to finish the TLS handshake after connecting.
    keep_alive_timeout : int
        Seconds an idle connection is kept open after a response (an idle SuperNode polls at
        least every 2 s, ``shared_models.protocol.poll_wait``).
    max_header_bytes : int
        Largest request line and headers (bytes; Flower's are under 1 KiB).
    upstream_timeout : float
        Seconds to wait for the SuperLink (Flower's SuperNode waits 30 s).
    """

    max_body_bytes: int = 16 * 2**20
    max_bytes_in_flight: int = 64 * 2**20
    max_requests: int = 256
    rate: float = 100.0
    burst: int = 500
    key_rate: float = 50.0
    key_burst: int = 250
    body_timeout: float = 30.0
    header_timeout: float = 5.0
    tls_handshake_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_header_bytes: int = 16 * 2**10
    upstream_timeout: float = 60.0


@dataclass
class TokenBuckets:
    """One token bucket per key (client address, or hospital key): ``rate`` tokens per second,
    ``burst`` at most. Idle buckets (full again) are dropped, so memory stays bounded by active
    clients."""

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


@dataclass
class ByteBudget:
    """Bytes of request bodies the gateway may hold at once, across all requests."""

    capacity: int
    held: int = 0

    def reserve(self, n: int) -> bool:
        """Hold ``n`` more bytes if they fit; whether they did."""
        if self.held + n > self.capacity:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held -= n


@dataclass
class RegisteredKeys:
    """The public keys of the hospitals registered with the SuperLink, as a SuperNode sends them
    (the PEM that ``flwr-public-key`` carries in base64), read from the coordinator's PKI folder.

    ``fedcare server add-hospital``, ``remove-hospital`` and ``server start`` keep
    ``PKI/registered.json`` and ``PKI/hospitals/NAME.pub`` (:mod:`server.hospitals`): a key is
    registered once its hospital has a node id there. The files are read again when they change
    (modification time, size or inode of ``registered.json`` and of ``hospitals/``): checked for
    every unknown key, so that a hospital registered a moment ago is known at its first request
    (an unexpected 401 makes Flower's SuperNode stop), and at most once per ``recheck`` seconds
    for known keys (a removed key passes that long; the SuperLink refuses it already).

    Parameters
    ----------
    root : Path
        The PKI folder (``fedcare server init --out``).
    recheck : float
        Seconds between checks of the files while only known keys arrive.
    """

    root: Path
    recheck: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _keys: dict[bytes, int] = field(default_factory=dict)  # public key -> Flower node id
    _removed: dict[str, str] = field(default_factory=dict)  # fingerprint -> removal time
    _stamp: tuple[tuple[int, int, int] | None, ...] = ()
    _checked: float = -math.inf

    def __contains__(self, public_key: bytes) -> bool:
        t = self.clock()
        if public_key not in self._keys or t - self._checked >= self.recheck:
            self._checked = t
            self._refresh()
        return public_key in self._keys

    def node_id(self, public_key: bytes) -> int | None:
        """The Flower node id the coordinator registered this key under (as last read), or
        None."""
        return self._keys.get(public_key)

    def removed_at(self, public_key: bytes) -> str | None:
        """When the coordinator removed this key (``registered.json``'s ``removed_keys``, as
        read by the last check of the files), else None.

        Parameters
        ----------
        public_key : bytes
            The PEM a SuperNode sends in ``flwr-public-key`` (base64-decoded).
        """
        if not self._removed:
            return None
        try:
            key = bytes_to_public_key(public_key)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        return self._removed.get(fingerprint(key))

    def _files_stamp(self) -> tuple[tuple[int, int, int] | None, ...]:
        stamps: list[tuple[int, int, int] | None] = []
        for path in (self.root / REGISTERED, PKI(self.root).hospitals_dir):
            try:
                st = path.stat()
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def _refresh(self) -> None:
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._keys, self._removed = self._load()
        log.info("%d registered hospital keys, %d removed (from %s)", len(self._keys),
                 len(self._removed), self.root)  # fmt: skip

    def _load(self) -> tuple[dict[bytes, int], dict[str, str]]:
        pki = PKI(self.root)
        try:
            data = HospitalRegistry(pki).load()
        except (PKIError, OSError) as exc:
            log.warning("registered keys unreadable, none accepted until it is fixed: %s", exc)
            return {}, {}
        hospitals = data["hospitals"]
        removed = {
            str(entry["fingerprint"]): str(entry.get("removed_at") or "?")
            for entry in data["removed_keys"]
            if isinstance(entry, dict) and entry.get("fingerprint")
        }
        keys: dict[bytes, int] = {}
        for name, entry in hospitals.items():
            if not isinstance(entry, dict) or entry.get("node_id") is None:
                continue
            try:
                keys[public_key_to_bytes(load_public_key(pki.hospital_pub(name)))] = int(
                    entry["node_id"]
                )
            except (KeyFileError, OSError, ValueError, TypeError) as exc:
                log.warning("hospital %s: key not accepted: %s", printable(name), exc)
        return keys, removed


def printable(text: str, limit: int = LOGGED_CHARS) -> str:
    r"""``text`` as part of one log line: backslashes, control characters and everything beyond
    ASCII escaped (``\n``, ``\x1b``, ``\u2028``), cut to ``limit`` characters."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


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


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )


async def _drain(chunks: deque[bytes]) -> AsyncIterator[bytes]:
    """Yield the buffered body, letting go of each chunk once it is sent."""
    while chunks:
        yield chunks.popleft()


class Gateway:
    """The ASGI app: allow-lists, limits, signature check, then a streaming forward.

    Parameters
    ----------
    upstream : str
        Base URL of the loopback SuperLink, e.g. ``https://127.0.0.1:9092``.
    verify : ssl.SSLContext | bool
        TLS verification of the SuperLink (the consortium CA).
    limits : GatewayLimits
        Body, rate, concurrency and timeout limits.
    registered : RegisteredKeys, optional
        The registered hospitals' keys; without it any key with a valid signature passes
        step 6 (see the module docstring).
    transport : httpx.AsyncBaseTransport, optional
        Transport to the SuperLink (tests pass ``httpx.ASGITransport`` over Flower's app).
    counters : Path, optional
        A JSON file the counters are written to (atomically, at most once a second, and at
        shutdown) for the coordinator's dashboard: ``{"updated", "forwarded": {route: n},
        "refused": {route: n}}``, routes named by their last segment (``pull-messages``), any
        path outside :data:`FLEET_ROUTES` counted as ``other``.
    """

    def __init__(
        self,
        upstream: str,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: GatewayLimits | None = None,
        registered: RegisteredKeys | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        counters: Path | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.limits = limits or GatewayLimits()
        self.registered = registered
        self.buckets = TokenBuckets(self.limits.rate, self.limits.burst)
        self.key_buckets = TokenBuckets(self.limits.key_rate, self.limits.key_burst)
        self.in_flight = ByteBudget(self.limits.max_bytes_in_flight)
        self.active = 0  # requests in progress
        self._verify, self._transport = verify, transport
        self._client: httpx.AsyncClient | None = None
        self._logged: dict[str, tuple[float, int]] = {}  # address -> (minute start, refusals)
        self._logged_all = (0.0, 0)  # (minute start, refusal lines), all addresses
        self.forwarded: Counter[str] = Counter()  # route -> requests forwarded since the start
        self.refused = 0
        self.refused_routes: Counter[str] = Counter()  # route (or "other") -> requests refused
        self.counters, self._counters_at = counters, -math.inf

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
        request = Request(scope, receive)
        if self.active >= self.limits.max_requests:
            busy = self._refuse(request, 503, "too many requests in progress", retry_after=1)
            await self._closing(request, busy)(scope, receive, send)
            return
        self.active += 1
        try:
            response = await self.handle(request)
            await response(scope, receive, send)
        finally:
            self.active -= 1
            self.write_counters()

    def write_counters(self, *, force: bool = False) -> None:
        """Write the counters file (see the class docstring), at most once a second."""
        t = time.monotonic()
        if self.counters is None or (not force and t - self._counters_at < 1.0):
            return
        self._counters_at = t
        document = {
            "updated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "forwarded": dict(self.forwarded), "refused": dict(self.refused_routes),
        }  # fmt: skip
        with contextlib.suppress(OSError):  # a full disk must not stop the gateway
            write_json_atomic(self.counters, document)

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
                self.write_counters(force=True)
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refuse(
        self,
        request: Request,
        status: int,
        reason: str,
        *,
        retry_after: float | None = None,
        content: dict[str, Any] | None = None,
        **headers: str,
    ) -> Response:
        """Answer with ``status`` (``content``, or the reason as JSON) and log it: at most
        :data:`LOG_PER_MINUTE` lines per client address and :data:`LOG_PER_MINUTE_ALL` in all
        per minute, so that a flood does not fill the disk, with what the client sent escaped."""
        self.refused += 1
        path = request.scope["path"]
        self.refused_routes[path.rsplit("/", 1)[1] if path in FLEET_ROUTES else "other"] += 1
        if retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        self._log_refusal(request, status, reason)
        return JSONResponse(
            content if content is not None else {"error": reason},
            status_code=status, headers=headers or None,
        )  # fmt: skip

    def _log_refusal(self, request: Request, status: int, reason: str) -> None:
        peer = printable(request.client.host) if request.client else "?"
        t = time.monotonic()
        start, count = self._logged.get(peer, (t, 0))
        if t - start > 60:
            start, count = t, 0
        all_start, all_count = self._logged_all
        if t - all_start > 60:
            all_start, all_count = t, 0
        if all_count < LOG_PER_MINUTE_ALL and count <= LOG_PER_MINUTE:
            if count < LOG_PER_MINUTE:
                log.info("refused %s %s from %s: %d %s", printable(request.method),
                         printable(request.scope["path"]), peer, status, reason)  # fmt: skip
            else:
                log.info("further refusals from %s this minute are not logged", peer)
            all_count += 1
        elif all_count == LOG_PER_MINUTE_ALL:
            log.info("further refusals this minute are not logged (%d lines)", all_count)
            all_count += 1
        self._logged[peer] = (start, count + 1)
        self._logged_all = (all_start, all_count)
        if len(self._logged) > 10_000:  # many addresses: forget those quiet for a minute
            self._logged = {k: v for k, v in self._logged.items() if t - v[0] <= 60}

    @staticmethod
    def _closing(request: Request, response: Response) -> Response:
        """``response``, closing the connection if the request's body was not read (so that it
        is not received at all)."""
        if _has_body(request):
            response.headers["connection"] = "close"
        return response

    async def handle(self, request: Request) -> Response:
        """Decide on one request (see the module docstring) and forward it if allowed."""
        refusal = self._check_head(request)
        if refusal is not None:
            return self._closing(request, refusal)
        declared = request.headers.get("content-length")
        reserved = int(declared) if declared is not None else self.limits.max_body_bytes
        if not self.in_flight.reserve(reserved):
            return self._closing(request, self._refuse(
                request, 503, "the gateway holds as many request bodies as it may", retry_after=1
            ))  # fmt: skip
        try:
            body = await self._read_body(request)
            if isinstance(body, Response):
                return body
            return await self._forward(request, body)
        finally:
            self.in_flight.release(reserved)

    def _check_head(self, request: Request) -> Response | None:
        """Steps 2 to 6 of the module docstring: a refusal, or None to go on. The path is the
        one uvicorn decoded (``request.url.path`` would drop a decoded CR / LF silently)."""
        path = request.scope["path"]
        problem = self._authentication_problem(request)
        if problem is None and self.registered is not None:  # a registered hospital
            wait = self.key_buckets.take(request.headers[FLEET_HTTP_PUBLIC_KEY_HEADER])
            limit = "request rate limit of this hospital key exceeded"
        else:
            wait = self.buckets.take(request.client.host if request.client else "?")
            limit = "request rate limit exceeded"
        if wait > 0:
            return self._refuse(request, 503, limit, retry_after=wait)
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
        if problem is not None:
            status, reason, content = problem
            return self._refuse(request, status, reason, content=content)
        return None

    def _authentication_problem(
        self, request: Request
    ) -> tuple[int, str, dict[str, Any] | None] | None:
        """Step 6: None for a registered key (any key without a PKI folder) with a valid
        signature, else the refusal's status, reason and body (None: the reason as JSON). An
        unregistered key costs a set look-up, no signature check; only the activation of a key
        the coordinator removed, with a valid signature, gets the removal's time
        (:func:`shared_models.protocol.removed_key_detail`, code 2004), so that its hospital's
        daemon stops instead of waiting to be registered."""
        raw_key = request.headers.get(FLEET_HTTP_PUBLIC_KEY_HEADER)
        if self.registered is not None and raw_key:
            try:
                key = b64decode(raw_key, validate=True)
                known = key in self.registered
            except (ValueError, binascii.Error):
                return 401, "malformed SuperNode authentication headers", None
            if not known:
                if request.scope["path"] != "/v1/fleet/activate-node":
                    return 401, "public key not registered", None
                removed_at = self.registered.removed_at(key)
                if removed_at is not None and signature_problem(request.headers) is None:
                    detail = removed_key_detail(removed_at)
                    return 412, f"public key {KEY_REMOVED} {removed_at}", {
                        "code": UNREGISTERED_ACTIVATION["code"], "detail": detail,
                    }  # fmt: skip
                return 412, "public key not registered", UNREGISTERED_ACTIVATION
        problem = signature_problem(request.headers)
        return None if problem is None else (401, problem, None)

    async def _read_body(self, request: Request) -> deque[bytes] | Response:
        """Step 8: the body, or the refusal that closes the connection."""
        chunks: deque[bytes] = deque()
        size, limit = 0, self.limits.max_body_bytes
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        refusal = self._refuse(request, 413, f"body larger than {limit} bytes")
                        return self._closing(request, refusal)
                    chunks.append(chunk)
        except TimeoutError:
            refusal = self._refuse(
                request, 408, f"request body not received within {self.limits.body_timeout:g} s"
            )
            return self._closing(request, refusal)
        except ClientDisconnect:
            return self._refuse(request, 400, "client disconnected before sending its body")
        return chunks

    async def _forward(self, request: Request, body: deque[bytes]) -> Response:
        """Send the request to the SuperLink; stream its answer back."""
        path = request.scope["path"]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers.append(("content-length", str(sum(map(len, body)))))
        # an activation (a few bytes) is kept: it may be repeated (_activation_refused)
        activation = b"".join(body) if path == "/v1/fleet/activate-node" else None
        client = self.client()
        try:
            upstream = await client.send(
                client.build_request("POST", self.upstream + path, headers=headers,
                                     content=activation if activation is not None else _drain(body)),
                stream=True,
            )  # fmt: skip
        except httpx.TimeoutException:
            return self._refuse(request, 504, "the coordinator's SuperLink did not answer in time")
        except httpx.HTTPError:
            return self._refuse(request, 502, "the coordinator's SuperLink is not reachable")
        self.forwarded[path.rsplit("/", 1)[1]] += 1
        if (
            path == "/v1/fleet/activate-node"
            and upstream.status_code == 412
            and self.registered is not None
        ):
            return await self._activation_refused(request, upstream, headers, activation or b"")
        return StreamingResponse(
            upstream.aiter_raw(),
            status_code=upstream.status_code,
            headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in RESPONSE_HOP_BY_HOP
            },
            background=BackgroundTask(upstream.aclose),
        )

    async def _activation_refused(
        self, request: Request, upstream: httpx.Response, headers: list[tuple[str, str]],
        activation: bytes,
    ) -> Response:  # fmt: skip
        """Flower's refusal to activate a key that passed the registered-key check (step 6).

        Flower answers every failed activation alike (code 2004, "Failed to activate
        SuperNode."); for a registered key the cause is that its node still counts as online:
        its previous connection ended without signing off (a daemon killed, a lost network) and
        the SuperLink would let it time out only after two heartbeat intervals (60 s), refusing
        the restarted daemon all that time. The hospital has just proved that it holds the key
        (a fresh signature), so the gateway ends the stale connection for it -- Flower's own
        ``deactivate-node`` for the node the coordinator registered this key under, with the
        same authentication headers, which Flower checks against that node -- and activates
        again. If that fails too, the hospital is told why
        (:func:`shared_models.protocol.still_online_detail`), not "not registered". Any other
        refusal passes unchanged."""
        body = await upstream.aread()
        await upstream.aclose()
        try:
            code = json.loads(body).get("code")
        except (ValueError, AttributeError):
            code = None
        if code != UNREGISTERED_ACTIVATION["code"]:
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            return Response(body, status_code=upstream.status_code, headers=kept)
        node_id = None
        raw_key = request.headers.get(FLEET_HTTP_PUBLIC_KEY_HEADER)
        if self.registered is not None and raw_key:
            with contextlib.suppress(ValueError, binascii.Error):
                node_id = self.registered.node_id(b64decode(raw_key, validate=True))
        if node_id is not None:
            retried = await self._take_over(headers, node_id, activation)
            if retried is not None:
                return retried
        return JSONResponse(
            {**UNREGISTERED_ACTIVATION, "detail": still_online_detail()}, status_code=412
        )

    async def _take_over(
        self, headers: list[tuple[str, str]], node_id: int, activation: bytes
    ) -> Response | None:
        """Deactivate ``node_id`` and repeat the activation; its answer if it succeeded."""
        client = self.client()
        base = [(k, v) for k, v in headers if k.lower() != "content-length"]
        stale = DeactivateNodeRequest(node_id=node_id).SerializeToString()
        try:
            await client.post(self.upstream + "/v1/fleet/deactivate-node", content=stale,
                              headers=[*base, ("content-length", str(len(stale)))])  # fmt: skip
            again = await client.post(
                self.upstream + "/v1/fleet/activate-node", content=activation,
                headers=[*base, ("content-length", str(len(activation)))],
            )  # fmt: skip
        except httpx.HTTPError:
            return None
        if again.status_code != 200:
            return None
        log.info("node %d: a previous connection still counted as online was ended for its "
                 "restarted daemon", node_id)  # fmt: skip
        kept = {k: v for k, v in again.headers.items() if k.lower() not in RESPONSE_HOP_BY_HOP}
        return Response(again.content, status_code=200, headers=kept)


def upstream_tls(ca_cert: str) -> ssl.SSLContext:
    """TLS context that trusts only the consortium CA (the SuperLink's certificate must be valid
    for 127.0.0.1, as ``fedcare server init`` issues it)."""
    return ssl.create_default_context(cafile=ca_cert)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers do not
    arrive within :attr:`header_timeout` seconds.

    uvicorn 0.49 has no such deadline: its ``timeout_keep_alive`` runs only after a response and
    any byte cancels it, so a connection that never completes a request (or never sends one)
    stays open as long as its client likes. The deadline starts when the connection is made
    (after the TLS handshake) and when a later request's first bytes arrive; it ends once h11
    has the complete request head (``their_state`` leaves ``IDLE``). h11 bounds the head's size
    (uvicorn's ``h11_max_incomplete_event_size``).
    """

    header_timeout: float = GatewayLimits.header_timeout
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_deadline()
        elif self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_overdue(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _event_loop(tls_handshake_timeout: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of asyncio event loops whose TLS servers drop a client that has not finished
    the handshake within ``tls_handshake_timeout`` seconds (``create_server``'s
    ``ssl_handshake_timeout``, default 60 s, which uvicorn does not set)."""

    class Loop(asyncio.SelectorEventLoop):
        async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:  # type: ignore[override]
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", tls_handshake_timeout)
            return await super().create_server(*args, **kwargs)

    return Loop


def serve(app: Gateway, *, host: str, port: int, certfile: str, keyfile: str) -> None:
    """Serve ``app`` over TLS with uvicorn until SIGTERM / SIGINT, connections bounded as the
    module docstring says.

    Always h11 on asyncio (not httptools or uvloop where installed): the same bounds wherever
    it runs, and h11 bounds the request head's size. asyncio's TLS read buffer is made 16 KiB
    per connection instead of 256 KiB (``asyncio.sslproto.SSLProtocol.max_size``, allocated
    when a connection is accepted: 1,000 connections that never finish a handshake took
    250 MiB). The soft limit on open files is raised to the hard one.
    """
    import asyncio.sslproto

    import uvicorn

    limits = app.limits
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # e.g. an unlimited hard limit (macOS)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    protocol = type("GatewayProtocol", (HeaderDeadlineProtocol,),
                    {"header_timeout": limits.header_timeout})  # fmt: skip
    config = uvicorn.Config(
        app, host=host, port=port, ssl_certfile=certfile, ssl_keyfile=keyfile, http=protocol,
        loop="asyncio", log_level="warning", access_log=False, server_header=False,
        proxy_headers=False, limit_concurrency=None, timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes, timeout_graceful_shutdown=5,
    )  # fmt: skip
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=_event_loop(limits.tls_handshake_timeout)) as runner:
        runner.run(server.serve())


def main(argv: list[str] | None = None) -> None:
    """Serve the gateway with uvicorn over TLS until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m server.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", required=True, help="public interface to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="https://127.0.0.1:PORT (the SuperLink)")
    parser.add_argument("--ca-cert", required=True, help="consortium CA certificate (PEM)")
    parser.add_argument("--certfile", required=True, help="coordinator TLS certificate (PEM)")
    parser.add_argument("--keyfile", required=True, help="its private key (PEM)")
    parser.add_argument("--pki", type=Path, help="PKI folder: only its registered hospitals' "
                        "keys pass (without it, any key with a valid signature)")  # fmt: skip
    defaults = GatewayLimits()
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20)
    parser.add_argument("--max-in-flight-mb", type=float,
                        default=defaults.max_bytes_in_flight / 2**20)  # fmt: skip
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests/s per address")
    parser.add_argument("--burst", type=int, default=defaults.burst)
    parser.add_argument("--key-rate", type=float, default=defaults.key_rate,
                        help="requests/s per registered hospital key")  # fmt: skip
    parser.add_argument("--key-burst", type=int, default=defaults.key_burst)
    parser.add_argument("--counters", type=Path,
                        help="JSON file of forwarded / refused counts per route (dashboard)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore"):  # one line per forwarded request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    limits = GatewayLimits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_bytes_in_flight=int(args.max_in_flight_mb * 2**20), rate=args.rate, burst=args.burst,
        key_rate=args.key_rate, key_burst=args.key_burst,
    )  # fmt: skip
    registered = RegisteredKeys(args.pki.resolve()) if args.pki is not None else None
    app = Gateway(args.upstream, verify=upstream_tls(args.ca_cert), limits=limits,
                  registered=registered, counters=args.counters)  # fmt: skip
    log.info(
        "fedcare gateway on https://%s:%d -> %s: Fleet API only (%d routes), %s, body <= %d "
        "bytes, <= %d bytes in flight, %g requests/s per address (burst %d)", args.host,
        args.port, args.upstream, len(FLEET_ROUTES),
        f"keys registered in {registered.root}" if registered else "any signed key",
        limits.max_body_bytes, limits.max_bytes_in_flight, limits.rate, limits.burst,
    )  # fmt: skip
    serve(app, host=args.host, port=args.port, certfile=args.certfile, keyfile=args.keyfile)


if __name__ == "__main__":
    main()
