"""Small image folders written the way a hospital would have them (PNG, JPEG, DICOM via pydicom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2") -> None:
    """A single-frame DICOM file (explicit VR little endian, uncompressed) holding ``pixels``
    (``[H, W]`` uint8 or uint16; 16-bit stored as 12 bits used)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "CR"
    ds.PatientID = "synthetic"
    bits = 8 if pixels.dtype == np.uint8 else 12
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    ds.save_as(path, enforce_file_format=True)


def synthetic_xray(rng: np.random.Generator, label: int, size: int = 32) -> np.ndarray:
    """A ``[size, size]`` uint8 image whose brightness in the centre depends on the label (so a
    model can learn it quickly)."""
    img = rng.normal(90, 20, size=(size, size))
    c = size // 4
    img[c : size - c, c : size - c] += 70 if label else -30
    return np.clip(img, 0, 255).astype(np.uint8)


def write_hospital_folder(
    folder: Path, n: int, *, seed: int, size: int = 32, dicom_every: int = 3
) -> pd.DataFrame:
    """``n`` images (PNG, and every ``dicom_every``-th a 16-bit DICOM) + labels.csv; returns the
    labels table."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 2)
        img = synthetic_xray(rng, label, size)
        if dicom_every and i % dicom_every == 0:
            name = f"img-{i:03d}.dcm"
            write_dicom(folder / name, img.astype(np.uint16) * 16)  # 12-bit range
        else:
            name = f"img-{i:03d}.png"
            Image.fromarray(img).save(folder / name)
        rows.append({"file": name, "label": label})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "labels.csv", index=False)
    return table
