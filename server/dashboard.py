"""The coordinator's dashboard: hospitals, runs and per-round curves in a browser, read-only.

``fedcare server dashboard --runs DIR [--pki DIR]`` serves it (see :func:`build_app`). It reads
only what the coordinator already has and never writes:

- the run folders under ``--runs`` (:mod:`server.server_app` writes them): the sidecar of the
  last complete checkpoint (``checkpoints/round-NNN.json``: run config, round, elapsed seconds),
  ``history.json`` (the :class:`~server.history.RunHistory` so far, rewritten every round) and,
  once the run has ended, ``summary.json``;
- with ``--pki``, the hospital registry (``registered.json``) and, when the SuperLink answers on
  ``--superlink``, its node list (``flwr supernode list``, every 5 s): online / offline and since
  when;
- with ``--state`` (the coordinator's state folder), the gateway's counters of requests
  forwarded and refused per route (``STATE/gateway-counters.json``, see :mod:`server.gateway`).

Everything shown of a run is what the coordinator's own report shows: per-hospital metrics and ε
that hospitals released, refusals with the public reason a hospital sent.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from server.checkpoint import latest_checkpoint
from server.history import CAUSES, RunHistory
from shared_models.dashboard import LOOPBACK_NAMES, guarded, render

# run artefacts the dashboard links to, by name (nothing else in a run folder is served)
ARTEFACTS = {
    "curves.png": "image/png",
    "calibration.png": "image/png",
    "report.md": "text/markdown; charset=utf-8",
    "model.md": "text/markdown; charset=utf-8",
    "summary.json": "application/json",
    "metrics.csv": "text/csv; charset=utf-8",
}
GATEWAY_COUNTERS = "gateway-counters.json"


def _finite(value: Any) -> float | None:
    """A float for JSON (None for missing, NaN and ±∞)."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


@dataclass
class RunView:
    """One run folder as the dashboard shows it.

    Attributes
    ----------
    name : str
        The folder's name (what the page's links use).
    status : str
        ``starting`` (no round finished yet), ``running`` (a checkpoint, no summary) or
        ``finished`` (``summary.json`` written).
    round, rounds : int
        Rounds done and planned (``train.rounds``).
    elapsed : float or None
        Seconds since the run (or its resumption) began, at the last checkpoint or the end.
    config : dict
        The run config (run-config keys to values).
    history : RunHistory
        What the coordinator recorded so far.
    overall : dict
        ``summary.json``'s ``overall`` block once the run has ended: the pooled test figures
        (simulation: the centralised evaluation; deployment: the hospitals' last noisy score
        histograms summed, see :func:`server.report.build_summary`), with ``method`` and
        ``intervals``.
    """

    name: str
    status: str
    round: int = 0
    rounds: int = 0
    elapsed: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history: RunHistory = field(default_factory=RunHistory)
    run_id: str = ""
    overall: dict[str, Any] = field(default_factory=dict)

    @property
    def dp(self) -> str:
        """The run's DP settings in one line."""
        c = self.config
        if not c.get("dp.enabled", True):
            return "off"
        level = c.get("dp.level", "sample")
        clipping = c.get("dp.client-clipping-norm" if level == "client" else "dp.max-grad-norm")
        return (
            f"{level}-level, target ε = {c.get('dp.target-epsilon')}, "
            f"δ = {c.get('dp.target-delta')}, clipping {clipping}"
        )

    def hospitals(self) -> list[dict[str, Any]]:
        """Per hospital: latest ε (cumulative, after its last release) and δ, rounds trained,
        latest AUROC, its last miss and the reason."""
        rows: dict[str, dict[str, Any]] = {}
        for ev in self.history.events:
            row = rows.setdefault(
                ev.hospital, {"name": ev.hospital, "epsilon": None, "delta": None, "auroc": None,
                          "rounds_trained": 0, "last_round": 0, "problem": None},
            )  # fmt: skip
            row["last_round"] = max(row["last_round"], ev.round)
            if ev.error is not None:
                row["problem"] = f"round {ev.round} {ev.kind}: {ev.error}"
                continue
            row["rounds_trained"] += ev.kind == "train"
            if (
                ev.metrics.get("epsilon") is not None
            ):  # cumulative: training and evaluation releases
                row["epsilon"], row["delta"] = ev.metrics["epsilon"], ev.metrics.get("delta")
            if ev.kind == "evaluate" and ev.metrics.get("auroc") is not None:
                row["auroc"] = ev.metrics["auroc"]
        return [rows[name] for name in sorted(rows)]

    def curves(self) -> dict[str, Any]:
        """Per-round series for the charts: ``rounds`` [R]; ``epsilon``, ``auroc``, ``loss``:
        hospital -> [R] (None where it did not report that round); ``pooled_auroc`` [R];
        ``target_epsilon``."""
        last = max([self.round, *(e.round for e in self.history.events)])
        rounds = list(range(1, last + 1))
        index = {r: i for i, r in enumerate(rounds)}
        series: dict[str, dict[str, list[float | None]]] = {"epsilon": {}, "auroc": {}, "loss": {}}
        # ε after each round: a hospital's cumulative ε after its last release of the round (its
        # training, then a noisy evaluation release where it makes one)
        keys = {"epsilon": (("train", "evaluate"), "epsilon"), "auroc": (("evaluate",), "auroc"),
                "loss": (("train",), "train-loss")}  # fmt: skip
        for ev in self.history.events:
            if ev.error is not None or ev.round not in index:
                continue
            for name, (kinds, key) in keys.items():
                if ev.kind in kinds and ev.metrics.get(key) is not None:
                    values = series[name].setdefault(ev.hospital, [None] * len(rounds))
                    values[index[ev.round]] = _finite(ev.metrics[key])
        pooled = [
            _finite((self.history.centralized.get(r) or {}).get("auroc")) for r in rounds
        ]  # fmt: skip
        evaluated = [e.round for e in self.history.events
                     if e.kind == "evaluate" and e.error is None and e.round in index]  # fmt: skip
        if all(v is None for v in pooled) and evaluated and self.overall.get("auroc") is not None:
            # a deployment has no centralised evaluation: once the run has ended, the report
            # pools the hospitals' last (noisy) score histograms, i.e. those of the last round
            # with an evaluation
            pooled[index[max(evaluated)]] = _finite(self.overall["auroc"])
        target = self.config.get("dp.target-epsilon") if self.config.get("dp.enabled") else None
        return {"rounds": rounds, **series, "pooled_auroc": pooled,
                "target_epsilon": _finite(target)}  # fmt: skip

    def failures(self) -> list[dict[str, Any]]:
        """Every message a hospital missed: round, kind, hospital, cause, the public reason."""
        return [
            {**miss, "explanation": CAUSES.get(miss["cause"], "")} for miss in self.history.missed()
        ]


