"""Faults lose nothing: a hospital process killed with SIGKILL while it writes its privacy ledger
leaves a ledger that reads back, never a half-written file, and never an older count than the
last one that was written completely.

Real processes: each writer is a fork of this test process (the ledger's imports are paid once)
that saves ever larger records in a loop until it is killed with ``kill -9`` at a random moment.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

from client.ledger import Ledger, RunRecord
from client.training import empty_accountant_state


def _record(n: int) -> RunRecord:
    """A run record whose every count is ``n`` and whose accountant history grows with it."""
    state = empty_accountant_state("rdp")
    state["history"] = [[1.1, 0.01, 1] for _ in range(n)]  # a longer file at every save
    return RunRecord(
        run_id="run-k", task="breast-cancer", delta=1e-5, hospital_delta=1e-5, plan={"n": 1},
        accountant=state, sample_level_dp=True, train_steps=n, updates=n, eval_releases=n,
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_hospital_killed_while_writing_its_ledger_leaves_it_readable(tmp_path):
    ledger = Ledger(tmp_path / "ledger")
    ledger.save(_record(0))
    rng = random.Random(7)
    last = 0
    for _ in range(25):
        pid = os.fork()
        if pid == 0:  # the writer: save forever (each save: temp file, fsync, rename, fsync)
            try:
                n = last
                while True:
                    n += 1
                    ledger.save(_record(n))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        record = ledger.load("run-k")  # raises LedgerError if the file were half-written
        assert record is not None
        assert record.updates >= last  # never an older version than one already completed
        assert record.train_steps == record.updates == len(record.accountant["history"])
        last = record.updates
    assert last > 0  # the writers did write
    assert [r.run_id for r in ledger.records()] == ["run-k"]  # leftover temp files are ignored


def test_a_ledger_written_before_the_hospital_wording_keeps_its_delta(tmp_path):
    """Ledgers written before fedcare said "hospital" for a site store ``site_delta``; reading
    them under the run's δ instead (10x larger here) would show an understated ε at the
    hospital's δ (`client budget`, the hospital's dashboard; the caps are checked at the
    policy's δ)."""
    record = _record(3)
    old = json.loads(record.to_json())
    old["delta"], old["site_delta"] = 1e-4, old.pop("hospital_delta")
    ledger = Ledger(tmp_path / "ledger")
    (tmp_path / "ledger" / "runs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ledger" / "runs" / "run-k.json").write_text(json.dumps(old))
    loaded = ledger.load("run-k")
    assert loaded is not None and loaded.hospital_delta == 1e-5
    assert loaded.epsilon(loaded.hospital_delta) > loaded.epsilon()  # the smaller δ, the larger ε
    from client.dashboard import read_ledger

    (shown,) = read_ledger(tmp_path / "ledger")  # the hospital's dashboard reads it alike
    assert shown.problem is None and shown.hospital_delta == 1e-5
