"""What the coordinator and the hospitals agree on: the app directory, error codes, record keys
and the refusal text (import-light: no torch). ``client`` and ``server`` never import each other;
both import this."""

from __future__ import annotations

from pathlib import Path

# the Flower app directory (pyproject.toml with the run-config schema): the repository root
APP_DIR = Path(__file__).resolve().parent.parent

HOSPITAL_REFUSED = (
    4001  # error code of a reply refused by the hospital: "hospital NAME refused: <reason>"
)
SECAGG_FAILED = 4002  # error code when the coordinator could not unmask a SecAgg+ round's sum
# the ClientApp's query action for the DP explanation release (message type "query.explain")
EXPLAIN_ACTION = "explain"
# under client-level DP every hospital weighs the same (Flower's accountant requires equal weights)
UNIT_WEIGHT_KEY = "unit-weight"
# retrying an object (model weights) that is announced but still being uploaded, on either side:
# first retry after this many seconds, doubling up to the cap (Flower 1.41's pull: 1 s, 10 s);
# Flower's 500 tries per object still bound it: an upload that never completes fails in ~50 s
OBJECT_RETRY_BACKOFF = 0.05
OBJECT_RETRY_CAP = 0.1
# a hospital's polls (its SuperNode asking the coordinator for a message, its launcher asking the
# SuperNode for a task) wait `interval` seconds while messages flow; once idle, a tenth of the
# time since the last message, up to a cap: see poll_wait
IDLE_POLL_SHARE = 0.1
# the coordinator's gateway refuses the activation of a key removed with `fedcare server
# remove-hospital` with Flower's own refusal (code 2004) and this text, followed by the removal
# time; the hospital's daemon recognises it and stops instead of waiting to be registered
KEY_REMOVED = "removed by the coordinator on"


def poll_wait(idle: float, interval: float, cap: float) -> float:
    """Seconds to wait before the next poll, ``idle`` seconds after the last message.

    ``interval`` while a run exchanges messages (``idle`` below ``interval / IDLE_POLL_SHARE``),
    then ``IDLE_POLL_SHARE * idle``, at most ``max(interval, cap)``. A message that arrives after
    a gap of G seconds therefore waits at most ``max(interval, G / 10)`` more than it would
    with polls every ``interval`` seconds, and an idle hospital polls every ``cap`` seconds
    (with ``interval`` 0.2 and ``cap`` 2: a tenth of the requests an idle coordinator got at a
    fixed 0.2 s).
    """
    return min(max(interval, IDLE_POLL_SHARE * idle), max(interval, cap))


def removed_key_detail(removed_at: str) -> str:
    """The text of the coordinator's refusal to activate a removed key (removed at ``removed_at``,
    an ISO time)."""
    return f"Failed to activate SuperNode: this hospital's key was {KEY_REMOVED} {removed_at}"


# the coordinator's gateway adds this to Flower's refusal to activate a REGISTERED key (Flower
# answers every failed activation alike): its previous connection is still counted as online
STILL_ONLINE = "this hospital's key is registered; its previous connection still counts as online"


def still_online_detail() -> str:
    """The text of the coordinator's refusal to activate a registered key whose node the
    SuperLink still counts as online (it ended without signing off; it times out after two
    heartbeat intervals)."""
    return f"Failed to activate SuperNode: {STILL_ONLINE} until it times out"


def removed_key_time(text: str) -> str | None:
    """The removal time in a line that carries :func:`removed_key_detail`, else None."""
    _, sep, tail = text.partition(KEY_REMOVED + " ")
    words = tail.split()
    return words[0].rstrip(".") if sep and words else None


def refusal_reason(hospital: str, reason: str) -> str:
    """The error reason of a reply refused by a hospital (code :data:`HOSPITAL_REFUSED`)."""
    return f"hospital {hospital} refused: {reason}"


def parse_refusal(text: str) -> tuple[str, str] | None:
    """``(hospital, reason)`` of a :func:`refusal_reason` text, else None."""
    head, sep, reason = text.partition(" refused: ")
    # "site NAME refused": the launcher of a hospital that runs an older fedcare (the launcher is
    # the hospital's installed fedcare, not the run's bundle)
    for prefix in ("hospital ", "site "):
        name = head.removeprefix(prefix)
        if sep and name != head:
            return (name, reason) if name and " " not in name else None
    return None


# prefix of the metrics of a hospital's personal model in its evaluate reply (personal.method):
# "personal-auroc", or "personal-hist-neg" / "personal-hist-pos" where the release is noisy
PERSONAL_PREFIX = "personal-"
