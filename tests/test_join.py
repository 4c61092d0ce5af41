"""The hospital daemon's attempts to join (client.join): what it does after each exit of its
SuperNode, read from the lines Flower 1.41's SuperNode prints. With real processes:
tests/test_e2e_deployment.py (hospitals started before their keys are added; a removed key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.join import Backoff, JoinAttempts
from shared_models.protocol import removed_key_detail

# what Flower's flwr_exit prints when activation is refused (one line per line of its message)
REFUSED = ["Exit Code: 305", "Failed to initialize the connection to the SuperLink.",
           "[code: 2004] Failed to activate SuperNode."]  # fmt: skip
REMOVED_AT = "2026-12-07T10:00:00+00:00"


def _attempts(**kwargs) -> tuple[JoinAttempts, list[str], list[float]]:  # type: ignore[no-untyped-def]
    said: list[str] = []
    t = [0.0]
    attempts = JoinAttempts(
        hospital="a", fingerprint="SHA256:abc", public_key_name="a.pub",
        log_path=Path("state/supernode.log"), ca=Path("ca.pem"), say=said.append,
        clock=lambda: t[0], **kwargs,
    )  # fmt: skip
    return attempts, said, t


def _exit(attempts: JoinAttempts, lines: list[str], code: int = 1) -> float | None:
    for line in lines:
        attempts.on_line(line)
    return attempts.after_exit(code)


def test_backoff_doubles_up_to_its_cap():
    assert [Backoff().wait(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert Backoff.parse("1,2") == Backoff(1.0, 2.0)
    for bad in ("1", "a,b", "0,1", "3,2"):
        with pytest.raises(ValueError, match="join backoff"):
            Backoff.parse(bad)


def test_a_key_not_registered_is_tried_again_with_the_command_to_run():
    """Each refusal: a message with the complete add-hospital command and the key's
    fingerprint, and the next wait; never a stop without --join-timeout."""
    attempts, said, t = _attempts()
    waits = []
    for _ in range(6):
        waits.append(_exit(attempts, REFUSED))
        t[0] += 1000
    assert waits == [5, 10, 20, 40, 60, 60] and attempts.problem is None
    assert len(said) == 6
    assert "`fedcare server add-hospital a a.pub --pki PKI`" in said[0]
    assert "SHA256:abc" in said[0] and "not registered there (yet)" in said[0]
    assert "Trying again in 5 s (attempt 2; Ctrl-C stops)" in said[0]


def test_join_timeout_gives_up_with_an_actionable_message():
    attempts, said, t = _attempts(join_timeout=12.0)
    assert _exit(attempts, REFUSED) == 5
    t[0] = 8.0
    assert _exit(attempts, REFUSED) == 4  # not past the deadline: the last wait ends there
    assert "gives up in 4 s (--join-timeout)" in said[-1]
    t[0] = 12.5
    assert _exit(attempts, REFUSED) is None
    assert attempts.problem is not None
    assert "still not registered there after 12 s (--join-timeout 12)" in attempts.problem
    assert "`fedcare server add-hospital a a.pub --pki PKI`" in attempts.problem


def test_a_removed_key_stops_the_daemon_saying_when_and_what_to_do():
    attempts, said, _ = _attempts()
    removed = [*REFUSED[:2], f"[code: 2004] {removed_key_detail(REMOVED_AT)}"]
    assert _exit(attempts, removed) is None and not said
    assert attempts.problem is not None
    assert f"removed this hospital's key (SHA256:abc) on {REMOVED_AT}" in attempts.problem
    assert "fedcare client keygen" in attempts.problem and "new NAME.pub" in attempts.problem


def test_a_supernode_that_joined_and_ended_is_started_again():
    """The coordinator ended the connection (e.g. remove-hospital): one more attempt, after the
    first backoff, tells a removal from a passing problem; the refusal count starts afresh."""
    attempts, said, t = _attempts(join_timeout=30.0)
    assert _exit(attempts, REFUSED) == 5
    t[0] = 100.0  # joined after the deadline would have passed: it no longer applies
    assert _exit(attempts, ["INFO :      SuperNode ID: 42"], code=0) == 5
    assert "stopped after joining (exit code 0" in said[-1]
    t[0] = 106.0
    assert _exit(attempts, REFUSED) == 5 and attempts.refusals == 1


def test_problems_no_wait_can_fix_stop_at_once():
    for lines, expected in (
        (["[code: 2001] SuperNode authentication is required"], "pass --key"),
        (["ssl.SSLCertVerificationError: CERTIFICATE_VERIFY_FAILED"], "verified with ca.pem"),
        (["[fedcare] python -m client.launcher --hospital a exited with code 3"], "code 3; see"),
    ):
        attempts, _, _ = _attempts()
        assert _exit(attempts, [*lines, *REFUSED]) is None
        assert attempts.problem is not None and expected in attempts.problem
    attempts, _, _ = _attempts()
    assert _exit(attempts, ["Traceback ..."], code=1) is None and attempts.problem is None


def test_a_registered_key_still_online_is_tried_again_soon_without_add_hospital_advice():
    """A daemon restarted after a kill: the coordinator's gateway says its key is registered and
    its previous connection still counts as online (Flower times it out after two heartbeat
    intervals): the daemon tries again within 10 s, says why, and does not tell anyone to add a
    key that is already added (nor count it towards --join-timeout's "not registered")."""
    from shared_models.protocol import still_online_detail

    attempts, said, t = _attempts(join_timeout=5.0)
    lines = [*REFUSED[:2], f"[code: 2004] {still_online_detail()}"]
    waits = []
    for _ in range(4):
        waits.append(_exit(attempts, lines))
        t[0] += 10
    assert waits == [5, 5, 5, 5] and attempts.problem is None and attempts.refusals == 0
    assert "previous connection as online" in said[0] and "add-hospital" not in said[0]
