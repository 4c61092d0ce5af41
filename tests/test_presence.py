"""Waiting for hospitals before and during a run (server/presence.py): what is said while
waiting, and who is named when they never come. The SuperLink's answers and the clock are
given; the end-to-end test is tests/test_e2e_deployment.py (a registered hospital that never
starts)."""

from __future__ import annotations

import pytest

from server.presence import HospitalsMissingError, Presence, RunWaitWatch, wait_for_hospitals


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _p(online: str, offline: str) -> Presence:
    return Presence(tuple(online.split()), tuple(offline.split()))


def test_presence_names_who_is_online_and_who_is_not():
    assert _p("a", "b c").describe() == "1 of 3 online (a; b, c offline)"
    assert _p("a b c", "").describe() == "3 of 3 online (a, b, c)"
    assert _p("", "a b").describe() == "0 of 2 online (a, b offline)"


def test_the_wait_says_who_it_waits_for_and_ends_when_enough_are_online():
    clock, said = Clock(), []
    answers = iter([_p("a", "b c")] * 3 + [_p("a b", "c")] * 20 + [_p("a b c", "")])
    ready = wait_for_hospitals(lambda: next(answers), need=3, timeout=600, say=said.append,
                               poll=5, repeat=60, clock=clock, sleep=clock.sleep)  # fmt: skip
    assert ready == _p("a b c", "")
    assert said == [  # when the wait starts, when someone comes, and once a minute
        "waiting for hospitals: 1 of 3 online (a; b, c offline)",
        "waiting for hospitals: 2 of 3 online (a, b; c offline)",
        "waiting for hospitals: 2 of 3 online (a, b; c offline)",
    ]
    assert clock.now == 115


def test_the_wait_gives_up_naming_who_never_came_and_who_left():
    clock = Clock()
    answers = iter([_p("a b", "c")] + [_p("a", "b c")] * 10)
    with pytest.raises(HospitalsMissingError) as exc:
        wait_for_hospitals(lambda: next(answers), need=3, timeout=12, say=lambda _: None,
                           clock=clock, sleep=clock.sleep)  # fmt: skip
    assert str(exc.value) == (
        "after 12 s only 1 of 3 online (a; b, c offline), 3 needed; never came online: c; "
        "went offline while waiting: b"
    )
    assert clock.now == 12  # the last look is at the deadline, not later


def test_a_round_waiting_for_hospitals_is_named_and_stopped_after_the_timeout():
    clock, said = Clock(), []
    watch = RunWaitWatch(presence=lambda: _p("a", "b c"), timeout=120, say=said.append,
                         repeat=60, clock=clock)  # fmt: skip
    waiting = "INFO :      Waiting for nodes to connect: 1 connected (minimum required: 2)."
    assert watch.feed("INFO :      [ROUND 3/5]") is None
    for _ in range(120):  # Flower says it every second
        assert watch.feed(waiting) is None
        clock.sleep(1)
    assert watch.feed(waiting) == (
        "round 3 waited 120 s for hospitals: 1 of 3 online (a; b, c offline), 2 needed"
    )
    assert said == ["waiting for hospitals: 1 of 3 online (a; b, c offline); round 3 needs 2"] * 3
    watch = RunWaitWatch(presence=lambda: _p("a b", "c"), timeout=5, say=said.append, clock=clock)
    watch.feed(waiting)
    clock.sleep(4)
    watch.feed("INFO :      configure_train: Sampled 2 nodes (out of 2)")  # the wait is over
    clock.sleep(4)
    assert watch.feed(waiting) is None
