"""Image tasks: chest X-rays from MedMNIST v2 files or from a hospital's own image folder.

``chest-xray``
    Binary: 1 = pneumonia, 0 = normal (PneumoniaMNIST: paediatric chest X-rays of Kermany et al.,
    Cell 2018, as packaged by MedMNIST v2, Yang et al., Scientific Data 2023). Two input formats:

    * a MedMNIST v2 ``.npz`` file (simulation): ``train_images`` ``[N, H, W] uint8`` (or
      ``[N, H, W, 3]``), ``train_labels`` ``[N]`` or ``[N, 1]``, the same for ``val_`` and
      ``test_``; any binary MedMNIST file of that layout and any published size (28, 64, 128,
      224). The train split is partitioned into hospitals; each hospital's test split is its
      share of the official test split (per class, in proportion to the hospital's training
      examples of that class), so the pooled evaluation is the whole official test split. The
      val split is not used.
    * a hospital's own folder (deployment, ``fedcare client start --data DIR``): image files
      (PNG, JPEG, or DICOM read with pydicom, recognised by content) and ``labels.csv`` with the
      columns ``file`` (name inside the folder) and ``label`` (0 or 1). In simulation a data
      folder with one such sub-folder per hospital is a federation of real hospitals.

Every image goes through the same fixed steps at every hospital (no statistic of any hospital, let
alone pooled ones): grayscale (8-bit images: PIL's ITU-R 601-2 luma for RGB; DICOM: modality
and VOI LUTs, MONOCHROME1 inverted; deeper than 8 bits: scaled from the image's own range to
0..255), centre crop to a square and resize to ``S x S`` (MedMNIST v2's own preprocessing:
"center-crop ... and resize"; PIL bicubic with antialiasing), then the fixed normalisation
``(x - 127.5) / 127.5`` to [-1, 1]. Images of mixed sizes are thus normalised to one size; an
image whose shorter side is below ``S`` is refused (upsampling would invent detail). ``S`` is
the preprocessing: ``size-28`` (default), ``size-64``, ``size-128``, ``size-224``.
"""

from __future__ import annotations

import csv
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import examples, warn_data
from ..partition import partition_frame
from .base import LABEL, DataError, HospitalData, Task, prepare_hospital, split_key_from_seed

IMAGE_SIZES = (28, 64, 128, 224)  # MedMNIST v2's published sizes
SCATTER = "scatter-28"  # 28x28 pixels, then a fixed scattering transform (see scattering)
PREPROCESSINGS = (*(f"size-{s}" for s in IMAGE_SIZES), SCATTER)
SCATTER_J, SCATTER_ANGLES = 2, 8  # scales (2^J pixels) and orientations of the Morlet wavelets
SCATTER_CHANNELS = (
    1 + SCATTER_J * SCATTER_ANGLES + SCATTER_ANGLES**2 * SCATTER_J * (SCATTER_J - 1) // 2
)
PIXEL_CENTER = 127.5  # fixed normalisation of 8-bit gray levels to [-1, 1]
PIXEL_SCALE = 127.5
LABELS_FILE = "labels.csv"
MAX_STORED_SIZE = max(IMAGE_SIZES)  # images are kept at most this large once read
SPLITS = ("train", "val", "test")
_FOLDER_HELP = (
    "a hospital folder holds image files (PNG, JPEG or DICOM) and labels.csv with the columns "
    "'file' and 'label' (0 = normal, 1 = pneumonia)"
)


def image_size(preprocessing: str) -> int:
    """``"size-64"`` -> 64, ``"scatter-28"`` -> 28 (``"default"`` -> 28).

    Raises
    ------
    ValueError
        Unknown preprocessing.
    """
    name = PREPROCESSINGS[0] if preprocessing == "default" else preprocessing
    if name not in PREPROCESSINGS:
        raise ValueError(
            f"no image preprocessing {preprocessing!r}; choose one of {PREPROCESSINGS}"
        )
    return int(name.rpartition("-")[2])


