"""The hospital's SuperNode process: Flower 1.41's ``flower-supernode`` with a prompt Fleet loop.

``fedcare client start`` runs ``python -m client.supernode [--poll-interval S] FLOWER_ARGS``.
Everything but the timing of the Fleet loop is Flower's own: its argument parser (every
``flower-supernode`` option), Runtime API server, TLS / node-authentication connection to the
SuperLink, node state and object store, and its ``_pull_and_store_message`` and
``_push_messages``, which receive one message, store it and create its task, then send the
ClientApp's reply. What differs is the loop around them (``start_client_internal`` in
``flwr/supernode/start_client_internal.py``), where Flower 1.41 has three fixed waits that are
not configurable and that made up most of a deployed round's overhead (issue #3, acceptance 5):

1. After every pull that finds no message, Flower sleeps 3 s, before each of a round's two
   messages. Here the wait is ``--poll-interval`` (0.2 s by default, one small HTTPS request
   to the SuperLink per wait) while messages flow, and grows with the time since the last
   message once idle (a tenth of it, at most ``IDLE_POLL_CAP`` = 2 s;
   :func:`shared_models.protocol.poll_wait`), so that idle hospitals do not keep the
   coordinator busy.
2. Flower creates the ClientApp's task before it pulls the message's objects (the global
   weights) from the SuperLink. With a ClientApp that starts in a fraction of a second (the warm
   executor), the ClientApp asks for objects that are not there yet and backs off 1 s, then 2 s
   (``PULL_INITIAL_BACKOFF``). The same happens when the SuperNode pulls a message before the
   ServerApp has finished uploading its objects. Here, the objects are fetched as soon as the
   message arrives, with Flower's ``pull_objects`` and a 0.05 s initial backoff, before Flower's
   code creates the task. Flower's own pull then reads them from memory.
3. Flower checks for the ClientApp's reply every 0.5 s; here every 0.02 s, a lookup in memory.

Only ``--isolation process`` is supported: fedcare's launcher (:mod:`client.launcher`) is the
SuperExec. ``--trusted-entities`` is refused, as by ``fedcare client start`` (see
``docs/approved-code.md``). These are private functions of Flower 1.41; the project pins ``flwr==1.41.0``,
and ``tests/test_flower_internals.py`` fails, naming this module, if the source of any of them
changes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from logging import DEBUG, INFO, WARN
from typing import Any

from flwr.app import Message
from flwr.common.constant import ISOLATION_MODE_PROCESS
from flwr.proto.message_pb2 import ObjectTree  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.constant import HTTP_SERVER_SHUTDOWN_TIMEOUT
from flwr.supercore.exit import add_exit_handler, register_signal_handlers
from flwr.supercore.grpc_health import run_health_server_grpc_no_tls
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supercore.object_store import ObjectStore, ObjectStoreFactory
from flwr.supercore.telemetry import EventType
from flwr.supernode.cli.flower_supernode import (
    _parse_supernode_lifespan_config,
    _start_supernode_http_api,
)
from flwr.supernode.nodestate import NodeState, NodeStateFactory
from flwr.supernode.start_client_internal import (
    _init_connection,
    _pull_and_store_message,
    _push_messages,
)

from shared_models.protocol import OBJECT_RETRY_BACKOFF, OBJECT_RETRY_CAP, poll_wait

DEFAULT_POLL_INTERVAL = 0.2  # seconds after an empty pull while messages flow (Flower 1.41: 3 s)
IDLE_POLL_CAP = 2.0  # seconds between pulls of an idle hospital (poll_wait)
REPLY_CHECK_INTERVAL = 0.02  # seconds between checks for the ClientApp's reply (Flower: 0.5 s)
OBJECT_PREFETCH_SECONDS = 60.0  # then Flower's own pull takes over, with its own limits


class ObjectPrefetch:
    """Fetches a message's objects from the SuperLink the moment the message is received.

    Wraps the Fleet connection's ``receive`` and ``pull_object`` callables handed to Flower's
    ``_pull_and_store_message``: ``receive`` returns the message after its objects (those not
    already in the node's object store) have been pulled with
    ``flwr.supercore.inflatable.inflatable_utils.pull_objects``; ``pull_object`` then answers
    from those contents. A failed prefetch is logged and left to Flower's own pull, which retries
    and reports exactly as in Flower.
    """

    def __init__(
        self,
        receive: Callable[[], tuple[Message, ObjectTree] | None],
        pull_object: Callable[[int, str], bytes],
        store: ObjectStore,
    ) -> None:
        self._receive = receive
        self._pull_object = pull_object
        self._store = store
        self._fetched: dict[str, bytes] = {}

    def receive(self) -> tuple[Message, ObjectTree] | None:
        """The next message for this node and its object tree, or ``None`` when there is none."""
        self._fetched = {}
        if (received := self._receive()) is None:
            return None
        message, tree = received
        missing = list(  # once each (a tree may hold the same object twice)
            dict.fromkeys(
                t.object_id
                for t in iterate_object_tree(tree)
                if self._store.get(t.object_id) is None
            )
        )
        try:
            self._fetched = pull_objects(
                missing,
                pull_object_fn=partial(self._pull_object, message.metadata.run_id),
                initial_backoff=OBJECT_RETRY_BACKOFF,
                backoff_cap=OBJECT_RETRY_CAP,
                max_time=OBJECT_PREFETCH_SECONDS,
            )
        except Exception as exc:  # noqa: BLE001 -- Flower's pull below retries and reports it
            log(
                DEBUG,
                "Prefetching the objects of message %s failed: %s",
                message.metadata.message_id,
                exc,
            )
        return received

    def pull_object(self, run_id: int, object_id: str) -> bytes:
        """An object's content: prefetched, or pulled from the SuperLink now."""
        if (content := self._fetched.pop(object_id, None)) is not None:
            return content
        return self._pull_object(run_id, object_id)


class PromptReplies:
    """The node state, as Flower's ``_push_messages`` sees it: its wait for the ClientApp's reply
    checks every ``interval`` seconds instead of Flower's 0.5 s.

    ``_push_messages`` calls ``get_messages_legacy(is_reply=True)`` until it returns a reply; this
    returns only once there is one. Every other attribute is the wrapped state's.
    """

    def __init__(self, state: NodeState, interval: float = REPLY_CHECK_INTERVAL) -> None:
        self._state = state
        self._interval = interval

    def get_messages_legacy(self, **filters: Any) -> Sequence[Message]:
        while not (messages := self._state.get_messages_legacy(**filters)) and filters.get(
            "is_reply"
        ):
            time.sleep(self._interval)
        return messages

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


def run_fleet_loop(config: Any, state_factory: NodeStateFactory, poll_interval: float) -> None:
    """Connect to the SuperLink and serve messages until stopped (Flower's ``start_client_internal``
    for ``--isolation process``, with the timing described in the module docstring).

    Parameters
    ----------
    config : flwr.supernode.cli.flower_supernode.SuperNodeLifespanConfig
        The parsed ``flower-supernode`` options.
    state_factory : flwr.supernode.nodestate.NodeStateFactory
        The factory whose state the Runtime API server also uses.
    poll_interval : float
        Seconds to wait after a pull that found no message, while messages flow; idle, the wait
        grows to at most ``IDLE_POLL_CAP`` (:func:`shared_models.protocol.poll_wait`).
    """
    state = state_factory.state()
    store = state_factory.objectstore_factory.store()
    with _init_connection(
        server_address=config.server_address,
        insecure=config.insecure,
        root_certificates=config.root_certificates,
        authentication_keys=config.authentication_keys,
        max_retries=config.max_retries,
        max_wait_time=config.max_wait_time,
    ) as (node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm):
        state.set_node_id(node_id)
        log(INFO, "SuperNode ID: %s", node_id)
        prefetch = ObjectPrefetch(receive, pull_object, store)
        replies = PromptReplies(state)
        last_message = time.monotonic()
        while True:
            run_id = _pull_and_store_message(
                state=state,
                object_store=store,
                node_config=config.node_config,
                receive=prefetch.receive,
                get_run=get_run,
                get_fab=get_fab,
                pull_object=prefetch.pull_object,
                confirm_message_received=confirm,
                trusted_entities=None,
            )
            if run_id is None:
                idle = time.monotonic() - last_message
                time.sleep(poll_wait(idle, poll_interval, IDLE_POLL_CAP))
                continue
            _push_messages(
                state=replies,  # type: ignore[arg-type]
                object_store=store,
                send=send,
                push_object=push_object,
            )
            last_message = time.monotonic()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m client.supernode [--poll-interval S] FLOWER_SUPERNODE_ARGS``."""
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    args, flower_args = ours.parse_known_args(argv)
    if not 0.0 < args.poll_interval <= 60.0:
        sys.exit(f"--poll-interval {args.poll_interval}: use a number of seconds in (0, 60]")
    sys.argv = ["flower-supernode", *flower_args]  # Flower's own parser reads sys.argv
    log(
        INFO,
        "Starting Flower SuperNode (fedcare Fleet loop, poll interval %.2f s)",
        args.poll_interval,
    )
    config = _parse_supernode_lifespan_config()
    if config.isolation != ISOLATION_MODE_PROCESS:
        sys.exit(
            "client.supernode runs with --isolation process (fedcare's launcher is the SuperExec)"
        )
    if config.trusted_entities:
        sys.exit("client.supernode does not verify --trusted-entities (see docs/approved-code.md)")
    if config.insecure or config.authentication_keys is None:
        sys.exit(
            "client.supernode runs only over TLS with a hospital key "
            "(--root-certificates and --auth-supernode-private-key)"
        )
    state_factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    http_server, http_thread = _start_supernode_http_api(config, state_factory)

    def stop_http_server() -> None:
        http_server.should_exit = True
        http_thread.join(timeout=HTTP_SERVER_SHUTDOWN_TIMEOUT)
        if http_thread.is_alive():
            log(
                WARN,
                "Runtime HTTP API server did not stop within %.1f s.",
                HTTP_SERVER_SHUTDOWN_TIMEOUT,
            )
            http_server.force_exit = True

    add_exit_handler(stop_http_server)
    health = config.health_server_address
    register_signal_handlers(
        event_type=EventType.RUN_SUPERNODE_LEAVE,
        exit_message="SuperNode terminated gracefully.",
        grpc_servers=[run_health_server_grpc_no_tls(health)] if health else [],
    )
    run_fleet_loop(config, state_factory, args.poll_interval)


if __name__ == "__main__":
    main()