def _read_json(path: Path) -> Any:
    """A JSON file, or None while it is missing or half-visible (written by another process)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stamp(folder: Path) -> tuple[tuple[int, int] | None, ...]:
    """What changes when the ServerApp writes to a run folder (every file is renamed into place,
    which changes its folder's modification time)."""

    def stat(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    return tuple(stat(folder / name) for name in ("checkpoints", "summary.json", "history.json"))


_CACHE: dict[Path, tuple[tuple[tuple[int, int] | None, ...], RunView]] = {}
_CACHE_LOCK = threading.Lock()


def read_run(folder: Path) -> RunView:
    """The :class:`RunView` of one run folder, parsed again only when the folder changed (a
    300-hospital run's history is megabytes of JSON, and the page asks every second)."""
    stamp = _stamp(folder)
    with _CACHE_LOCK:
        cached = _CACHE.get(folder)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    view = _read_run(folder)
    with _CACHE_LOCK:
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[folder] = (stamp, view)
    return view


def _read_run(folder: Path) -> RunView:
    """The :class:`RunView` of one run folder (never raises for a folder being written)."""
    view = RunView(name=folder.name, status="starting")
    flower = _read_json(folder / "flower-runs.json") or {}
    view.run_id = str(flower.get("run_id", ""))
    try:
        done, _, sidecar = latest_checkpoint(folder)
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        done, sidecar = 0, None
    if sidecar is not None:
        view.status, view.round = "running", done
        view.config = dict(sidecar.get("run_config") or {})
        view.elapsed = _finite(sidecar.get("elapsed_seconds"))
        # a run folder from before history.json was rewritten every round kept it in the sidecar
        view.history = RunHistory.from_dict(sidecar.get("history") or {})
    summary = _read_json(folder / "summary.json")
    history = _read_json(folder / "history.json")  # rewritten every round
    if isinstance(history, dict):
        view.history = RunHistory.from_dict(history)
    if isinstance(summary, dict) and isinstance(history, dict):
        view.status = "finished"
        view.elapsed = _finite(summary.get("wall_seconds"))
        view.run_id = str(summary.get("run_id", view.run_id))
        overall = summary.get("overall")
        view.overall = overall if isinstance(overall, dict) else {}
    view.rounds = int(view.config.get("train.rounds", 0) or 0)
    if view.status == "finished":
        view.round = max([view.round, *(e.round for e in view.history.events)])
    return view


def run_folders(runs: Path) -> dict[str, Path]:
    """Run folders directly under ``runs`` (those with a ``flower-runs.json``: every run writes
    it before its first message), newest first, by name."""
    found = [p for p in runs.glob("*/flower-runs.json") if p.parent.is_dir()]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return {p.parent.name: p.parent for p in found}


class Presence:
    """Hospitals as the coordinator knows them: the registry, and the SuperLink's node list when
    it answers (asked every ``interval`` seconds in a background thread)."""

    def __init__(self, pki: Path | None, superlink: str, interval: float = 5.0) -> None:
        self.pki, self.superlink, self.interval = pki, superlink, interval
        self.nodes: list[dict[str, Any]] | None = None
        self.note = "no --pki given: hospitals are those of the runs"
        if pki is not None:
            self.note = f"SuperLink {superlink} not reachable: registry only"
            threading.Thread(target=self._poll, daemon=True, name="presence").start()

    def _poll(self) -> None:
        from server.flwr_cli import CONNECTION, FlowerCLI
        from server.hospitals import superlink_reachable
        from server.pki import PKI

        assert self.pki is not None
        with tempfile.TemporaryDirectory(prefix="fedcare-dashboard-") as home:
            cli = FlowerCLI(Path(home), self.superlink, PKI(self.pki).ca_cert)
            while True:
                try:
                    if superlink_reachable(self.superlink):
                        self.nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
                        self.note = f"from the SuperLink at {self.superlink}"
                    else:
                        self.nodes = None
                        self.note = f"SuperLink {self.superlink} not reachable: registry only"
                except Exception as exc:  # noqa: BLE001 -- shown on the page, retried
                    self.nodes = None
                    self.note = f"SuperLink {self.superlink}: {type(exc).__name__}: {exc}"[:300]
                time.sleep(self.interval)

    def rows(self) -> list[dict[str, str]]:
        """(hospital, node id, state, since) rows, as `fedcare server status` shows them."""
        if self.pki is None:
            return []
        from server.hospitals import HospitalRegistry, hospital_rows
        from server.pki import PKI, PKIError

        try:
            registry = HospitalRegistry(PKI(self.pki)).load()
        except PKIError as exc:
            return [{"name": "?", "node": "-", "state": f"registry unreadable: {exc}", "since": ""}]
        if self.nodes is not None:
            rows = hospital_rows(self.nodes, registry)
        else:
            rows = [
                (name, str(e.get("node_id") or "-"),
                 "registered" if e.get("node_id") is not None else "key stored", "-")
                for name, e in sorted(registry["hospitals"].items())
            ]  # fmt: skip
        return [dict(zip(("name", "node", "state", "since"), row, strict=True)) for row in rows]


def build_app(
    runs: Path,
    *,
    pki: Path | None = None,
    superlink: str = "127.0.0.1:9093",
    state: Path | None = None,
    hosts: tuple[str, ...] = LOOPBACK_NAMES,
    token: str | None = None,
    tls: bool = False,
) -> Starlette:
    """The coordinator dashboard's ASGI app.

    Parameters
    ----------
    runs : Path
        Folder whose subfolders are run folders (``runs/`` by default for ``fedcare server
        run`` and ``fedcare simulate --out runs/NAME``).
    pki : Path, optional
        The coordinator's PKI folder: registered hospitals (and with ``superlink``, who is
        online).
    superlink : str
        The SuperLink's loopback Control API address (``HOST:PORT``).
    state : Path, optional
        The coordinator's state folder (``fedcare server start --state``): gateway counters.
    hosts, token, tls
        Access rules (:func:`shared_models.dashboard.guarded`).

    Returns
    -------
    Starlette
        Routes: ``/`` (page), ``/fragment`` (the page's live part), ``/api/run/{name}``
        (curves, JSON), ``/runs/{name}/{artefact}`` (one of :data:`ARTEFACTS`).
    """
    presence = Presence(pki, superlink)

    def selected(request: Request) -> tuple[dict[str, Path], RunView | None]:
        folders = run_folders(runs)
        name = request.query_params.get("run") or next(iter(folders), None)
        folder = folders.get(name) if name is not None else None
        return folders, read_run(folder) if folder is not None else None

    def context(request: Request) -> dict[str, Any]:
        folders, run = selected(request)
        counters = _read_json(state / GATEWAY_COUNTERS) if state is not None else None
        return {
            "runs_dir": str(runs), "run_names": list(folders), "run": run,
            "registry": presence.rows(), "presence_note": presence.note,
            "counters": counters if isinstance(counters, dict) else None,
            "causes": CAUSES,
        }  # fmt: skip

    def page(request: Request) -> Response:
        return render("coordinator.html", **context(request))

    def fragment(request: Request) -> Response:
        return render("coordinator_live.html", **context(request))

    def api_run(request: Request) -> Response:
        folder = run_folders(runs).get(request.path_params["name"])
        if folder is None:
            return PlainTextResponse("no such run", status_code=404)
        run = read_run(folder)
        return JSONResponse(
            {
                "name": run.name,
                "status": run.status,
                "round": run.round,
                "rounds": run.rounds,
                "curves": run.curves(),
            }  # fmt: skip
        )

    def artefact(request: Request) -> Response:
        folder = run_folders(runs).get(request.path_params["name"])
        file = request.path_params["file"]
        if folder is None or file not in ARTEFACTS or not (folder / file).is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(folder / file, media_type=ARTEFACTS[file])

    routes = [
        Route("/", page),
        Route("/fragment", fragment),
        Route("/api/run/{name}", api_run),
        Route("/runs/{name}/{file}", artefact),
    ]
    return guarded(routes, hosts=hosts, token=token, tls=tls)