def image_input_shape(preprocessing: str) -> tuple[int, int, int]:
    """Shape of one example: ``(1, S, S)`` pixels, or ``(81, 7, 7)`` scattering coefficients."""
    size = image_size(preprocessing)
    if preprocessing == SCATTER:
        return (SCATTER_CHANNELS, size // 2**SCATTER_J, size // 2**SCATTER_J)
    return (1, size, size)


def scattering(x: np.ndarray, preprocessing: str) -> np.ndarray:
    """Preprocessing ``scatter-28``: ``x [N, 1, S, S] -> [N, 81, S/4, S/4] float32``; others: ``x``.

    The 2D scattering transform (Bruna & Mallat 2013; kymatio's ``Scattering2D``, J = 2 scales,
    8 orientations, order 2): fixed Morlet wavelet filters, moduli and local averaging, with
    nothing learned from data, so it is a fixed constant of the task like the pixel scaling and
    needs no statistics of any hospital. Tramèr & Boneh (ICLR 2021, "Differentially private learning
    needs better features") showed that linear models on these features beat end-to-end CNNs
    under DP-SGD on small images; on PneumoniaMNIST too (docs/chest-xray.md).

    kymatio 0.3's ``kymatio.torch`` also imports its 3D transform, which needs a function recent
    SciPy removed; the 2D frontend is imported directly.
    """
    if preprocessing != SCATTER:
        return x
    import torch
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    size = x.shape[-1]
    transform = ScatteringTorch2D(J=SCATTER_J, shape=(size, size), L=SCATTER_ANGLES)
    out = np.empty((len(x), *image_input_shape(preprocessing)), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(x), 512):
            batch = torch.from_numpy(np.ascontiguousarray(x[i : i + 512], dtype=np.float32))
            # kymatio keeps the input's channel axis: [B, 1, 81, h, w] -> [B, 81, h, w]
            out[i : i + 512] = transform(batch).flatten(1, 2).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# pixels: the same conversion at every hospital
# ----------------------------------------------------------------------------------------------
def to_gray_uint8(pixels: np.ndarray) -> np.ndarray:
    """One image ``[H, W]`` or ``[H, W, 3|4]`` of any integer/float type -> ``[H, W] uint8``.

    8-bit RGB(A) becomes PIL's ``convert("L")`` luma (ITU-R 601-2: 299 R + 587 G + 114 B, /1000);
    8-bit gray is kept; anything deeper is scaled linearly from the image's own min/max to
    0..255 (a constant image becomes 0).
    """
    from PIL import Image

    arr = np.asarray(pixels)
    if arr.ndim == 3:
        if arr.dtype != np.uint8:
            arr = _rescale(arr)
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., :3])).convert("L"))
    if arr.dtype == np.uint8:
        return arr
    return _rescale(arr)


