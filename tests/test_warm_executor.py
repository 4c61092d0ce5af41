"""The warm executor's bundle process: one approved bundle's ClientApp imported once, from Flower's
install folder of that bundle, never from the launcher's own copy of the code."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from client.warm_executor import BundleProcess, installed_app_dir

HASH = "ab12cd34" + "0" * 56


def _install(home: Path, fab_hash: str, marker: Path) -> Path:
    """An installed app as Flower lays it out: its ClientApp module writes where it was imported
    from, and the process id, when it is imported."""
    app = home / "apps" / f"hospital.app.1.0.0.{fab_hash[:8]}"
    (app / "client").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1.0.0"\n\n'
        '[tool.flwr.app]\npublisher = "hospital"\n\n'
        '[tool.flwr.app.components]\nserverapp = "client.client_app:app"\n'
        'clientapp = "client.client_app:app"\n'
    )
    (app / "client" / "__init__.py").write_text("")
    (app / "client" / "client_app.py").write_text(
        "import os\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f'{__file__} {os.getpid()}\\n')\n"
        "app = object()\n"
    )
    return app


def test_the_install_folder_is_found_by_the_bundle_hash_only(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert installed_app_dir(HASH) is None
    app = _install(tmp_path, HASH, tmp_path / "marker")
    assert installed_app_dir(HASH) == app
    assert installed_app_dir("ff" + HASH[2:]) is None  # another bundle
    assert installed_app_dir("") is None


def test_the_bundle_process_imports_the_installed_bundle_once_and_exits_with_the_launcher(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    marker = tmp_path / "marker"
    app = _install(tmp_path, HASH, marker)
    bundle = BundleProcess.start(HASH)
    assert bundle is not None
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (line,) = marker.read_text().splitlines()
        path, pid = line.split()
        # the bundle's own copy (not the launcher's client/client_app.py), in the bundle process
        assert Path(path) == app / "client" / "client_app.py" and int(pid) == bundle.pid
    finally:
        bundle.close()  # the launcher closes the connection: the process exits and is reaped
    with pytest.raises(ChildProcessError):
        os.waitpid(bundle.pid, os.WNOHANG)
    assert not bundle.launch(object())  # type: ignore[arg-type]  # closed: the launcher forks


def test_no_bundle_process_without_an_install_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    assert BundleProcess.start(HASH) is None


def test_a_bundle_that_fails_to_import_still_gets_its_tasks_forked(tmp_path, monkeypatch):
    """Its children load the ClientApp again and report the error through Flower, as a direct
    fork would; the bundle process itself stays up until the launcher closes it."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    app = _install(tmp_path, HASH, tmp_path / "marker")
    (app / "client" / "client_app.py").write_text("raise RuntimeError('broken bundle')\n")
    bundle = BundleProcess.start(HASH)
    assert bundle is not None
    try:
        time.sleep(2)
        done, _ = os.waitpid(bundle.pid, os.WNOHANG)
        assert done == 0  # still serving
    finally:
        bundle.close()
