"""fedcare's SuperNode Fleet loop (client.supernode) and the coordinator's prompt reply pull.

The loop runs for real in the deployment e2e tests (tests/test_e2e_deployment.py: every hospital
there is a ``client.supernode`` process). Here: its two pieces against Flower's real node state and
object store. The Flower 1.41 private code it copies from and calls is pinned by source hash in
tests/test_flower_internals.py.
"""

from __future__ import annotations

import threading

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.nodestate import NodeStateFactory

from client.supernode import ObjectPrefetch, PromptReplies
from tests.handlers import use_task_identity


def _request() -> Message:
    use_task_identity()
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.arange(12, dtype=np.float32).reshape(3, 4)]),
            "config": ConfigRecord({"server-round": 2}),
        }
    )
    msg = Message(content, dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # what pushing it to a SuperLink sets
    return msg


class _SuperLinkUpload:
    """The SuperLink's side of one message upload, scripted: each object is "not there yet" for
    its first ``late`` pulls (the ServerApp still uploading), then available. Counts calls."""

    def __init__(self, msg: Message, late: int) -> None:
        self.contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
        self.late = late
        self.calls: dict[str, int] = {}

    def pull_object(self, run_id: int, object_id: str) -> bytes:
        self.calls[object_id] = self.calls.get(object_id, 0) + 1
        if self.calls[object_id] <= self.late:
            raise ObjectUnavailableError(object_id)
        return self.contents[object_id]


def test_prefetch_has_every_object_before_the_task_exists():
    msg = _request()
    tree = get_object_tree(msg)
    upload = _SuperLinkUpload(msg, late=2)
    store = ObjectStoreFactory().store()
    prefetch = ObjectPrefetch(lambda: (msg, tree), upload.pull_object, store)
    received = prefetch.receive()
    assert received is not None and received[0] is msg
    # every object was fetched, after two 'not there yet' answers each
    assert set(upload.calls) == set(upload.contents)
    assert all(n == 3 for n in upload.calls.values())
    # Flower's own pull (in _pull_and_store_message) now reads them without asking the SuperLink
    for object_id, content in upload.contents.items():
        assert prefetch.pull_object(msg.metadata.run_id, object_id) == content
    assert all(n == 3 for n in upload.calls.values())


def test_prefetch_skips_stored_objects_and_falls_back_to_the_superlink():
    msg = _request()
    tree = get_object_tree(msg)
    upload = _SuperLinkUpload(msg, late=0)
    store = ObjectStoreFactory().store()
    stored = next(iter(upload.contents))  # already in this node's store (e.g. same weights)
    store.preregister(msg.metadata.run_id, get_object_tree(get_all_nested_objects(msg)[stored]))
    store.put(stored, upload.contents[stored])
    prefetch = ObjectPrefetch(lambda: (msg, tree), upload.pull_object, store)
    prefetch.receive()
    assert stored not in upload.calls
    # an object not prefetched is pulled from the SuperLink, as by Flower
    assert prefetch.pull_object(msg.metadata.run_id, stored) == upload.contents[stored]
    assert upload.calls[stored] == 1
    assert ObjectPrefetch(lambda: None, upload.pull_object, store).receive() is None


def test_prompt_replies_waits_for_the_clientapp_reply_in_the_real_node_state():
    state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
    request = _request()
    reply = Message(RecordDict(), reply_to=request)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    prompt = PromptReplies(state, interval=0.01)
    assert prompt.get_messages_legacy(is_reply=False) == []  # other queries do not wait
    threading.Timer(0.2, state.store_message, args=(reply,)).start()
    got = prompt.get_messages_legacy(is_reply=True)  # what Flower's _push_messages asks
    assert [m.metadata.message_id for m in got] == [reply.metadata.message_id]
    assert prompt.delete_messages == state.delete_messages  # everything else is the state's


def test_polls_are_prompt_while_messages_flow_and_back_off_when_idle():
    """poll_wait: the SuperNode's wait after an empty pull (interval 0.2 s, cap 2 s). A message
    after a gap of G seconds waits at most max(0.2, G/10) s more; an idle hospital polls every
    2 s, a tenth of the requests of a fixed 0.2 s."""
    from client.supernode import DEFAULT_POLL_INTERVAL, IDLE_POLL_CAP
    from shared_models.protocol import poll_wait

    def wait(idle: float) -> float:
        return poll_wait(idle, DEFAULT_POLL_INTERVAL, IDLE_POLL_CAP)

    assert [wait(t) for t in (0.0, 1.0, 2.0)] == [0.2, 0.2, 0.2]  # a round's messages
    assert abs(wait(5.0) - 0.5) < 1e-12 and abs(wait(15.0) - 1.5) < 1e-12
    assert wait(20.0) == wait(3600.0) == 2.0
    assert all(wait(g) <= max(0.2, g / 10) + 1e-12 for g in np.linspace(0, 100, 1001))
    # polls during an hour of idling: about 1800 (2 s apart) instead of 18000 at a fixed 0.2 s
    t, polls = 0.0, 0
    while t < 3600:
        t, polls = t + wait(t), polls + 1
    assert 1800 < polls < 1900
    assert poll_wait(100.0, 5.0, 2.0) == 5.0  # a longer --poll-interval is never shortened
