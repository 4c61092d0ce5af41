"""Joining the coordinator: the hospital daemon's attempts, until the coordinator accepts its key.

A hospital usually starts its daemon before (or while) the coordinator's operator adds its
public key. Flower 1.41's SuperNode ends when the coordinator refuses to activate its key
(``[code: 2004]`` in ``flwr.supernode.fleet_http_connection.http_request_response``), through
``flwr_exit``: that runs Flower's exit handlers (the SuperNode's Runtime API server stops) and
starts a thread that calls ``os._exit`` after ``FORCE_EXIT_TIMEOUT_SECONDS``, so the process
cannot catch the refusal and carry on, and a retry inside :mod:`client.supernode` would need a
second copy of Flower's activation code. ``fedcare client start`` therefore starts a fresh
SuperNode process for each attempt (:func:`shared_models.runtime.run_foreground` with
:meth:`JoinAttempts.after_exit` as its ``restart`` hook): Flower's own connection code runs
unchanged, and the task launcher (fedcare's SuperExec, :mod:`client.launcher`) keeps running
across attempts -- it waits for the SuperNode's Runtime API anyway.

After each exit of the SuperNode, :class:`JoinAttempts` decides from the SuperNode's output:

- the coordinator removed this key (its gateway's refusal says
  :data:`shared_models.protocol.KEY_REMOVED`): stop, saying so -- a removed key is never
  accepted again, the hospital needs a new pair;
- a problem that waiting cannot fix (no key sent, the coordinator's certificate not verified,
  the task launcher gone): stop, saying so;
- the key is registered but its previous connection still counts as online (the daemon was
  killed or lost the network without signing off; the SuperLink lets it time out after two
  heartbeat intervals, 60 s with Flower's defaults): try again every 10 s at most, saying so;
- the key is not registered (yet): try again after a backoff (:class:`Backoff`: 5 s, doubling
  up to 60 s), printing each time the command the coordinator's operator must run, until
  ``--join-timeout`` seconds have passed (default: never; Ctrl-C / SIGTERM stop at any time);
- the SuperNode had joined and then ended on its own (the coordinator ended the connection,
  e.g. ``remove-hospital``, or the SuperNode failed): start it again after the first backoff,
  so that a removal is told apart from a passing problem;
- otherwise: stop with the SuperNode's exit code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared_models.protocol import STILL_ONLINE, removed_key_time

JOINED = "SuperNode ID:"  # what Flower's (and fedcare's) SuperNode logs once its node is active
NOT_REGISTERED = "[code: 2004]"  # Flower's refusal to activate the node (code 2004)
# ... for a registered key whose node is still online at the SuperLink: its previous connection
# ended without deactivating (crash, kill -9, network loss) and has not timed out yet (2 x the
# 30 s heartbeat interval); the coordinator's gateway says so (Flower's answer does not)
STILL_ONLINE_WAIT = 10.0  # seconds between attempts while the previous connection times out
_FATAL = {
    "[code: 2001]": "the coordinator requires hospital authentication: pass --key",
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's certificate could not be verified with {ca}",
}


@dataclass(frozen=True)
class Backoff:
    """Seconds between attempts to join: ``first``, doubling, at most ``cap``.

    Parameters
    ----------
    first : float
        Wait after the first refusal (seconds, > 0).
    cap : float
        Longest wait (seconds, >= ``first``).
    """

    first: float = 5.0
    cap: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"join backoff {self.first:g},{self.cap:g}: use 0 < FIRST <= CAP")

    @classmethod
    def parse(cls, text: str) -> Backoff:
        """``"FIRST,CAP"`` (seconds).

        Raises
        ------
        ValueError
            Not two numbers with ``0 < FIRST <= CAP``.
        """
        try:
            first, cap = (float(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"join backoff {text!r}: use FIRST,CAP in seconds") from None
        return cls(first, cap)

    def wait(self, refusals: int) -> float:
        """The wait after ``refusals`` consecutive refusals (1, 2, ...)."""
        return min(self.cap, self.first * 2.0 ** max(0, refusals - 1))


@dataclass
class JoinAttempts:
    """What the hospital daemon learns from its SuperNode's output, attempt after attempt.

    Feed every output line to :meth:`on_line`; pass :meth:`after_exit` to
    :func:`shared_models.runtime.run_foreground` as ``restart``. Once the daemon must stop for a
    reason the operator has to act on, :attr:`problem` holds the message.

    Parameters
    ----------
    hospital : str
        The hospital's name (``--hospital``), suggested as the name to register.
    fingerprint : str
        The hospital key's fingerprint (``SHA256:...``), as ``client keygen`` printed it.
    public_key_name : str
        The public key file the coordinator was sent (``NAME.pub``).
    log_path : Path
        The SuperNode's log, named in messages.
    ca : Path
        The consortium CA certificate (``--ca``), named in messages.
    backoff : Backoff
        Waits between attempts while the key is not registered.
    join_timeout : float, optional
        Give up when the key is still not registered this many seconds after the daemon
        started (or after its last connection ended); None: never.
    say : callable
        Prints a line for the hospital's operator.
    clock : callable
        Seconds, monotonic (tests pass their own).
    """

    hospital: str
    fingerprint: str
    public_key_name: str
    log_path: Path
    ca: Path
    backoff: Backoff = field(default_factory=Backoff)
    join_timeout: float | None = None
    say: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    problem: str | None = None
    refusals: int = 0  # consecutive "not registered" refusals
    _since: float = field(init=False)  # when the current wait to join began
    _refused: bool = False  # during the current attempt
    _removed_at: str | None = None
    _joined: bool = False
    _still_online: bool = False

    def __post_init__(self) -> None:
        self._since = self.clock()

    @property
    def add_command(self) -> str:
        """The command the coordinator's operator runs to add this hospital."""
        return f"fedcare server add-hospital {self.hospital} {self.public_key_name} --pki PKI"

    def on_line(self, line: str) -> None:
        """Read one line of the SuperNode's (or, ``[fedcare] ...``, the daemon's) output."""
        if JOINED in line:
            self._joined = True
        if (removed_at := removed_key_time(line)) is not None:
            self._removed_at = removed_at
        elif NOT_REGISTERED in line:
            self._refused = True
        if STILL_ONLINE in line:
            self._still_online = True
        for marker, message in _FATAL.items():
            if marker in line and self.problem is None:
                self.problem = message.format(ca=self.ca)
        if line.startswith("[fedcare]") and "client.launcher" in line and self.problem is None:
            self.problem = (
                f"the task launcher exited with code {line.rsplit(' ', 1)[-1]}; see "
                f"{self.log_path.with_name('launcher.log')}"
            )

    def after_exit(self, code: int) -> float | None:
        """Seconds to wait before the next attempt, or None to stop (:attr:`problem` says why,
        unless the SuperNode's exit code does)."""
        refused, removed_at, joined = self._refused, self._removed_at, self._joined
        still_online, self._still_online = self._still_online, False
        self._refused, self._removed_at, self._joined = False, None, False
        now = self.clock()
        if removed_at is not None:
            self.problem = (
                f"the coordinator removed this hospital's key ({self.fingerprint}) on "
                f"{removed_at}: a removed key is never accepted again. Make a new key pair "
                "(`fedcare client keygen --out DIR --name NAME`), send the new NAME.pub to the "
                "coordinator, whose operator runs `fedcare server add-hospital "
                f"{self.hospital} NAME.pub --pki PKI`, and start this daemon with --key DIR/NAME.key"
            )
            return None
        if self.problem is not None:
            return None
        if refused and still_online:  # registered; its last connection has not timed out
            delay = min(self.backoff.wait(1), STILL_ONLINE_WAIT)
            self.say(
                "the coordinator still counts this hospital's previous connection as online: it "
                "ended without signing off (a crash, a kill or a lost network) and times out "
                "within two heartbeat intervals (60 s with Flower's defaults). Trying again in "
                f"{delay:.0f} s (Ctrl-C stops)"
            )
            return delay
        if refused:
            self.refusals += 1
            waited = now - self._since
            if self.join_timeout is not None and waited >= self.join_timeout:
                self.problem = (
                    f"the coordinator refused this hospital: its public key ({self.fingerprint}) "
                    f"is still not registered there after {waited:.0f} s (--join-timeout "
                    f"{self.join_timeout:g}). Once the coordinator's operator has run "
                    f"`{self.add_command}` with the {self.public_key_name} of this key, start "
                    "this daemon again"
                )
                return None
            delay = self.backoff.wait(self.refusals)
            until = ""
            if self.join_timeout is not None:
                delay = min(delay, self.join_timeout - waited)
                until = f", gives up in {self.join_timeout - waited:.0f} s (--join-timeout)"
            self.say(
                f"the coordinator refused this hospital: its public key ({self.fingerprint}) is "
                f"not registered there (yet). The coordinator's operator adds it with "
                f"`{self.add_command}` (PKI: the coordinator's folder from `fedcare server "
                f"init`; {self.public_key_name}: the public key of --key, sent to the "
                f"coordinator) and checks that the fingerprint it prints is {self.fingerprint}. "
                f"Trying again in {delay:.0f} s (attempt {self.refusals + 1}{until}; Ctrl-C stops)"
            )
            return delay
        if joined:  # connected, then ended: the next attempt tells a removal from a hiccup
            self.refusals, self._since = 0, now
            self.say(
                f"the SuperNode stopped after joining (exit code {code}; see {self.log_path}); "
                f"connecting again in {self.backoff.first:.0f} s"
            )
            return self.backoff.first
        return None