def _rescale(arr: np.ndarray) -> np.ndarray:
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def center_crop_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """``[H, W] uint8`` -> ``[size, size] uint8``: centre crop to the shorter side, then PIL
    bicubic resize (antialiased when shrinking). The caller ensures ``min(H, W) >= size``."""
    from PIL import Image

    h, w = gray.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = gray[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(crop)
    img = Image.fromarray(np.ascontiguousarray(crop))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def normalise(images: np.ndarray) -> np.ndarray:
    """``[N, S, S] uint8 -> [N, 1, S, S] float32`` in [-1, 1] (fixed constants)."""
    return ((images.astype(np.float32) - PIXEL_CENTER) / PIXEL_SCALE)[:, None]


# ----------------------------------------------------------------------------------------------
# a hospital's image folder
# ----------------------------------------------------------------------------------------------
def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_dicom(path: Path, shown: str) -> tuple[np.ndarray, str]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():  # pydicom warns about each oddity it repairs
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for damaged or unsupported files
        raise DataError(
            f"{shown}: not a readable DICOM image ({type(exc).__name__}); re-export it "
            "uncompressed or as PNG"
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:  # colour DICOM: as an RGB PNG
        if frames > 1 or raw.ndim != 3:
            raise DataError(f"{shown}: a DICOM with {frames} frames; give one 2-D image per file")
        return to_gray_uint8(raw), f"DICOM {photometric}"
    if frames > 1 or raw.ndim != 2:
        raise DataError(f"{shown}: a DICOM with {frames} frames; give one 2-D image per file")
    gray = to_gray_uint8(apply_voi_lut(apply_modality_lut(raw, ds), ds))
    if photometric == "MONOCHROME1":  # 0 = white: inverted to the usual MONOCHROME2
        gray = 255 - gray
    return gray, f"DICOM {photometric} {int(getattr(ds, 'BitsStored', 8))}-bit"


def _read_pil(path: Path, shown: str) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            if fmt in ("PNG", "JPEG"):
                img.load()
                keep = mode in ("L", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F")
                # palette, 1-bit, LA, CMYK ...: PIL's own conversion to RGB first
                arr = np.asarray(img if keep else img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{shown}: not a readable image ({type(exc).__name__}); the file is damaged or not "
            "PNG, JPEG or DICOM"
        ) from None
    if fmt not in ("PNG", "JPEG"):
        raise DataError(f"{shown}: a {fmt} image; use PNG, JPEG or DICOM")
    return to_gray_uint8(arr), f"{fmt} {mode}"


def read_image(path: Path, *, shown: str | None = None) -> tuple[np.ndarray, str]:
    """Decode one image file (PNG, JPEG, or DICOM recognised by its ``DICM`` marker) to
    ``[H, W] uint8`` gray levels; also return a short description of its format.

    Raises
    ------
    DataError
        Damaged or unsupported file (named by ``shown``; no pixel value in the message).
    """
    shown = shown or path.name
    if _is_dicom(path):
        return _read_dicom(path, shown)
    return _read_pil(path, shown)


def _read_labels(folder: Path, problems: list[str]) -> pd.DataFrame:
    """``labels.csv`` as ``file``, ``label``, ``line``; a row's problem (a label other than
    0/1, a path instead of a name, a file listed twice) is appended to ``problems`` and the row
    left out, so that one check reports every problem.

    Raises
    ------
    DataError
        ``labels.csv`` missing, unreadable, without the header, or listing no image.
    """
    path = folder / LABELS_FILE
    shown = f"{folder.name}/{LABELS_FILE}"
    if not path.is_file():
        raise DataError(f"{shown}: missing; {_FOLDER_HELP}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error):
        raise DataError(f"{shown}: not a readable CSV file; {_FOLDER_HELP}") from None
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if "file" not in header or LABEL not in header:
        raise DataError(f"{shown}: the header must name the columns 'file' and 'label'")
    i_file, i_label = header.index("file"), header.index(LABEL)
    files: list[str] = []
    labels, lines = [], []
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(i_file, i_label):
            problems.append(f"{shown}, line {lineno}: expected the columns {', '.join(header)}")
            continue
        name, label = row[i_file].strip(), row[i_label].strip()
        if label not in ("0", "1", "0.0", "1.0"):
            problems.append(
                f"{shown}, line {lineno} ({name}): the label is not 0 or 1; use 0 (normal) or "
                "1 (pneumonia)"
            )
            continue
        if not name or Path(name).name != name:
            problems.append(
                f"{shown}, line {lineno}: the file name must be a name inside the folder"
            )
            continue
        if name in files:
            problems.append(f"{shown}, line {lineno}: {name} is listed twice")
            continue
        files.append(name)
        labels.append(float(label))
        lines.append(lineno)
    if not files and not problems:
        raise DataError(f"{shown}: lists no image; {_FOLDER_HELP}")
    return pd.DataFrame({"file": files, LABEL: labels, "line": lines})


_MAX_PROBLEMS_SHOWN = 10


def _raise_problems(folder: Path, problems: list[str]) -> None:
    """One :class:`DataError` with every problem (one problem: its message alone)."""
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        more = len(problems) - _MAX_PROBLEMS_SHOWN
        raise DataError(
            f"{folder.name}: {len(problems)} problems: "
            + "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
            + (f"; and {more} more" if more > 0 else "")
        )


def _unlisted_images(folder: Path, listed: set[str]) -> list[str]:
    """Files of ``folder`` that ``labels.csv`` does not list (hidden files and
    ``labels.csv`` itself aside), sorted."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name != LABELS_FILE and not p.name.startswith(".")
        and p.name not in listed
    )  # fmt: skip


def read_image_folder(folder: Path) -> pd.DataFrame:
    """Read one hospital's image folder (``labels.csv`` + the images it lists).

    Every problem of the folder is reported at once. Files in the folder that ``labels.csv``
    does not list are not used: a :class:`~shared_models.errors.DataWarning` gives their count
    and a few names.

    Returns
    -------
    pd.DataFrame
        One row per listed image: ``file``, ``label`` (0/1 float), ``image`` (``[h, w] uint8``
        gray levels, centre-cropped to a square, reduced to at most 224 px), ``format``,
        ``height`` and ``width`` (of the file as stored); ``attrs["folder"]`` is the folder's
        name.

    Raises
    ------
    DataError
        Folder or ``labels.csv`` missing; otherwise every problem in one message: labels other
        than 0/1, listed files missing, damaged or unsupported images. Files are named
        ``<folder name>/<file>`` (never the folder's location) and no pixel value is shown.
    """
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"{folder.name} is a file; give the folder that holds it ({_FOLDER_HELP})")
    if not folder.is_dir():
        raise DataError(
            f"{folder.name}: folder not found; task chest-xray reads a hospital's image folder "
            f"({_FOLDER_HELP})"
        )
    problems: list[str] = []
    frame = _read_labels(folder, problems)
    images, formats, heights, widths, keep = [], [], [], [], []
    for name, line in zip(frame["file"], frame["line"], strict=True):
        shown = f"{folder.name}/{name}"
        path = folder / name
        if not path.is_file():
            problems.append(
                f"{shown}: listed in {LABELS_FILE} (line {line}) but not found in the folder"
            )
            continue
        try:
            gray, fmt = read_image(path, shown=shown)
        except DataError as exc:
            problems.append(str(exc))
            continue
        h, w = gray.shape
        side = min(h, w)
        images.append(center_crop_resize(gray, min(side, MAX_STORED_SIZE)))
        formats.append(fmt)
        heights.append(h)
        widths.append(w)
        keep.append(name)
    _raise_problems(folder, problems)
    unlisted = _unlisted_images(folder, set(frame["file"]))
    if unlisted:
        warn_data(
            f"{folder.name}: {len(unlisted)} file(s) not listed in {LABELS_FILE} are not used "
            f"({examples(unlisted)}); list them with their label, or move them out of the folder"
        )
    frame = frame[frame["file"].isin(keep)].drop(columns="line").reset_index(drop=True)
    frame["image"] = images
    frame["format"] = formats
    frame["height"] = heights
    frame["width"] = widths
    frame.attrs["folder"] = folder.name
    return frame


def write_image_folder(frame: pd.DataFrame, folder: Path) -> None:
    """Write rows (as returned by :func:`read_image_folder`) as PNG files + ``labels.csv``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    names = []
    for i, img in enumerate(frame["image"]):
        name = f"image-{i + 1:05d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(folder / name)
        names.append(name)
    pd.DataFrame({"file": names, LABEL: frame[LABEL].astype(int).to_numpy()}).to_csv(
        folder / LABELS_FILE, index=False
    )


def image_features(frame: pd.DataFrame, preprocessing: str) -> tuple[np.ndarray, np.ndarray]:
    """``(frame, "size-S") -> (x [N, 1, S, S] float32 in [-1, 1], y [N] float32)``;
    ``"scatter-28"``: ``x`` through :func:`scattering`, ``[N, 81, 7, 7]``.

    Raises
    ------
    DataError
        An image whose shorter side is below ``S`` (named by its file).
    """
    size = image_size(preprocessing)
    out = np.empty((len(frame), size, size), dtype=np.uint8)
    prefix = f"{frame.attrs['folder']}/" if frame.attrs.get("folder") else ""
    small = []
    for i, img in enumerate(frame["image"]):
        if min(img.shape) < size:
            row = frame.iloc[i]
            name = row.get("file", f"image {i + 1}")
            w, h = row.get("width", img.shape[1]), row.get("height", img.shape[0])
            small.append(f"{prefix}{name}: {w}x{h} pixels")
            continue
        out[i] = center_crop_resize(img, size)
    if small:
        what = small[0] if len(small) == 1 else f"{len(small)} images ({examples(small)})"
        raise DataError(
            f"{what}, smaller than the {size}x{size} of preprocessing size-{size}; use the "
            "original (larger) images or a smaller size"
        )
    return scattering(normalise(out), preprocessing), frame[LABEL].to_numpy(np.float32)


# ----------------------------------------------------------------------------------------------
# MedMNIST v2 .npz
# ----------------------------------------------------------------------------------------------
def read_medmnist(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a binary MedMNIST v2 ``.npz``: ``{split: (images [N, H, W(, 3)] uint8, labels [N])}``.

    Raises
    ------
    DataError
        Not an ``.npz``, a key missing, shapes that do not match, or labels other than 0/1.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"{path}: not a readable .npz file ({type(exc).__name__}: truncated or damaged); "
            "download or copy it again"
        ) from None
    out = {}
    for split in SPLITS:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in data:
                raise DataError(
                    f"{path.name}: no '{key}'; a MedMNIST v2 file has train/val/test _images "
                    "and _labels"
                )
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.ndim != 1:
            raise DataError(
                f"{path.name}: '{split}_images' must be [N, H, W] uint8 and '{split}_labels' "
                f"[N] or [N, 1] (found {images.dtype} {images.shape}, labels {labels.shape})"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{path.name}: {images.shape[0]} {split} images but {labels.shape[0]} labels"
            )
        if not np.isin(labels, (0, 1)).all():
            raise DataError(
                f"{path.name}: '{split}_labels' has values other than 0 and 1; task chest-xray "
                "is binary (use a binary MedMNIST file such as pneumoniamnist.npz)"
            )
        out[split] = (images, labels.astype(np.float32))
    return out


def medmnist_pixels(images: np.ndarray, size: int, source: str) -> np.ndarray:
    """``[N, H, W(, 3)] uint8 -> [N, 1, size, size] float32`` with the task's fixed steps.

    Raises
    ------
    DataError
        Images smaller than ``size``.
    """
    h, w = images.shape[1:3]
    if min(h, w) < size:
        raise DataError(
            f"{source}: {w}x{h} images, smaller than the {size}x{size} of preprocessing "
            f"size-{size}; use the MedMNIST file of that size or preprocessing size-{min(h, w)}"
        )
    if images.ndim == 3 and h == w == size:
        return normalise(images)  # the file is already at the task's size
    out = np.stack([center_crop_resize(to_gray_uint8(img), size) for img in images])
    return normalise(out)


def _npz_files(data_dir: str) -> list[Path]:
    folder = Path(data_dir)
    return sorted(folder.glob("*.npz")) if folder.is_dir() else []


def _hospital_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / LABELS_FILE).exists())


def _need_data(data_dir: str) -> Path:
    if not data_dir:
        raise DataError(
            "task chest-xray needs --data-dir: a folder with one MedMNIST .npz file (e.g. "
            "pneumoniamnist/) or one image sub-folder per hospital"
        )
    folder = Path(data_dir)
    if folder.is_file():
        raise DataError(
            f"{folder} is a file; give the folder that holds it: --data-dir takes a folder with "
            f"one MedMNIST .npz file (e.g. pneumoniamnist/) or one image sub-folder per hospital"
        )
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    return folder


def _one_npz(folder: Path) -> Path | None:
    files = _npz_files(str(folder))
    if len(files) > 1:
        raise DataError(
            f"{folder}: {len(files)} .npz files ({', '.join(f.name for f in files)}); keep one"
        )
    return files[0] if files else None


def _image_hospitals(data_dir: str) -> list[tuple[str, pd.DataFrame]]:
    """Raw frames: one per hospital sub-folder, or the MedMNIST file's train split."""
    folder = _need_data(data_dir)
    npz = _one_npz(folder)
    if npz is not None:
        images, labels = read_medmnist(npz)["train"]
        frame = pd.DataFrame({LABEL: labels})
        frame["image"] = [to_gray_uint8(img) for img in images]
        return [(npz.stem, frame)]
    folders = _hospital_folders(folder)
    if not folders:
        raise DataError(
            f"{folder}: neither a MedMNIST .npz file nor hospital sub-folders with "
            f"{LABELS_FILE}; {_FOLDER_HELP}"
        )
    return [(f.name, read_image_folder(f)) for f in folders]


def share_test_split(
    train_parts: list[np.ndarray], y_train: np.ndarray, y_test: np.ndarray, *, seed: int
) -> list[np.ndarray]:
    """Give each hospital its share of the official test split.

    For each class, the test examples of that class are shuffled (``seed``) and dealt out in
    proportion to each hospital's training examples of that class (largest remainders), so a
    label-skewed hospital gets a test split with its own label mix and the shares are disjoint
    and cover the whole test split.

    Parameters
    ----------
    train_parts : list of ``[n_k]`` int arrays
        Training row indices of each hospital.
    y_train, y_test : np.ndarray
        ``[N_train]`` and ``[N_test]`` labels.

    Returns
    -------
    list of ``[t_k]`` int arrays: test row indices per hospital.
    """
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in train_parts]
    for cls in (0.0, 1.0):
        pool = rng.permutation(np.flatnonzero(y_test == cls))
        counts = np.array([(y_train[p] == cls).sum() for p in train_parts], dtype=float)
        if counts.sum() == 0:
            counts[:] = 1.0
        exact = counts / counts.sum() * len(pool)
        alloc = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - alloc), kind="stable")[: len(pool) - alloc.sum()]:
            alloc[k] += 1
        for k, chunk in enumerate(np.split(pool, np.cumsum(alloc)[:-1])):
            shares[k].append(chunk)
    return [np.sort(np.concatenate(s)) for s in shares]


