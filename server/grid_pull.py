"""Exchanging messages with a deployment's hospitals without Flower 1.41's fixed waits.

The one module of the coordinator that relies on Flower 1.41's private code:
``HttpGrid.send_and_receive`` (its loop, here with the run's poll interval instead of 3 s) and
``HttpGrid.pull_messages`` (here with a 0.05 s first object retry instead of 1 s).
``tests/test_flower_internals.py`` pins the source of both: an upgrade of flwr that changes them
fails there, naming this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import cast

import httpx
from flwr.app import Error, Message, Metadata
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.serverapp import Grid
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid

from shared_models.protocol import OBJECT_RETRY_BACKOFF, OBJECT_RETRY_CAP


def pull_replies_promptly(grid: Grid, message_ids: Iterable[str]) -> list[Message]:
    """``grid.pull_messages(message_ids)``; for a deployment's ``HttpGrid``, without Flower 1.41's
    1 s wait for a reply that is still arriving.

    A hospital sends a reply in two steps: the message, then its objects (the model update).
    The SuperLink hands the message to the ServerApp after the first step, so
    ``HttpGrid.pull_messages`` (``flwr/superlink/grid/http_grid.py``) often asks for objects
    that are not there yet and backs off 1 s (``PULL_INITIAL_BACKOFF``), at every exchange of a
    deployed round. This is the same pull (Flower's Runtime API calls, ``pull_objects``,
    ``inflate_object_from_contents``), with the first retry after 0.05 s. Any other grid (the
    Simulation Engine's in-memory one, where replies arrive whole) pulls as usual.

    Returns
    -------
    list of Message
        The replies that arrived; a reply whose objects never became available is an error
        message, as in Flower.
    """
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages(message_ids))
    client, node, run_id = grid._runtime_client, grid.node, grid.run.run_id
    try:
        res = client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    except httpx.HTTPStatusError:  # e.g. 413, a response too large: Flower's pull handles it
        return list(grid.pull_messages(message_ids))
    replies: list[Message] = []
    for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
        msg_id = proto.metadata.message_id
        try:
            contents = pull_objects(
                [t.object_id for t in iterate_object_tree(tree)],
                pull_object_fn=make_pull_object_fn_protobuf(client.PullObject, node, run_id),
                initial_backoff=OBJECT_RETRY_BACKOFF,
                backoff_cap=OBJECT_RETRY_CAP,
            )
        except ObjectPullError as exc:  # as Flower: an error reply in place of the lost one
            metadata = Metadata(
                run_id=run_id, message_id="", src_node_id=node.node_id,
                dst_node_id=node.node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0,
                reply_to_message_id=proto.metadata.reply_to_message_id,
                created_at=now().timestamp(),
            )  # fmt: skip
            reason = f"Reply message objects are unavailable. {exc}"
            replies.append(
                make_message(
                    metadata=metadata,
                    error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason),
                )
            )
            continue
        client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=msg_id)
        )
        message = cast(Message, inflate_object_from_contents(msg_id, contents))
        message.metadata.__dict__["_message_id"] = msg_id  # as HttpGrid.pull_messages
        replies.append(message)
    return replies


def send_and_receive_promptly(
    grid: Grid, sent: list[Message], *, timeout: float | None, poll_interval: float
) -> list[Message]:
    """Push ``sent`` and collect replies until all arrived or ``timeout`` seconds passed.

    With ``poll_interval > 0`` this is Flower's own ``send_and_receive`` loop (public
    ``push_messages`` / ``pull_messages``) polling every ``poll_interval`` seconds instead of
    Flower 1.41's fixed 3 s (``flwr/superlink/grid/http_grid.py``), which otherwise adds up to
    2 x 3 s to every round of a deployment; ``0`` is Flower's ``send_and_receive`` itself.

    Each message lives ``timeout`` seconds (its Flower TTL, 12 h by default): the SuperLink
    never hands a round's message to a hospital that comes back after the round gave up on it
    (restarted after a crash, say), which would otherwise train, spend privacy budget and reply
    to a round nobody waits for any more.
    """
    if timeout is not None:
        for message in sent:
            message.metadata.ttl = float(timeout)
    if poll_interval <= 0:
        return list(grid.send_and_receive(sent, timeout=timeout))
    pending = set(grid.push_messages(sent))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (deadline is None or time.monotonic() < deadline):
        got = pull_replies_promptly(grid, pending)
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending:
            time.sleep(poll_interval)
    return replies
