"""A consortium's own task for the task-file tests: GBSG2, a real clinical table that is not a
built-in task.

GBSG2 (German Breast Cancer Study Group 2; Schumacher et al., J Clin Oncol 1994): 686 women
with node-positive breast cancer, as distributed with R's TH.data and inside the lifelines
wheel (``lifelines/datasets/gbsg2.csv``, read here as a file: lifelines is never imported).
The task: was recurrence or death observed during follow-up (``cens = 1``)? The follow-up time
itself is not an input (``ignore``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

# units from TH.data's GBSG2 documentation; ranges: clinical limits a consortium would write
# into its data dictionary (not the data's own extremes)
TASK = """\
[task]
name = "gbsg2"
description = "Recurrence or death during follow-up after node-positive breast cancer (GBSG2)"
model = "logreg"
missing = ["NA"]
ignore = ["time"]  # follow-up time: known only afterwards

[label]
column = "cens"
positive = [1]
negative = [0]
meaning = "recurrence or death observed"

[[feature]]
name = "horTh"
type = "binary"
description = "hormonal therapy"
levels = ["no", "yes"]

[[feature]]
name = "age"
type = "numeric"
unit = "years"
min = 18
max = 100

[[feature]]
name = "menostat"
type = "binary"
description = "menopausal status"
levels = ["Pre", "Post"]

[[feature]]
name = "tsize"
type = "numeric"
unit = "mm"
min = 0
max = 200

[[feature]]
name = "tgrade"
type = "categorical"
levels = ["I", "II", "III"]

[[feature]]
name = "pnodes"
type = "numeric"
description = "number of positive lymph nodes"
min = 0
max = 60

[[feature]]
name = "progrec"
type = "numeric"
unit = "fmol/mg"
description = "progesterone receptor"
min = 0
max = 3000
if-missing = "impute"

[[feature]]
name = "estrec"
type = "numeric"
unit = "fmol/mg"
description = "estrogen receptor"
min = 0
max = 3000
"""
HOSPITALS = ("bonn", "hamburg", "munich")


def gbsg2_frame() -> pd.DataFrame:
    """The GBSG2 table from the lifelines wheel (skips the test when lifelines is absent)."""
    spec = importlib.util.find_spec("lifelines")
    if spec is None or spec.origin is None:
        pytest.skip("lifelines is not installed (pip install -e '.[dev]')")
    return pd.read_csv(Path(spec.origin).parent / "datasets" / "gbsg2.csv")


def write_hospitals(folder: Path) -> dict[str, Path]:
    """Three hospital exports of GBSG2 (thirds of the table), each in another CSV dialect:
    bonn comma-separated; hamburg semicolon-separated, UTF-8 with BOM, quoted header, CRLF;
    munich tab-separated with progrec not recorded ("NA") for its first 15 patients."""
    frame = gbsg2_frame()
    folder.mkdir(parents=True, exist_ok=True)
    n = len(frame)
    parts = [frame.iloc[: n // 3], frame.iloc[n // 3 : 2 * n // 3], frame.iloc[2 * n // 3 :]]
    paths = {name: folder / f"{name}.csv" for name in HOSPITALS}
    parts[0].to_csv(paths["bonn"], index=False)
    hamburg = parts[1].to_csv(index=False, sep=";", quoting=1, lineterminator="\r\n")
    paths["hamburg"].write_bytes(b"\xef\xbb\xbf" + hamburg.encode())
    munich = parts[2].copy()
    munich["progrec"] = munich["progrec"].astype(object)
    munich.iloc[:15, munich.columns.get_loc("progrec")] = "NA"
    munich.to_csv(paths["munich"], index=False, sep="\t")
    return paths
