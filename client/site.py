"""Per-hospital settings (Flower ``context.node_config``) and loading the site's data.

Deployment: ``flower-supernode --node-config 'site="cleveland" data-path="/data/x.data"'``.
Simulation: the Simulation Engine injects ``partition-id`` / ``num-partitions``; the site is
that partition of the run's data, so one ClientApp serves both modes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.config import RunConfig
from shared_models.sites import simulated_sites_for, site_from_frame
from shared_models.tasks import SiteData, get_task


@dataclass(frozen=True)
class SiteSettings:
    """What one hospital configures for itself (never set by the coordinator).

    Attributes
    ----------
    name : str
        Site name shown in reports (deployment: ``site``; simulation: from the partition).
    data_path : str
        The site's data file (or folder, e.g. icu-mortality's record files) in the task's
        upstream format ("" in simulation).
    partition_id, num_partitions : int
        Simulation only (-1 in deployment).
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
    """

    name: str
    data_path: str
    partition_id: int
    num_partitions: int
    device: str

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> SiteSettings:
        """Parse ``context.node_config``.

        Raises
        ------
        ValueError
            Neither ``data-path`` nor a simulation ``partition-id`` is set.
        """
        data_path = str(cfg.get("data-path", ""))
        partition_id = int(cfg.get("partition-id", -1))
        num_partitions = int(cfg.get("num-partitions", -1))
        if not data_path and partition_id < 0:
            raise ValueError(
                "node config has no 'data-path': start the hospital with "
                '--node-config \'data-path="/path/to/file" site="NAME"\''
            )
        default_name = Path(data_path).stem if data_path else f"partition-{partition_id}"
        return cls(
            name=str(cfg.get("site", default_name)),
            data_path=data_path,
            partition_id=partition_id,
            num_partitions=num_partitions,
            device=str(cfg.get("device", "auto")),
        )

    @property
    def simulated(self) -> bool:
        return not self.data_path


def load_site_data(site: SiteSettings, run: RunConfig) -> SiteData:
    """This hospital's preprocessed data (train/test split, scaled with the task's fixed constants).

    Raises
    ------
    shared_models.tasks.DataError
        The file is missing or malformed (the message names file, line and column).
    """
    if site.simulated:
        sites = simulated_sites_for(run, site.num_partitions)
        return sites[site.partition_id]
    path = Path(site.data_path)
    return _load_file(
        run.task.name, site.name, str(path), _stamp(path), run.task.preprocessing,
        run.data.test_fraction, run.train.seed,
    )  # fmt: skip


def _stamp(path: Path) -> int:
    """Changes whenever the site's data change: a file's mtime, or for a data folder (e.g. ICU
    record files) the names, sizes and mtimes of the files in it and one level down."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_mtime_ns
    entries = sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in (*path.glob("*"), *path.glob("*/*"))
        if p.is_file()
    )
    return hash(tuple(entries))


@functools.lru_cache(maxsize=4)
def _load_file(
    task_name: str,
    site: str,
    path: str,
    mtime: int,
    preprocessing: str,
    test_fraction: float,
    seed: int,
) -> SiteData:
    task = get_task(task_name)
    frame = task.read_file(Path(path))
    return site_from_frame(
        task, site, frame, preprocessing=preprocessing, test_fraction=test_fraction, seed=seed
    )