def simulated_chest_hospitals(
    data_dir: str,
    *,
    num_hospitals: int,
    scheme: str,
    alpha: float,
    seed: int,
    preprocessing: str,
    test_fraction: float,
) -> list[HospitalData]:
    """The simulated hospitals of ``chest-xray`` (see the module docstring).

    A MedMNIST ``.npz``: its train split partitioned with
    :func:`shared_models.partition.partition_frame` (IID or Dirichlet) into ``hospital-1`` ...,
    test splits from :func:`share_test_split`. Hospital sub-folders: real hospitals, each split
    with :func:`~shared_models.tasks.base.prepare_hospital` (``test_fraction``, default 0.2).

    Raises
    ------
    DataError
        Missing or malformed data; ``num_hospitals`` differing from the number of hospital folders.
    """
    folder = _need_data(data_dir)
    size = image_size(preprocessing)
    npz = _one_npz(folder)
    if npz is None:
        hospitals = _image_hospitals(data_dir)
        if num_hospitals != len(hospitals):
            names = ", ".join(name for name, _ in hospitals)
            raise DataError(
                f"{folder} has {len(hospitals)} hospital folders ({names}); it cannot be simulated "
                f"with {num_hospitals} hospitals"
            )
        return [
            prepare_hospital(
                name,
                *image_features(frame, preprocessing),
                test_fraction=test_fraction or CHEST_TEST_FRACTION,
                split_key=split_key_from_seed(seed),
            )  # fmt: skip
            for name, frame in hospitals
        ]
    splits = read_medmnist(npz)
    x_train_u8, y_train = splits["train"]
    x_test_u8, y_test = splits["test"]
    rows = pd.DataFrame({"row": np.arange(len(y_train)), LABEL: y_train})
    parts = [
        part["row"].to_numpy()
        for part in partition_frame(
            rows, label=LABEL, num_partitions=num_hospitals, scheme=scheme, alpha=alpha, seed=seed
        )
    ]
    tests = share_test_split(parts, y_train, y_test, seed=seed)
    x_train = scattering(medmnist_pixels(x_train_u8, size, npz.name), preprocessing)
    x_test = scattering(medmnist_pixels(x_test_u8, size, npz.name), preprocessing)
    return [
        HospitalData(
            name=f"hospital-{k + 1}",
            x_train=x_train[tr],
            y_train=y_train[tr],
            x_test=x_test[te],
            y_test=y_test[te],
        )
        for k, (tr, te) in enumerate(zip(parts, tests, strict=True))
    ]


