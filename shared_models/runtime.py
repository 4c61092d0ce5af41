"""Process environment and child-process handling shared by every fedcare command.

Every process fedcare starts (Flower's SuperLink, SuperNodes, ClientApp/ServerApp processes,
Ray workers) gets :data:`OFFLINE_ENV`: no telemetry, no update checks, no runtime dependency
installation, no hub downloads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage-stats reporting
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # `--tracking mlflow`: MLflow's usage telemetry
    "DO_NOT_TRACK": "true",
}


PARTITION_CACHE_ENV = "FEDCARE_PARTITION_CACHE"
"""A folder where simulated hospitals share their partition (see :mod:`shared_models.partition`)."""


@contextlib.contextmanager
def partition_cache() -> Iterator[Path]:
    """A fresh temporary folder in ``$FEDCARE_PARTITION_CACHE`` for the duration of the block
    (processes started inside it, such as Ray's workers, inherit it); removed afterwards and
    the variable restored."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fedcare-partitions-"))
    previous = os.environ.get(PARTITION_CACHE_ENV)
    os.environ[PARTITION_CACHE_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(PARTITION_CACHE_ENV, None)
        else:
            os.environ[PARTITION_CACHE_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)


def apply_offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OFFLINE_ENV` in ``env`` (default: ``os.environ``) and return it."""
    target = os.environ if env is None else env
    target.update(OFFLINE_ENV)
    return target  # type: ignore[return-value]


def child_env(**extra: str) -> dict[str, str]:
    """A copy of this process's environment with :data:`OFFLINE_ENV` and ``extra`` set."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update(extra)
    return env


def flower_executable(name: str) -> str:
    """Path of a Flower console script (``flower-superlink``, ``flwr`` ...) next to this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this process dies (even by SIGKILL), so a killed fedcare
    command never leaves an orphaned SuperLink or SuperNode behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_foreground(
    cmd: list[str],
    *,
    env: dict[str, str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    stop_timeout: float = 20.0,
    companions: Sequence[tuple[list[str], Path]] = (),
    restart: Callable[[int], float | None] | None = None,
) -> int:
    """Run ``cmd`` until it exits, copying its output to ``log_path`` (and ``on_line``).

    SIGINT / SIGTERM received by this process stop the companions, then the child with SIGTERM
    (Flower's SuperLink and SuperNode shut down cleanly on it); after ``stop_timeout`` seconds the
    child is killed. Companions stop first because their open connections hold up the child's
    shutdown: uvicorn, under the SuperLink's and the SuperNode's HTTP APIs, waits for open
    connections to close (the gateway's, the launcher's) before it exits. The child runs in its
    own process group, which is killed once the child has exited, so no process it started
    (SuperExec, ClientApp or ServerApp processes) outlives it. Returns the child's exit code, or
    0 when the stop was requested here.

    ``companions`` are ``(command, log file)`` pairs started after ``cmd`` with the same
    guarantees (own process group, killed with this process, stopped with the child). A
    companion that exits on its own stops the child too: ``on_line`` receives
    ``"[fedcare] <command> exited with code N"`` and the return value is N (1 if N is 0).

    ``restart``, when given, is called (in this thread) with the child's exit code each time the
    child exits on its own -- not stopped here, no companion gone -- once its output has been
    read and its process group killed. It returns the seconds to wait before ``cmd`` is started
    again (the companions keep running meanwhile), or None to return the exit code. A stop
    requested during the wait ends it at once (return value 0).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proc, reader = _start_child(cmd, env, log_path, on_line)
    stopping = threading.Event()
    extra: list[subprocess.Popen[bytes]] = []
    try:
        for ccmd, clog in companions:
            extra.append(_spawn_companion(ccmd, env=env, log_path=clog))
    except OSError:  # a companion that cannot start: stop everything started so far
        for companion in extra:
            _stop_group(companion, stop_timeout)
        proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    failed: list[int] = []

    def _stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()  # the loop below stops the companions, then the child

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            while proc.poll() is None:
                for ccmd, companion in zip([c for c, _ in companions], extra, strict=True):
                    if not failed and not stopping.is_set() and companion.poll() is not None:
                        failed.append(companion.returncode or 1)
                        if on_line is not None:
                            on_line(
                                f"[fedcare] {' '.join(ccmd)} exited with code "
                                f"{companion.returncode}"
                            )
                if stopping.is_set() or failed:
                    for companion in extra:  # first: they hold connections the child waits for
                        _stop_group(companion, stop_timeout)
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=stop_timeout)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                time.sleep(0.2)
            reader.join(timeout=5)  # its last lines reach on_line before restart is asked
            with contextlib.suppress(ProcessLookupError):  # e.g. ClientApp processes left behind
                os.killpg(proc.pid, signal.SIGKILL)
            if stopping.is_set() or failed or restart is None:
                break
            delay = restart(int(proc.returncode))
            if delay is None:
                break
            resume_at = time.monotonic() + delay
            while not stopping.is_set() and time.monotonic() < resume_at:
                time.sleep(min(0.2, max(0.0, resume_at - time.monotonic())))
            if stopping.is_set():
                break
            proc, reader = _start_child(cmd, env, log_path, on_line)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for companion in extra:
            _stop_group(companion, stop_timeout)
        with contextlib.suppress(ProcessLookupError):  # e.g. ClientApp processes left behind
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    if failed:
        return failed[0]
    return 0 if stopping.is_set() else int(proc.returncode or 0)


def _start_child(
    cmd: list[str], env: dict[str, str], log_path: Path, on_line: Callable[[str], None] | None
) -> tuple[subprocess.Popen[str], threading.Thread]:
    """Start ``cmd`` in a process group of its own, dying with us, and a thread that copies its
    output to ``log_path`` (appended) and to ``on_line``."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # its own process group: stopping it stops everything it started
        preexec_fn=_die_with_parent,
    )  # fmt: skip

    def _pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))

    reader = threading.Thread(target=_pump, daemon=True)
    reader.start()
    return proc, reader


def _spawn_companion(
    cmd: list[str], *, env: dict[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, output appended to ``log_path``, dying with us."""
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM ``proc``, SIGKILL it after ``timeout`` seconds, then SIGKILL its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
