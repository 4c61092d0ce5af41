"""Which registered hospitals are online, and waiting for them before and during a run.

``fedcare server run`` names hospitals as the coordinator registered them
(:class:`~server.hospitals.HospitalRegistry`: ``PKI/hospitals/NAME.pub`` and the node id the
SuperLink gave each key) and asks the SuperLink which nodes are online (``flwr supernode list``
on the loopback side). Before it submits a run it waits until enough hospitals are online,
saying who it waits for; Flower's strategies would otherwise wait for nodes without a bound and
without names ("Waiting for nodes to connect: 1 connected"). A hospital whose key the
SuperLink does not know yet counts as offline.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.flwr_cli import CONNECTION, FlowerCLI
from server.hospitals import HospitalRegistry
from server.pki import PKI

# Flower's strategies log this every second while fewer nodes are connected than they need
# (flwr/serverapp/strategy/strategy_utils.py: sample_nodes)
FLOWER_WAITING = re.compile(
    r"Waiting for nodes to connect: (\d+) connected \(minimum required: (\d+)\)"
)
FLOWER_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")


class HospitalsMissingError(RuntimeError):
    """Too few hospitals came online in time; the message names those that did not."""


@dataclass(frozen=True)
class Presence:
    """Registered hospitals by state, each sorted by name."""

    online: tuple[str, ...]
    offline: tuple[str, ...]

    @property
    def registered(self) -> int:
        return len(self.online) + len(self.offline)

    def describe(self) -> str:
        """``1 of 3 online (a; b, c offline)``; ``3 of 3 online (a, b, c)``."""
        names = ", ".join(self.online)
        if self.offline:
            names += ("; " if names else "") + ", ".join(self.offline) + " offline"
        return f"{len(self.online)} of {self.registered} online ({names})"


def hospital_presence(cli: FlowerCLI, pki: PKI) -> Presence:
    """Every hospital with a key in ``pki``, online or offline as the SuperLink sees it now.

    Raises
    ------
    FlowerCLIError
        The SuperLink could not be asked.
    """
    nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
    online_ids = {int(n["node-id"]) for n in nodes if n.get("status") == "online"}
    ids = HospitalRegistry(pki).node_ids()
    names = pki.hospitals()
    online = tuple(n for n in names if ids.get(n) in online_ids)
    return Presence(online=online, offline=tuple(n for n in names if n not in online))


def wait_for_hospitals(
    presence: Callable[[], Presence],
    *,
    need: int,
    timeout: float,
    say: Callable[[str], None],
    poll: float = 5.0,
    repeat: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Presence:
    """Return once at least ``need`` registered hospitals are online.

    While fewer are, ``say`` gets ``waiting for hospitals: 1 of 3 online (a; b, c offline)``
    at the start, whenever someone comes or goes, and every ``repeat`` seconds.

    Parameters
    ----------
    presence : callable
        Asks the SuperLink (:func:`hospital_presence`), every ``poll`` seconds.
    need : int
        Hospitals that must be online.
    timeout : float
        Seconds to wait at most.

    Raises
    ------
    HospitalsMissingError
        After ``timeout`` seconds, naming the hospitals still offline (and which of them were
        online for a while).
    """
    deadline = clock() + timeout
    seen_online: set[str] = set()
    last: Presence | None = None
    said_at = -float("inf")
    while True:
        now = presence()
        seen_online |= set(now.online)
        if len(now.online) >= need:
            return now
        if now != last or clock() - said_at >= repeat:
            say(f"waiting for hospitals: {now.describe()}")
            last, said_at = now, clock()
        left = deadline - clock()
        if left <= 0:
            never = [n for n in now.offline if n not in seen_online]
            gone = [n for n in now.offline if n in seen_online]
            who = (f"never came online: {', '.join(never)}" if never else "") + (
                ("; " if never else "") + f"went offline while waiting: {', '.join(gone)}"
                if gone
                else ""
            )
            raise HospitalsMissingError(
                f"after {timeout:g} s only {now.describe()}, {need} needed; {who}"
            )
        sleep(min(poll, left))


@dataclass
class RunWaitWatch:
    """Follows a running run's log lines for Flower's wait for nodes (a hospital went offline
    and the strategy needs more): says who is offline when the wait starts and every
    ``repeat`` seconds, and reports when it has lasted ``timeout`` seconds.

    ``feed(line)`` returns None, or the message to stop the run with.
    """

    presence: Callable[[], Presence]
    timeout: float
    say: Callable[[str], None]
    repeat: float = 60.0
    clock: Callable[[], float] = time.monotonic
    round: int = 0
    waiting_since: float | None = None
    said_at: float = -float("inf")

    def feed(self, line: str) -> str | None:
        """Take one log line; the reason to stop the run once the wait lasted too long."""
        if (r := FLOWER_ROUND.search(line)) is not None:
            self.round = int(r.group(1))
        m = FLOWER_WAITING.search(line)
        if m is None:
            if line.strip() and "INFO" in line:  # any other progress: the wait is over
                self.waiting_since = None
            return None
        now = self.clock()
        if self.waiting_since is None:
            self.waiting_since, self.said_at = now, -float("inf")
        needed = int(m.group(2))
        if now - self.said_at >= self.repeat:
            self.said_at = now
            self.say(
                f"waiting for hospitals: {self.presence().describe()}; round {self.round} "
                f"needs {needed}"
            )
        if now - self.waiting_since >= self.timeout:
            return (
                f"round {self.round} waited {now - self.waiting_since:.0f} s for hospitals: "
                f"{self.presence().describe()}, {needed} needed"
            )
        return None