CHEST_TEST_FRACTION = 0.2


def chest_positive_class(data_dir: str) -> str:
    """What label 1 means in a chest-xray data folder: ``pneumonia`` for hospital image folders
    (their ``labels.csv`` contract) and for PneumoniaMNIST (``pneumoniamnist*.npz``; MedMNIST v2
    documents its labels as 0 = normal, 1 = pneumonia); for another MedMNIST file, whose
    ``.npz`` carries no class names, ``class 1 of FILE`` (see that dataset's documentation:
    BreastMNIST's 1, for one, is normal/benign)."""
    files = _npz_files(data_dir)
    if len(files) != 1 or files[0].stem.lower().startswith("pneumoniamnist"):
        return "pneumonia"
    return f"class 1 of {files[0].name} (the file names no classes)"


IMAGE_TASKS: dict[str, Task] = {
    "chest-xray": Task(
        name="chest-xray",
        attribution_axis=None,  # explained by class-conditional mean saliency maps instead
        saliency_grid=7,  # 7 x 7 cells: the scattering transform's own lattice at 28 x 28
        read_file=read_image_folder,
        load_hospitals=_image_hospitals,
        write_file=write_image_folder,
        file_name=lambda hospital: hospital,  # a hospital's data is a folder named after it
        features=image_features,
        input_shape=image_input_shape,
        natural_split=False,
        preprocessings=PREPROCESSINGS,
        positive_class="pneumonia",
        positive_class_of=chest_positive_class,
        default_test_fraction=CHEST_TEST_FRACTION,
        models=("cnn", "scatter-linear"),
        preprocessing_models={SCATTER: ("scatter-linear",)},
        simulated_hospitals=simulated_chest_hospitals,
        # The recipes of presets/chest-xray.toml and presets/chest-xray-no-dp.toml (docs/chest-xray.md;
        # benchmarks/chest_xray_variants.py), measured on PneumoniaMNIST.
        # Under DP: a linear model on fixed scattering coefficients (Tramer & Boneh, ICLR 2021),
        # large expected batches, a large learning rate on clipped gradients, few epochs.
        # Without: the CNN with small batches and momentum (lr 2 saturates its tanh units
        # without clipping).
        run_defaults_dp={
            "task.preprocessing": SCATTER,
            "model.name": "scatter-linear",
            "train.rounds": 10,
            "train.local-epochs": 1.0,
            "train.batch-size": 256,
            "train.lr": 2.0,
            "dp.max-grad-norm": 1.0,
        },
        run_defaults_no_dp={
            "train.rounds": 20,
            "train.local-epochs": 1.0,
            "train.batch-size": 64,
            "train.lr": 0.05,
            "train.momentum": 0.9,
        },
    ),
}
