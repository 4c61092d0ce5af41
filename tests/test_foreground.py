"""`shared_models.runtime.run_foreground`, with real processes: the stop order of a daemon and its
companions (the coordinator's SuperLink and gateway; a hospital's SuperNode and launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# The child serves one TCP connection and, like uvicorn under Flower's SuperLink and SuperNode,
# does not exit on SIGTERM before its open connections are closed; it records whether the
# companion's connection was still open when the first SIGTERM arrived. It creates MARK.connected once it
# has accepted the companion's connection and handles SIGTERM.
CHILD = """
import signal, socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))
open(sys.argv[1] + ".port", "w").write(str(srv.getsockname()[1]))
conn, _ = srv.accept()
conn.setblocking(False)
def open_now():
    try:
        return conn.recv(1) != b""
    except BlockingIOError:
        return True
first = []
def on_term(signum, frame):
    if not first:  # the first SIGTERM: a later one would find the connection closed anyway
        first.append(open(sys.argv[1], "w").write("open" if open_now() else "closed"))
    while open_now():
        time.sleep(0.05)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + ".connected", "w").close()  # the companion's connection is open
while True:
    time.sleep(0.05)
"""

# The companion holds a connection to the child until it is stopped.
COMPANION = """
import socket, sys, time
from pathlib import Path
port = Path(sys.argv[1] + ".port")
while not port.exists() or not port.read_text():
    time.sleep(0.05)
conn = socket.create_connection(("127.0.0.1", int(port.read_text())))
while True:
    time.sleep(0.05)
"""

DRIVER = """
import sys
from pathlib import Path
from shared_models.runtime import run_foreground
child, companion, mark, log = sys.argv[1:5]
code = run_foreground([sys.executable, child, mark], env=dict(__import__("os").environ),
                      log_path=Path(log), stop_timeout=20,
                      companions=[([sys.executable, companion, mark], Path(log + ".c"))])
print("exit", code)
"""


def test_companions_stop_before_the_child_so_its_shutdown_does_not_wait(tmp_path: Path):
    """SIGTERM to the foreground process: the companion (which holds a connection the child waits
    for) is stopped first, then the child; the whole stop ends with exit code 0."""
    files = {}
    for name, text in (("child", CHILD), ("companion", COMPANION), ("driver", DRIVER)):
        files[name] = tmp_path / f"{name}.py"
        files[name].write_text(textwrap.dedent(text))
    mark = tmp_path / "at-sigterm"
    driver = subprocess.Popen(
        [sys.executable, str(files["driver"]), str(files["child"]), str(files["companion"]),
         str(mark), str(tmp_path / "child.log")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (tmp_path / "at-sigterm.connected").exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # the companion connects
    assert driver.poll() is None, "the driver ended before the companion connected"
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=60)
    assert out.strip() == "exit 0"
    assert mark.read_text() == "closed"  # the companion was gone before the child's SIGTERM
    assert not _alive_python_with(str(mark))


def _alive_python_with(arg: str) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if arg in Path(f"/proc/{pid}/cmdline").read_text():
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            continue
    return False


# The child prints a line and exits with code 3; the companion records its pid and stays.
RESTART_DRIVER = """
import os, sys
from pathlib import Path
from shared_models.runtime import run_foreground
mark, log, wait = sys.argv[1], sys.argv[2], float(sys.argv[3])
codes = []
def restart(code):
    codes.append(code)
    return wait if len(codes) < 3 else None
child = [sys.executable, "-c", "import sys; print('attempt'); sys.exit(3)"]
companion = [sys.executable, "-c",
             f"import os, time; open({mark!r}, 'a').write(f'{{os.getpid()}}\\\\n'); time.sleep(120)"]
code = run_foreground(child, env=dict(os.environ), log_path=Path(log), restart=restart,
                      companions=[(companion, Path(log + ".c"))])
print("exit", code, codes)
"""


def _restart_driver(tmp_path: Path, wait: float) -> subprocess.Popen[str]:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(RESTART_DRIVER))
    return subprocess.Popen(
        [sys.executable, str(driver), str(tmp_path / "companion-pids"), str(tmp_path / "child.log"),
         str(wait)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip


def test_a_child_that_exits_is_restarted_while_its_companion_keeps_running(tmp_path: Path):
    """``restart`` is asked after each exit of the child (with its code, its output already
    read); the child is started again after the wait it returns, the companion is started once
    and stopped at the end; None ends the loop with the child's code."""
    out, _ = _restart_driver(tmp_path, 0.1).communicate(timeout=60)
    assert out.strip() == "exit 3 [3, 3, 3]"
    assert (tmp_path / "child.log").read_text() == "attempt\n" * 3
    pids = (tmp_path / "companion-pids").read_text().split()
    assert len(pids) == 1 and not Path(f"/proc/{pids[0]}").exists()


def test_a_stop_during_the_wait_before_a_restart_ends_at_once(tmp_path: Path):
    """SIGTERM while ``restart``'s wait (here 60 s) runs: the companion stops, exit code 0."""
    driver = _restart_driver(tmp_path, 60.0)
    deadline = time.monotonic() + 30
    log = tmp_path / "child.log"
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # restart has been asked
    started = time.monotonic()
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=30)
    assert out.strip() == "exit 0 [3]" and time.monotonic() - started < 10
    assert log.read_text() == "attempt\n"
    pids = (tmp_path / "companion-pids").read_text().split()
    assert len(pids) == 1 and not Path(f"/proc/{pids[0]}").exists()
