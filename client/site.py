"""Per-hospital settings (Flower ``context.node_config``) and loading the site's data.

Deployment: ``flower-supernode --node-config 'site="cleveland" data-path="/data/x.data"'``.
Simulation: the Simulation Engine injects ``partition-id`` / ``num-partitions``; the site is
that partition of the run's data, so one ClientApp serves both modes.
"""

from __future__ import annotations

import functools
import os
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
        The site's data in the task's format: a file, or a folder for image tasks ("" in
        simulation).
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
    mtime = _modified(path)
    return _load_file(
        run.task.name, site.name, str(path), mtime, run.task.preprocessing,
        run.data.test_fraction, run.train.seed,
    )  # fmt: skip


def _modified(path: Path) -> int:
    """Newest modification time (ns) of a data file, or of a data folder and its direct entries
    (an image folder's labels.csv or images), so that the cache below sees any change."""
    if not path.exists():
        return 0
    if not path.is_dir():
        return path.stat().st_mtime_ns
    with os.scandir(path) as entries:
        return max([path.stat().st_mtime_ns, *(e.stat().st_mtime_ns for e in entries)])


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
