"""The chest-xray task: MedMNIST .npz loading and splits, hospital image folders (PNG, JPEG,
DICOM), the fixed preprocessing, and one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from shared_models.hospitals import simulated_hospitals
from shared_models.tasks import DataError, get_task
from shared_models.tasks.images import (
    image_features,
    read_image_folder,
    read_medmnist,
    share_test_split,
    simulated_chest_hospitals,
)
from tests.images_data import synthetic_xray, write_dicom, write_hospital_folder


def _hospitals(
    data_dir, *, num_hospitals=3, scheme="iid", alpha=0.5, preprocessing="size-28", seed=0
):
    return simulated_chest_hospitals(
        str(data_dir), num_hospitals=num_hospitals, scheme=scheme, alpha=alpha, seed=seed,
        preprocessing=preprocessing, test_fraction=0.0,
    )  # fmt: skip


def _write_npz(path, size, n=(60, 20, 30), rgb=False, labels_2d=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        labels = (np.arange(count) % 2).astype(np.uint8)
        images = np.stack([synthetic_xray(rng, int(lab), size) for lab in labels])
        if rgb:
            images = np.repeat(images[..., None], 3, axis=-1)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None] if labels_2d else labels
    np.savez(path, **arrays)


def test_pneumoniamnist_official_splits(pneumonia_dir):
    splits = read_medmnist(pneumonia_dir / "pneumoniamnist.npz")
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 4708, "val": 524, "test": 624}
    assert splits["train"][0].shape == (4708, 28, 28)


def test_simulated_hospitals_share_the_official_test_split(pneumonia_dir):
    hospitals = _hospitals(pneumonia_dir)
    splits = read_medmnist(pneumonia_dir / "pneumoniamnist.npz")
    assert [s.name for s in hospitals] == ["hospital-1", "hospital-2", "hospital-3"]
    assert sum(s.n_train for s in hospitals) == 4708
    assert sum(s.n_test for s in hospitals) == 624  # pooled evaluation = the whole test split
    pooled = np.concatenate([s.x_test for s in hospitals])[:, 0]
    official = (splits["test"][0].astype(np.float32) - 127.5) / 127.5
    # same images, each exactly once (compare as sorted rows)
    key = lambda a: a.reshape(len(a), -1)[np.lexsort(a.reshape(len(a), -1).T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(key(pooled), key(official))
    assert all(s.x_train.shape[1:] == (1, 28, 28) for s in hospitals)
    assert all(s.x_train.min() >= -1.0 and s.x_train.max() <= 1.0 for s in hospitals)
    again = _hospitals(pneumonia_dir)
    np.testing.assert_array_equal(again[1].x_test, hospitals[1].x_test)  # deterministic


def test_dirichlet_hospitals_get_test_splits_with_their_own_label_mix(pneumonia_dir):
    hospitals = _hospitals(pneumonia_dir, scheme="dirichlet", alpha=0.3, seed=1)
    assert sum(s.n_test for s in hospitals) == 624
    train_mix = [s.y_train.mean() for s in hospitals]
    assert max(train_mix) - min(train_mix) > 0.1  # label skew
    # each hospital holds the same share of each class in test as in training (to the example:
    # largest remainders); a test split dealt without regard to the label (IID) misses by dozens
    for cls in (0, 1):
        train = np.array([(s.y_train == cls).sum() for s in hospitals])
        test = np.array([(s.y_test == cls).sum() for s in hospitals])
        expected = train / train.sum() * test.sum()
        assert np.abs(test - expected).max() < 1, (cls, test, expected.round(1))


def test_share_test_split_is_proportional_per_class_and_covers_everything():
    y_train = np.array([1] * 30 + [0] * 10 + [1] * 10 + [0] * 30, dtype=float)
    parts = [np.arange(0, 40), np.arange(40, 80)]  # 75 % and 25 % positive
    y_test = np.array([1] * 40 + [0] * 40, dtype=float)
    shares = share_test_split(parts, y_train, y_test, seed=0)
    assert sorted(np.concatenate(shares).tolist()) == list(range(80))
    assert [int(y_test[s].sum()) for s in shares] == [30, 10]
    assert [int((y_test[s] == 0).sum()) for s in shares] == [10, 30]


@pytest.mark.parametrize("size", [28, 64])
def test_any_published_size_loads_and_is_resized_to_the_task_size(tmp_path, size):
    _write_npz(tmp_path / "x.npz", size, rgb=size == 64, labels_2d=size == 28)
    hospitals = _hospitals(tmp_path, num_hospitals=2)
    assert hospitals[0].x_train.shape[1:] == (1, 28, 28)
    assert sum(s.n_train for s in hospitals) == 60 and sum(s.n_test for s in hospitals) == 30
    if size == 64:
        at64 = _hospitals(tmp_path, num_hospitals=2, preprocessing="size-64")
        assert at64[0].x_train.shape[1:] == (1, 64, 64)


def test_npz_smaller_than_the_preprocessing_is_refused(tmp_path):
    _write_npz(tmp_path / "small.npz", 28)
    with pytest.raises(DataError, match=r"small.npz: 28x28 images, smaller than the 64x64"):
        _hospitals(tmp_path, num_hospitals=2, preprocessing="size-64")


def test_npz_with_a_missing_key_or_multiclass_labels(tmp_path):
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="bad.npz: no 'train_labels'"):
        read_medmnist(tmp_path / "bad.npz")
    _write_npz(tmp_path / "multi.npz", 28)
    data = dict(np.load(tmp_path / "multi.npz"))
    data["test_labels"][0] = 2
    np.savez(tmp_path / "multi.npz", **data)
    with pytest.raises(DataError, match="'test_labels' has values other than 0 and 1"):
        read_medmnist(tmp_path / "multi.npz")


def test_the_simulation_path_uses_the_hook_and_resolves_the_default(pneumonia_dir):
    hospitals = simulated_hospitals(
        "chest-xray", data_dir=str(pneumonia_dir), num_hospitals=2, scheme="iid", alpha=0.5,
        seed=0, preprocessing="default", test_fraction=0.0,
    )  # fmt: skip
    assert len(hospitals) == 2 and sum(s.n_test for s in hospitals) == 624


# ----------------------------------------------------------------------------------------------
# hospital folders
# ----------------------------------------------------------------------------------------------
def test_folder_with_png_jpeg_and_dicom(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "hospital-a"
    folder.mkdir()
    gray = synthetic_xray(rng, 1, 40)
    gray[0, :2] = (0, 255)  # full range: images deeper than 8 bits are scaled from their own
    rgb = np.stack([gray, gray, gray], axis=-1)
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(gray).save(folder / "photo.jpg", quality=95)
    Image.fromarray(gray.astype(np.uint16) * 256).save(folder / "deep.png")  # 16-bit PNG
    write_dicom(folder / "IM0001", gray.astype(np.uint16) * 16)  # no suffix: DICOM by content
    write_dicom(folder / "mono1.dcm", (255 - gray).astype(np.uint8), photometric="MONOCHROME1")
    names = ["gray.png", "rgb.png", "photo.jpg", "deep.png", "IM0001", "mono1.dcm"]
    pd.DataFrame({"file": names, "label": [1, 0, 1, 0, 1, 0]}).to_csv(
        folder / "labels.csv", index=False
    )
    frame = read_image_folder(folder)
    assert frame["file"].tolist() == names
    assert frame["label"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert frame["format"].str.split().str[0].tolist() == [
        "PNG",
        "PNG",
        "JPEG",
        "PNG",
        "DICOM",
        "DICOM",
    ]
    images = dict(zip(frame["file"], frame["image"], strict=True))
    # gray, RGB, 16-bit and both DICOM photometric interpretations give the same gray levels
    for name in ("rgb.png", "deep.png", "IM0001", "mono1.dcm"):
        np.testing.assert_allclose(images[name].astype(int), gray.astype(int), atol=1, err_msg=name)
    assert np.abs(images["photo.jpg"].astype(int) - gray).mean() < 4  # JPEG is lossy
    x, y = image_features(frame, "size-28")
    assert x.shape == (6, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and y.tolist() == frame["label"].tolist()


def test_mixed_sizes_are_centre_cropped_and_resized_to_one_size(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    wide = np.zeros((40, 60), np.uint8)
    wide[:, 10:50] = 200  # the centre 40x40 square is bright, the margins dark
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(np.full((90, 90), 200, np.uint8)).save(folder / "big.png")
    pd.DataFrame({"file": ["wide.png", "big.png"], "label": [0, 1]}).to_csv(
        folder / "labels.csv", index=False
    )
    frame = read_image_folder(folder)
    assert (frame["width"].tolist(), frame["height"].tolist()) == ([60, 90], [40, 90])
    x, _ = image_features(frame, "size-28")
    assert x.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(x, (200 - 127.5) / 127.5, atol=0.02)  # no dark margin survived


def _folder(tmp_path, files: dict[str, np.ndarray | bytes], labels: list[tuple[str, object]]):
    folder = tmp_path / "hospital-b"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            Image.fromarray(content).save(folder / name)
    pd.DataFrame(labels, columns=["file", "label"]).to_csv(folder / "labels.csv", index=False)
    return folder


_IMG = np.full((32, 32), 77, np.uint8)


@pytest.mark.parametrize(
    ("files", "labels", "match"),
    [
        ({"a.png": _IMG, "b.png": b"\x89PNG\r\n\x1a\n broken"}, [("a.png", 0), ("b.png", 1)],
         r"^hospital-b/b.png: not a readable image \(.*\); the file is damaged or not PNG, JPEG or DICOM$"),
        ({"a.png": _IMG, "c.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00garbage"}, [("a.png", 0), ("c.dcm", 1)],
         r"^hospital-b/c.dcm: not a readable DICOM image"),
        ({"a.png": _IMG}, [("a.png", 2)],
         r"^hospital-b/labels.csv, line 2 \(a.png\): the label is not 0 or 1; use 0 \(normal\) or 1 \(pneumonia\)$"),
        ({"a.png": _IMG}, [("a.png", "pneumonia")], r"line 2 \(a.png\): the label is not 0 or 1"),
        ({"a.png": _IMG}, [("a.png", 0), ("gone.png", 1)],
         r"^hospital-b/gone.png: listed in labels.csv \(line 3\) but not found in the folder$"),
        ({"a.png": _IMG}, [("a.png", 0), ("a.png", 1)], r"labels.csv, line 3: a.png is listed twice"),
    ],
)  # fmt: skip
def test_bad_folder_input_gets_one_clear_error(tmp_path, files, labels, match):
    folder = _folder(tmp_path, files, labels)
    with pytest.raises(DataError, match=match) as err:
        read_image_folder(folder)
    assert str(tmp_path) not in str(err.value)  # no local path travels with the message
    assert "77" not in str(err.value)  # nor a pixel value


def test_an_image_below_the_task_size_is_refused_by_name(tmp_path):
    folder = _folder(
        tmp_path, {"a.png": _IMG, "tiny.png": _IMG[:20, :24]}, [("a.png", 0), ("tiny.png", 1)]
    )
    frame = read_image_folder(folder)
    with pytest.raises(
        DataError, match=r"^hospital-b/tiny.png: 24x20 pixels, smaller than the 28x28"
    ):
        image_features(frame, "size-28")


def test_folder_without_labels_file_or_header(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    with pytest.raises(DataError, match=r"^h/labels.csv: missing; a hospital folder holds"):
        read_image_folder(folder)
    (folder / "labels.csv").write_text("name,diagnosis\na.png,1\n")
    with pytest.raises(DataError, match="the header must name the columns 'file' and 'label'"):
        read_image_folder(folder)
    with pytest.raises(DataError, match="labels.csv is a file; give the folder that holds it"):
        read_image_folder(folder / "labels.csv")


def test_a_folder_of_hospital_folders_is_a_federation(tmp_path):
    write_hospital_folder(tmp_path / "a", 20, seed=0)
    write_hospital_folder(tmp_path / "b", 30, seed=1)
    task = get_task("chest-xray")
    assert [name for name, _ in task.load_hospitals(str(tmp_path))] == ["a", "b"]
    hospitals = _hospitals(tmp_path, num_hospitals=2)
    assert [(s.name, s.n_train + s.n_test) for s in hospitals] == [("a", 20), ("b", 30)]
    assert 1 <= hospitals[0].n_test <= 9  # the task's default 20 % share, record by record
    with pytest.raises(DataError, match="2 hospital folders"):
        _hospitals(tmp_path, num_hospitals=3)


def test_client_check_reports_an_image_folder(monkeypatch, capsys, tmp_path):
    import sys

    from simulations import cli

    write_hospital_folder(tmp_path / "hospital", 9, seed=0)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "fedcare",
            "client",
            "check",
            "--task",
            "chest-xray",
            "--data",
            str(tmp_path / "hospital"),
        ],
    )
    cli.main()
    out = " ".join(capsys.readouterr().out.split())
    assert "9 images, valid chest-xray data" in out
    assert "label (pneumonia): 4 positive (44%), 5 negative" in out
    assert "every image becomes 1x28x28 (preprocessing size-28)" in out
    assert "│ DICOM MONOCHROME2 12-bit │ 32x32 │ 3 │" in out and "│ PNG L │ 32x32 │ 6 │" in out


def test_client_check_names_the_bad_file(monkeypatch, capsys, tmp_path):
    import sys

    from simulations import cli

    folder = _folder(tmp_path, {"a.png": _IMG}, [("a.png", 0), ("b.png", 1)])
    monkeypatch.setattr(
        sys, "argv", ["fedcare", "client", "check", "--task", "chest-xray", "--data", str(folder)]
    )
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in out.err
    assert "hospital-b/b.png: listed in labels.csv (line 3) but not found" in " ".join(
        out.err.split()
    )


def test_scatter_preprocessing_is_a_fixed_per_image_transform(tmp_path):
    """scatter-28: [N, 81, 7, 7] scattering coefficients of the 28x28 pixels, the same for an
    image whatever else is in the hospital's folder (no statistics across images or hospitals)."""
    from shared_models.tasks.images import scattering

    rng = np.random.default_rng(0)
    images = [synthetic_xray(rng, k % 2, 40) for k in range(5)]
    frame = pd.DataFrame({"file": [f"{k}.png" for k in range(5)], "image": images,
                          "label": [float(k % 2) for k in range(5)]})  # fmt: skip
    x, y = image_features(frame, "scatter-28")
    assert x.shape == (5, 81, 7, 7) and x.dtype == np.float32 and np.isfinite(x).all()
    alone, _ = image_features(frame.iloc[[3]], "scatter-28")
    np.testing.assert_allclose(alone[0], x[3], rtol=1e-5, atol=1e-6)
    pixels, _ = image_features(frame, "size-28")
    np.testing.assert_allclose(scattering(pixels, "scatter-28"), x, rtol=1e-5, atol=1e-6)
    assert scattering(pixels, "size-28") is pixels  # other preprocessings: unchanged
    task = get_task("chest-xray")
    assert task.input_shape("scatter-28") == (81, 7, 7) and task.input_shape("size-64") == (
        1,
        64,
        64,
    )


def test_models_fit_their_preprocessing_with_a_clear_error_otherwise():
    task = get_task("chest-xray")
    assert task.resolve_model("default") == "cnn"
    assert task.resolve_model("default", "scatter-28") == "scatter-linear"
    with pytest.raises(ValueError, match="model 'cnn' does not fit task 'chest-xray' with "
                       "preprocessing 'scatter-28'; choose one of \\['scatter-linear'\\]"):  # fmt: skip
        task.resolve_model("cnn", "scatter-28")
    with pytest.raises(
        ValueError, match="does not fit task 'chest-xray'; choose one of \\['cnn'\\]"
    ):
        task.resolve_model("scatter-linear")


def test_simulate_refuses_a_model_that_does_not_fit_the_preprocessing(
    monkeypatch, capsys, pneumonia_dir
):
    from simulations import cli

    monkeypatch.setattr("sys.argv", ["fedcare", "simulate", "--task", "chest-xray", "--data-dir",
                                     str(pneumonia_dir), "--hospitals", "3", "--run-config",
                                     "task.preprocessing='scatter-28' model.name='cnn'"])  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        cli.main()
    out = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and "model 'cnn' does not fit task 'chest-xray'" in out, out
    assert "Traceback" not in out
